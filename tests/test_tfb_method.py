"""The ``tfb`` method on a tiny random Llama: the rotation keeps the adapter, the fit returns the largest σ
within tolerance on held-out training anchors, save / reload / re-evaluate bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from test_blob_method import assets, run_config, started  # noqa: F401  (assets is a fixture)
from varlora.config import ConfigError
from varlora.methods import build_method
from varlora.methods._flipout import lora_a_modules
from varlora.methods.tfb import TFB_FILE, TFB_JSON, TFBArgs, rotate_adapter
from varlora.session import setup

TFB = {"n_anchor": 8, "search_steps": 4, "search_samples": 2, "sigma_lo": 0.001, "sigma_hi": 0.5}


def trained(assets, folder, **tfb):  # noqa: F811
    """A MAP adapter trained enough (8 steps, lr 0.03) that the anchor NLL moves with σ inside [lo, hi]."""
    config = run_config(assets, "tfb", tfb=TFB | tfb, adamw={"lr": 3e-2}, train={"steps": 8})
    session, method = started(config, folder)
    for step in range(8):
        method.train_step(step)
    session.model.eval()
    return session, method


def test_rotation_keeps_the_update_and_orthogonalises_b(assets, tmp_path):  # noqa: F811
    session, _ = trained(assets, tmp_path)
    x = torch.randint(3, 300, (2, 6))
    before = session.model(x).logits
    modules = dict(session.model.named_modules())
    singular = rotate_adapter(session.model)
    torch.testing.assert_close(session.model(x).logits, before, rtol=1e-5, atol=1e-5)
    for name in lora_a_modules(session.model):
        b = modules[name].lora_B["default"].weight.detach().double()
        torch.testing.assert_close(b.T @ b, torch.diag(singular[name].double() ** 2), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("criterion", ["nll", "flip"])
def test_fit_finds_the_largest_sigma_within_tolerance_on_heldout_training_anchors(assets, tmp_path, criterion):  # noqa: F811
    session, method = trained(assets, tmp_path, criterion=criterion, nll_tolerance=0.003, flip_tolerance=0.2)
    fit = method.fit_posthoc(lambda _: None)
    tolerance = 0.003 if criterion == "nll" else 0.2
    passing = [t["sigma"] for t in fit["search"] if t["change"] <= tolerance]
    failing = [t["sigma"] for t in fit["search"] if t["change"] > tolerance]
    assert fit["sigma_q"] == method.sigma_q == (max(passing) if passing else TFB["sigma_lo"])
    assert fit["search"][0]["sigma"] == TFB["sigma_hi"]
    if criterion == "nll":  # this adapter's boundary lies inside [lo, hi]: a full bisection
        assert passing and failing and len(fit["search"]) == TFB["search_steps"] + 1
    if failing:  # bracketed to the resolution of the search
        above = min(s for s in failing if s > fit["sigma_q"])
        assert above - fit["sigma_q"] <= (TFB["sigma_hi"] - TFB["sigma_lo"]) / 2 ** TFB["search_steps"] + 1e-12
    anchors = set(fit["anchor_ids"])
    assert len(anchors) == TFB["n_anchor"]
    assert not anchors & {ex.id for ex in session.val_examples}
    assert not anchors & {ex.id for ex in session.train_examples}
    # σ of each A′ row is σ_q / dᵢ
    for name in method.flipout.names:
        b = dict(session.model.named_modules())[name].lora_B["default"].weight.detach()
        d = b.norm(dim=0)
        torch.testing.assert_close(method.flipout.std(name)[:, 0], fit["sigma_q"] / d, rtol=1e-4, atol=0)


def test_rows_save_reload_and_reevaluate_bit_for_bit(assets, tmp_path):  # noqa: F811
    session, method = trained(assets, tmp_path / "run")
    method.fit_posthoc(lambda _: None)
    rows = method.predict(session.val_examples, session.scorer)
    assert [r.label for r in rows] == ["tfb"]
    assert (rows[0].n_samples, rows[0].forward_passes) == (3, 3)
    assert rows[0].sample_probs.shape == (3, len(session.val_examples), 4)
    folder = tmp_path / "final"
    method.save(folder)
    assert json.loads((folder / TFB_JSON).read_text())["sigma_q"] == method.sigma_q
    assert (folder / TFB_FILE).is_file()
    fresh_session = setup(method.config, tmp_path / "run", need_train=False)
    fresh = build_method(fresh_session)
    fresh.load(folder)
    again = fresh.predict(session.val_examples, fresh_session.scorer)
    assert fresh.sigma_q == method.sigma_q
    assert torch.equal(again[0].probs, rows[0].probs)


def test_too_many_anchors_is_a_config_error(assets, tmp_path):  # noqa: F811
    _, method = trained(assets, tmp_path, n_anchor=10_000)
    with pytest.raises(ConfigError, match="tfb.n_anchor"):
        method.fit_posthoc(lambda _: None)


@pytest.mark.parametrize(("field", "value"), [("criterion", "kl"), ("sigma_lo", 1.0), ("search_samples", 0),
                                              ("anchor_labels", "none"), ("flip_tolerance", 2.0)])
def test_args_are_validated(field, value):
    with pytest.raises(ConfigError, match=f"tfb.{field}"):
        TFBArgs(**{field: value})
