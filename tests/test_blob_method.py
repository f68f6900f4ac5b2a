"""The ``blob`` method on a tiny random Llama: a σ = 0 step is a MAP step, the KL step, state_dict resume,
save / reload / re-evaluate bit for bit, and its two rows."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_assets
from varlora.checkpoint import rng_state, set_rng_state
from varlora.config import ConfigError, RunConfig
from varlora.methods import build_method
from varlora.methods.blob import BLOB_FILE, BLoBArgs
from varlora.session import setup


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("blob_assets"), n_train=40, n_val=12)


def run_config(assets, method: str, **sections) -> RunConfig:
    base = {
        "model": {"name": assets["model"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64, "train_limit": 16},
        "train": {"steps": 4, "batch_size": 4, "grad_accum": 2, "max_grad_norm": 1.0, "seed": 3},
        "eval": {"n_samples": 3, "batch_size": 5, "seed": 11},
        "method": {"name": method},
        "adamw": {"lr": 1e-2},
        "blob": {"lr": 1e-2, "init_eps": 0.3, "kl_weighting": "uniform", "kl_period": 4},
    }
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value
    return RunConfig.from_dict(base)


def started(config: RunConfig, folder: Path):
    session = setup(config, folder)
    session.model.train()
    method = build_method(session)
    method.setup()
    return session, method


def lora_state(session, method=None) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in session.params.items()}
    if method is not None and getattr(method, "posterior", None) is not None:
        state |= {f"rho:{n}": p.detach().clone() for n, p in method.posterior.named_rho().items()}
    return state


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kl", [{"kl_lr": 0.0}, {"kl_weighting": "blundell", "kl_period": 2000}],
                         ids=["kl_lr-0", "pi-underflows"])
def test_step_with_zero_variance_is_a_map_step(assets, tmp_path, kl):
    """ρ = 0 makes the flipout term exactly 0; with the KL step off, BLoB's update is AdamW's, bit for bit
    (dropout on: BLoB's noise comes from its own generator, so the dropout masks are the same)."""
    s_map, m_map = started(run_config(assets, "adamw"), tmp_path / "map")
    s_blob, m_blob = started(run_config(assets, "blob", blob=kl), tmp_path / "blob")
    with torch.no_grad():
        for rho in m_blob.posterior.rho.values():
            rho.zero_()
    assert_equal_states(lora_state(s_map), lora_state(s_blob))
    losses = {}
    for method in (m_map, m_blob):
        torch.manual_seed(99)  # the same dropout masks for both
        losses[method.name] = [method.train_step(step).loss for step in range(3)]
    assert losses["adamw"] == losses["blob"]
    assert_equal_states(lora_state(s_map), lora_state(s_blob))
    assert all(torch.equal(rho, torch.zeros_like(rho)) for rho in m_blob.posterior.rho.values())


def test_kl_step_is_sgd_on_pi_kl_after_the_adamw_step(assets, tmp_path):
    """With ρ = 0 (no noise, no ρ gradient): A ← A_adamw − kl_lr · π · A_adamw / β², B as AdamW leaves it."""
    cfg = run_config(assets, "blob", blob={"kl_lr": 0.5, "prior_std": 0.5})
    s_map, m_map = started(run_config(assets, "adamw"), tmp_path / "map")
    s_blob, m_blob = started(cfg, tmp_path / "blob")
    with torch.no_grad():
        for rho in m_blob.posterior.rho.values():
            rho.zero_()
    torch.manual_seed(99)
    m_map.train_step(0)
    torch.manual_seed(99)
    result = m_blob.train_step(0)
    pi = 1 / 4  # uniform, period 4
    assert result.stats["kl_weight"] == pi
    for name, p_map in s_map.params.items():
        p_blob = s_blob.params[name]
        expected = p_map - 0.5 * pi * p_map / 0.25 if "lora_A" in name else p_map
        torch.testing.assert_close(p_blob, expected, rtol=1e-6, atol=1e-8)


def test_training_moves_rho_and_logs_the_kl(assets, tmp_path):
    session, method = started(run_config(assets, "blob"), tmp_path)
    before = {n: p.detach().clone() for n, p in method.posterior.named_rho().items()}
    result = method.train_step(0)
    assert {"lr", "kl", "kl_weight", "sigma_mean", "sigma_max"} <= set(result.stats)
    assert 0 < result.stats["kl"] < float("inf") and result.stats["kl_weight"] == 1 / 4
    assert any(not torch.equal(before[n], p) for n, p in method.posterior.named_rho().items())
    # ρ is not a model parameter: the peft adapter keys are the plain LoRA A/B
    assert all("rho" not in key for key in session.model.state_dict())


def test_state_dict_resumes_bit_for_bit(assets, tmp_path):
    cfg = run_config(assets, "blob")
    s_full, m_full = started(cfg, tmp_path / "full")
    for step in range(4):
        m_full.train_step(step)

    s_a, m_a = started(cfg, tmp_path / "a")
    for step in range(2):
        m_a.train_step(step)
    buffer = io.BytesIO()
    torch.save({"method": m_a.state_dict(), "rng": rng_state()}, buffer)
    for step in range(2, 4):  # the killed run goes on and draws more noise: the checkpoint must not care
        m_a.train_step(step)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    s_b, m_b = started(cfg, tmp_path / "b")
    m_b.load_state_dict(saved["method"])
    set_rng_state(saved["rng"])
    for step in range(2, 4):
        m_b.train_step(step)
    assert_equal_states(lora_state(s_full, m_full), lora_state(s_b, m_b))
    assert m_full.kl_scheduler.state_dict() == m_b.kl_scheduler.state_dict()


def test_rows_save_reload_and_reevaluate_bit_for_bit(assets, tmp_path):
    cfg = run_config(assets, "blob")
    session, method = started(cfg, tmp_path / "run")
    for step in range(3):
        method.train_step(step)
    rows = method.predict(session.val_examples, session.scorer)
    assert [r.label for r in rows] == ["blob", "blob@mean"]
    sampled, mean = rows
    assert (sampled.n_samples, sampled.forward_passes) == (3, 3)
    assert (mean.n_samples, mean.forward_passes) == (0, 1)
    assert sampled.sample_probs.shape == (3, len(session.val_examples), 4)
    assert not torch.equal(sampled.sample_probs[0], sampled.sample_probs[1])
    torch.testing.assert_close(sampled.probs, sampled.sample_probs.mean(0))
    again = method.predict(session.val_examples, session.scorer)  # same eval seed, same noise
    assert torch.equal(again[0].probs, sampled.probs) and torch.equal(again[1].probs, mean.probs)

    folder = tmp_path / "final"
    method.save(folder)
    assert (folder / BLOB_FILE).is_file() and (folder / "adapter_model.safetensors").is_file()
    # the report's σ / |m| reads σ = ρ² back without a model, keyed like the saved adapter's A matrices
    saved_std = type(method).saved_std(folder)
    adapter_a = {n for n in load_file(str(folder / "adapter_model.safetensors")) if ".lora_A." in n}
    assert set(saved_std) == adapter_a
    for name, rho in method.posterior.named_rho().items():
        assert torch.equal(saved_std[f"{name}.lora_A.weight"], rho.detach().square())
    fresh_session = setup(cfg, tmp_path / "run", need_train=False)
    fresh = build_method(fresh_session)
    fresh.load(folder)  # as varlora eval does: no setup()
    reloaded = fresh.predict(session.val_examples, fresh_session.scorer)
    for a, b in zip(rows, reloaded, strict=True):
        assert a.label == b.label
        assert torch.equal(a.probs, b.probs)


def test_load_reports_a_missing_or_foreign_file(assets, tmp_path):
    cfg = run_config(assets, "blob")
    session, method = started(cfg, tmp_path / "run")
    method.save(tmp_path / "final")
    (tmp_path / "final" / BLOB_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=BLOB_FILE):
        build_method(setup(cfg, tmp_path / "run", need_train=False)).load(tmp_path / "final")
    (tmp_path / "final" / BLOB_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unreadable"):
        build_method(setup(cfg, tmp_path / "run", need_train=False)).load(tmp_path / "final")


def test_extra_bytes_count_rho(assets, tmp_path):
    session, method = started(run_config(assets, "blob"), tmp_path)
    n_a = sum(p.numel() for n, p in session.params.items() if "lora_A" in n)
    assert method.extra_bytes()["extra_param_bytes"] == 4 * n_a


@pytest.mark.parametrize(("field", "value"), [("kl_weighting", "cosine"), ("init_eps", 0.0), ("kl_lr", -1.0),
                                              ("prior_std", 0.0), ("kl_period", -1)])
def test_args_are_validated(field, value):
    with pytest.raises(ConfigError, match=f"blob.{field}"):
        BLoBArgs(**{field: value})


def test_tuning_preset_runs_blob_variants():
    from varlora.experiment import load_preset, run_configs

    preset = load_preset("tune-blob-cpu")
    runs = run_configs(preset)
    assert len(runs) == len(preset.variants) >= 5
    for _, _, _, config in runs:
        assert config.method.name == "blob"
        assert config.data.holdout is not None  # held-out training questions, never the validation split
        # the study's regime (and the IVON sweep's): 64 training questions, 100 steps of batch 4
        assert (config.data.train_limit, config.train.steps, config.train.batch_size) == (64, 100, 4)
    assert {c.method_args("blob").kl_period for *_, c in runs} >= {0, 40}
