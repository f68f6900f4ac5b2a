"""One labelled-data budget (data.calibration), the calibration layer on any method, IVON's τ* and the posterior
scale by rule (issue 31)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_assets
from varlora import calibration
from varlora.cli import build_parser, config_from_args
from varlora.config import ConfigError, RunConfig
from varlora.methods.ivon import AUTO_ESS_PER_EXAMPLE, AUTO_SIGMA_SCALE, IVONArgs, posterior_scale_rule
from varlora.prediction import Prediction
from varlora.session import setup
from varlora.train import load_run, train_run

N_TRAIN, K = 24, 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"), n_train=48, n_val=12)


def _config(assets, method: str, **sections) -> RunConfig:
    data = {
        "model": {"name": assets["model"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "method": {"name": method},
        "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64, "train_limit": N_TRAIN,
                 "calibration": K},
        "train": {"steps": 4, "batch_size": 4, "save_every": 2, "seed": 3},
        "ivon": {"lr": 0.1, "beta2": 0.99, "clip_radius": 1.0, "tau_grid": [0.0, 0.5, 1.0]},
        "adamw": {"lr": 1e-2},
        "eval": {"n_samples": 3, "taus": [0.0, 1.0], "batch_size": 5},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return RunConfig.from_dict(data)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: (root / name, train_run(_config(assets, name), root / name, log=_quiet))
            for name in ("adamw", "ivon")}


# ------------------------------------------------------------------------------------------ the budget


def test_every_method_trains_on_the_same_questions_and_fits_on_the_same_others(assets, tmp_path):
    sessions = [setup(_config(assets, name), tmp_path / name) for name in ("adamw", "ivon", "temperature", "tfb")]
    ids = [({ex.id for ex in s.train_examples}, [ex.id for ex in s.calibration_examples]) for s in sessions]
    train, calib = ids[0]
    assert all(i == (train, calib) for i in ids)
    assert len(train) == N_TRAIN - K and len(calib) == K and not train & set(calib)
    without = setup(_config(assets, "adamw", data={"calibration": None}), tmp_path / "all")
    assert {ex.id for ex in without.train_examples} == train | set(calib)  # the same N questions, split in two
    for session in sessions:  # every post-hoc fit uses exactly the calibration questions, whatever it asks for
        assert [ex.id for ex in session.heldout_train_examples(3, "tfb.n_anchor")] == calib
    with pytest.raises(ConfigError, match=r"data.calibration=24: the run has only 24 training questions"):
        setup(_config(assets, "adamw", data={"calibration": N_TRAIN}), tmp_path / "bad")


# ------------------------------------------------------------------------------------------ the layer


def test_the_layer_recovers_a_known_temperature_and_applies_it_to_averaged_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=g).squeeze(1)  # truly T = 2.5
    row = Prediction(label="m", method="m", probs=torch.softmax(logits, -1), labels=labels)
    fitted = calibration.fit_layer([row])
    assert fitted["m"]["T"] == pytest.approx(2.5, rel=0.03)
    assert fitted["m"]["nll_after"] < fitted["m"]["nll_before"]
    sampled = Prediction(label="s", method="s", probs=torch.softmax(logits[:5], -1), labels=labels[:5], tau=1.0,
                         sample_probs=torch.rand(3, 5, 4, dtype=torch.float64), n_samples=3, forward_passes=3)
    [out] = calibration.apply_layer([sampled], {"s": {"T": 2.0}})
    expected = sampled.probs.sqrt() / sampled.probs.sqrt().sum(-1, keepdim=True)  # p̄^(1/T), renormalised
    torch.testing.assert_close(out.probs, expected)
    assert (out.label, out.tau, out.n_samples, out.forward_passes, out.sample_probs) == ("s+ts", 1.0, 3, 3, None)
    assert calibration.apply_layer([sampled], {}) == []


def test_runs_with_calibration_questions_add_calibrated_rows_and_ivon_tau_star(finished):
    for name, labels in (("adamw", {"adamw", "adamw+ts"}),
                         ("ivon", {"ivon@mean", "ivon", "ivon[tau*]", "ivon@mean+ts", "ivon+ts", "ivon[tau*]+ts"})):
        folder, summary = finished[name]
        record = json.loads(next((folder / "eval").glob("*.json")).read_text())
        assert {r["label"] for r in record["predictions"]} == labels
        stage = json.loads((folder / "final" / "stage.json").read_text())
        layer = stage["calibration_layer"]
        assert set(layer) == {label for label in labels if not label.endswith("+ts")}
        probs = load_file(str(next((folder / "eval").glob("*.probs.safetensors"))))
        for label, fit in layer.items():  # each calibrated row is its row's p̄^(1/T), renormalised
            assert fit["n"] == K and fit["T"] > 0
            expected = torch.softmax(probs[f"probs/{label}"].log() / fit["T"], -1)
            torch.testing.assert_close(probs[f"probs/{label}+ts"], expected)
    posthoc = finished["ivon"][1]["posthoc"]
    nll_by_tau = posthoc["calibration_nll_by_tau"]
    assert posthoc["tau_star"] == min((v, float(t)) for t, v in nll_by_tau.items())[1]
    assert nll_by_tau.keys() == {"0.0", "0.5", "1.0"}


def test_a_reloaded_run_predicts_the_same_calibrated_rows(finished):
    from varlora.train import evaluate_run

    folder, summary = finished["ivon"]
    record = json.loads(next((folder / "eval").glob("*.json")).read_text())
    saved = {r["label"]: r["metrics"] for r in record["predictions"]}
    session, method = load_run(folder)
    assert method.tau_star == summary["posthoc"]["tau_star"]
    predictions, _ = evaluate_run(session, method, log=_quiet)
    assert {p.label for p in predictions} == saved.keys()
    for p in predictions:
        assert p.metrics["nll"] == pytest.approx(saved[p.label]["nll"], rel=1e-12), p.label


# ------------------------------------------------------------------------------------- the posterior scale


def test_the_posterior_scale_rule_reproduces_the_tuned_setting_and_scales_with_data_and_width():
    ess, h0 = posterior_scale_rule(IVONArgs(), n_train=256, width=576)
    assert ess == pytest.approx(5e4) and h0 == pytest.approx(0.02)  # the tune-rule-cpu fit
    ess, h0 = posterior_scale_rule(IVONArgs(), n_train=64, width=576)
    assert ess == pytest.approx(1.25e4) and (ess * h0) ** -0.5 == pytest.approx(AUTO_SIGMA_SCALE / 576**0.5)
    tuned = IVONArgs(ess_per_example=1e5 / 64)  # the tune-ivon-cpu winner: ess 1e5, h0 0.01 at N = 64
    assert posterior_scale_rule(tuned, n_train=64, width=576) == pytest.approx((1e5, 0.01))
    paper = IVONArgs(ess=1e6, sigma_scale=(4096 / 1e3) ** 0.5)  # Llama-2-7B, ARC: ess 1e6, h0 1e-3
    assert posterior_scale_rule(paper, n_train=2251, width=4096) == pytest.approx((1e6, 1e-3))
    assert posterior_scale_rule(IVONArgs(ess=3.0, hess_init=0.2), n_train=10, width=8) == (3.0, 0.2)
    assert AUTO_ESS_PER_EXAMPLE * 256 == pytest.approx(5e4)
    with pytest.raises(ConfigError, match=r"ivon.hess_init=auto: the rule gives h0"):
        posterior_scale_rule(IVONArgs(weight_decay=1.0), n_train=64, width=576)


def test_ess_and_hess_init_take_a_number_or_auto_from_the_cli_and_recipes(tmp_path):
    args = build_parser().parse_args(["train", "--run-dir", str(tmp_path), "--ivon.ess", "auto",
                                      "--ivon.hess_init", "1e-3"])
    config = config_from_args(args)
    assert config.method_args("ivon").ess == "auto" and config.method_args("ivon").hess_init == 1e-3
    assert RunConfig.from_dict({"ivon": {"ess": "1e7"}}).method_args("ivon").ess == 1e7  # YAML 1.1 reads a string
    for bad in ("big", True, [1.0]):
        with pytest.raises(ConfigError, match="ivon.ess"):
            RunConfig.from_dict({"ivon": {"ess": bad}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--run-dir", str(tmp_path), "--ivon.ess", "lots"])
