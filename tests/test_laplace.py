"""The ``laplace`` method in the harness, end to end on a tiny random Llama: train the MAP adapter, fit the
Kronecker posterior, save, reload with ``varlora eval`` and reproduce the predictions exactly. The math is
tested in test_kfac.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from test_train import _config, assets  # noqa: F401  (fixture)
from varlora.cli import main
from varlora.config import ConfigError, RunConfig
from varlora.methods import get_method
from varlora.methods.laplace import LAPLACE_FILE, LaplaceArgs
from varlora.train import RunPaths, train_run


def _laplace_config(assets, **laplace) -> RunConfig:  # noqa: F811
    data = _config(assets, "laplace", steps=4, eval_every=0, save_every=4).to_dict()
    return RunConfig.from_dict(data | {"laplace": {"fit_limit": 12} | laplace})


@pytest.mark.parametrize("link", ["probit", pytest.param("mc", marks=pytest.mark.slow)])
def test_laplace_trains_fits_saves_and_reloads_exactly(assets, tmp_path, link, capsys):  # noqa: F811
    run = tmp_path / link
    summary = train_run(_laplace_config(assets, link_approx=link), run, log=lambda _: None)
    rows = summary["results"][summary["task"]]
    assert list(rows) == ["laplace"]
    fit = summary["posthoc"]
    assert fit["fit_examples"] == 12 and fit["fit_seconds"] > 0 and fit["prior_precision"] > 0
    assert 0 < fit["effective_params"] < fit["n_params"]
    with safe_open(run / "final" / LAPLACE_FILE, "pt") as fh:
        assert float(fh.metadata()["prior_precision"]) == fit["prior_precision"]
    saved = json.loads(RunPaths(run).eval_json(summary["task"]).read_text())
    [row] = saved["predictions"]
    assert row["n_samples"] == (3 if link == "mc" else 1)  # eval.n_samples in the test config
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "reproduces the metrics saved by training" in capsys.readouterr().out
    assert json.loads(RunPaths(run).eval_json(summary["task"]).read_text())["predictions"] == saved["predictions"]


@pytest.mark.slow
def test_laplace_predictive_reduces_to_map_as_the_prior_tightens(assets, tmp_path):  # noqa: F811
    """Same adapter, same logits (f*); the GLM variance changes the probabilities, and with a huge prior
    precision (Σ → 0) the predictive is the MAP's softmax."""
    from varlora.train import setup

    config = _laplace_config(assets)
    session = setup(config, tmp_path / "run")
    method = get_method("laplace")(session)
    method.setup()
    for step in range(4):
        method.train_step(step)
    method.fit_posthoc(lambda _: None)
    examples = session.val_examples[:6]
    [lap] = method.predict(examples, session.scorer)
    [map_row] = super(type(method), method).predict(examples, session.scorer)
    torch.testing.assert_close(lap.logits, map_row.logits)
    assert not torch.allclose(lap.probs, map_row.probs, atol=1e-4)
    method.posterior.prior_precision = 1e12
    [tight] = method.predict(examples, session.scorer)
    torch.testing.assert_close(tight.probs, map_row.probs, rtol=0, atol=1e-6)


def test_laplace_args_are_validated():
    for field, value in [("subset_of_weights", "first"), ("hessian_structure", "full"), ("link_approx", "x"),
                         ("prior_optimization", "cv"), ("prior_precision", 0.0), ("fit_limit", -1),
                         ("prior_holdout", 0)]:
        with pytest.raises(ConfigError, match=f"laplace.{field}"):
            LaplaceArgs(**{field: value})


def test_laplace_validation_prior_is_a_grid_point_fitted_on_heldout_questions(assets, tmp_path):  # noqa: F811
    """prior_optimization='validation': δ is a point of PRIOR_GRID, chosen on held-out training questions (the
    run trains on train_limit of them), and the log names the held-out count."""
    from varlora.methods.laplace import PRIOR_GRID

    data = _laplace_config(assets, prior_optimization="validation", prior_holdout=4, link_approx="probit").to_dict()
    config = RunConfig.from_dict(data | {"data": data["data"] | {"train_limit": 24}})
    lines = []
    summary = train_run(config, tmp_path / "run", log=lines.append)
    delta = summary["posthoc"]["prior_precision"]
    assert min(abs(delta / float(g) - 1) for g in PRIOR_GRID) < 1e-12
    assert any("on 4 held-out questions" in line for line in lines)
