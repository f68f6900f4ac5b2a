"""The method harness on a tiny random Llama: one test body per registered method, and each method's own oracle.

Every method trains (if it trains), saves, reloads and re-evaluates to identical metrics; a run stopped after a
checkpoint and rerun equals the uninterrupted one bit for bit; the cost of every run is recorded.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import varlora
import varlora.cost
from conftest import assert_identical, build_assets
from varlora import _state_file, report
from varlora.checkpoint import read_checkpoint
from varlora.config import RunConfig
from varlora.methods import METHODS, Method, get_method
from varlora.methods.temperature import fit_temperature, nll_at_temperature
from varlora.run_paths import RunPaths
from varlora.session import load_adapter_weights
from varlora.train import load_run, train_run

# Per-method settings that fit the tiny data set (48 training questions, 24 of them trained on).
SECTION_OVERRIDES: dict[str, dict] = {
    "temperature": {"holdout": 16},
    "ensemble": {"members": 2},
    "tfb": {"n_anchor": 16, "search_samples": 2, "search_steps": 2},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"), n_train=48, n_val=12)


def _config(assets, method: str, **overrides) -> RunConfig:
    data = {
        "model": {"name": assets["model"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "method": {"name": method},
        "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64, "train_limit": 24},
        "train": {"steps": 4, "batch_size": 4, "grad_accum": 2, "save_every": 2, "eval_every": 2,
                  "max_grad_norm": 1.0, "seed": 3},
        "ivon": {"lr": 0.1, "ess": 1e4, "hess_init": 0.1, "beta2": 0.99, "clip_radius": 1.0},
        "adamw": {"lr": 1e-2},
        "eval": {"n_samples": 3, "taus": [0.0, 1.0], "batch_size": 5},
        **SECTION_OVERRIDES,
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return RunConfig.from_dict(data)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """One finished run per registered method (made on first use), keyed by method name."""
    root = tmp_path_factory.mktemp("runs")
    runs: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in runs:
            folder = root / name
            runs[name] = folder, train_run(_config(assets, name), folder, log=_quiet)
        return runs[name]

    return get


def _final_state(folder: Path) -> dict[str, object]:
    """Everything a run saved for prediction: every tensor of every safetensors file and every JSON file in
    final/ (stage.json aside: it holds wall-clock times)."""
    state: dict[str, object] = {}
    for path in sorted((folder / "final").rglob("*")):
        rel = str(path.relative_to(folder / "final"))
        if path.suffix == ".safetensors":
            state |= {f"{rel}:{k}": v for k, v in load_file(str(path)).items()}
        elif path.suffix == ".json" and path.name not in ("stage.json", "adapter_config.json"):
            state[rel] = json.loads(path.read_text())
    return state


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_saves_reloads_and_reevaluates_identically(name, finished):
    folder, summary = finished(name)
    cls = get_method(name)
    task = summary["task"]
    rows = summary["rows"][task]
    assert rows and all(row["method"] == name for row in rows)
    metrics = summary["results"][task]
    for row in rows:
        m = metrics[row["label"]]
        assert m["n"] == 12 and m["n_bins"] == 10 and 0 <= m["acc"] <= 100 and m["nll"] > 0
        assert ("mutual_info" in m) == (row["n_samples"] > 1)
    # the cost of the run is recorded
    cost = summary["cost"]
    assert cost["eval_seconds"][task] > 0 and cost["peak_eval_bytes"] > 0
    assert (cost["train_seconds"] > 0) == cls.trains and cost["lora_param_bytes"] > 0
    if name == "ivon":  # the posterior's σ: one float32 per LoRA weight, counted once it exists
        assert cost["extra_param_bytes"] == cost["lora_param_bytes"]
    # a method that saves a mean-field posterior has the report's σ / |m| (its σ keyed like the adapter)
    scale = report.posterior_scale(folder, name)
    assert (scale is not None) == (cls.saved_std.__func__ is not Method.saved_std.__func__)
    assert scale is None or (scale["sigma"] > 0 and scale["ratio_a"] > 0)
    # reload from final/ alone and predict again: the same metrics, exactly
    session, method = load_run(folder)
    again = {p.label: p for p in method.predict(session.val_examples, session.scorer)}
    from varlora.evaluate import finish

    for label, p in again.items():
        assert finish(p, 10).metrics == metrics[label], label
    saved = load_file(str(RunPaths(folder).eval_probs(task)))
    for label, p in again.items():
        assert torch.equal(saved[f"probs/{label}"], p.probs), label


@pytest.mark.parametrize("name", [n for n, c in METHODS.items() if c.trains])
def test_a_run_stopped_after_a_checkpoint_resumes_bit_for_bit(name, assets, finished, tmp_path, monkeypatch):
    import varlora.train as train_module

    whole, _ = finished(name)
    cut = tmp_path / "cut"
    save = train_module.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(session, method, step, seconds):
        save(session, method, step, seconds)
        if step == 2:
            raise Stop

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train_run(_config(assets, name), cut, log=_quiet)
    assert not (cut / "final").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    messages: list[str] = []
    train_run(_config(assets, name), cut, log=messages.append)
    assert any("resuming" in m and "from step 2/" in m for m in messages)
    assert_identical(_final_state(whole), _final_state(cut))

    def losses(folder: Path) -> list:
        return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    assert losses(whole) == losses(cut)


def test_an_old_pickled_checkpoint_resumes_bit_for_bit(assets, finished, tmp_path):
    """tests/data/checkpoint_pt_blob_step2.pt: the step-2 checkpoint.pt of this module's BLoB run, written by the
    pickle-based code (varlora d2e7fc9). A run folder holding it resumes from step 2 (read with
    ``weights_only=True``) and ends bit for bit like a run resumed from the same state in today's format, then
    leaves a checkpoint.safetensors instead. The file's step-2 state came from one machine's CPU: on another CPU
    (other SIMD kernels) the uninterrupted run's first two steps can round differently, so against that run the
    resumed one is compared to a tolerance only."""
    old = Path(__file__).parent / "data" / "checkpoint_pt_blob_step2.pt"
    cut, same_state = tmp_path / "cut", tmp_path / "same_state"
    cut.mkdir()
    same_state.mkdir()
    shutil.copyfile(old, cut / "checkpoint.pt")
    (same_state / "checkpoint.safetensors").write_bytes(_state_file.dumps(read_checkpoint(old)))
    messages: list[str] = []
    train_run(_config(assets, "blob"), cut, log=messages.append)
    train_run(_config(assets, "blob"), same_state, log=_quiet)
    assert any("resuming" in m and "from step 2/" in m for m in messages)
    assert_identical(_final_state(same_state), _final_state(cut))
    assert not (cut / "checkpoint.pt").exists() and (cut / "checkpoint.safetensors").is_file()

    def losses(folder: Path) -> list:
        return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    whole, _ = finished("blob")
    assert [step for step, _ in losses(cut)] == [step for step, _ in losses(whole) if step > 2]
    assert [loss for _, loss in losses(cut)] == pytest.approx([loss for step, loss in losses(whole) if step > 2],
                                                              rel=1e-4)
    resumed, uninterrupted = _final_state(cut), _final_state(whole)
    for key, value in uninterrupted.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_posthoc_methods_reuse_a_finished_map_run_exactly(assets, finished, tmp_path):
    map_folder, map_summary = finished("adamw")
    for name in (n for n, c in METHODS.items() if c.posthoc_of == "adamw"):
        reused = train_run(_config(assets, name), tmp_path / name, log=_quiet, reuse=map_folder)
        assert reused["trained_in"] == str(map_folder) and reused["train_seconds"] == map_summary["train_seconds"]
        assert reused["cost"]["optimizer_state_bytes"] == map_summary["cost"]["optimizer_state_bytes"] > 0
        own, _ = finished(name)
        assert_identical(_final_state(own), _final_state(tmp_path / name))
    # a MAP run trained differently is not reused: the post-hoc run trains its own adapter
    other = train_run(_config(assets, "temperature", adamw={"lr": 2e-2}), tmp_path / "other", log=_quiet,
                      reuse=map_folder)
    assert other["trained_in"] == "this run"


@pytest.mark.skipif(varlora.cost._malloc_trim() is None or not Path("/proc/self/clear_refs").exists(),
                    reason="needs Linux's clear_refs and glibc's malloc_trim")
def test_a_runs_memory_kind_is_the_weakest_of_its_measurements(assets, finished, tmp_path):
    """Every stage a run measures itself is measured after the heap trim; a training it reuses, or an evaluation
    it reads back after a restart, keeps the kind it was measured with (none saved: before the trim existed),
    and the run's kind is the weakest of them, so that the report can tell exact peaks from upper bounds."""
    map_folder, map_summary = finished("adamw")
    assert map_summary["cost"]["memory_kind"] == "rss_peak_trimmed"
    old_map = tmp_path / "old_map"
    shutil.copytree(map_folder, old_map)
    summary = json.loads((old_map / "summary.json").read_text())
    summary["cost"]["memory_kind"] = "rss_peak"
    (old_map / "summary.json").write_text(json.dumps(summary))
    reused = train_run(_config(assets, "temperature"), tmp_path / "temperature", log=_quiet, reuse=old_map)
    assert reused["trained_in"] == str(old_map) and reused["cost"]["memory_kind"] == "rss_peak"

    restarted = tmp_path / "restarted"
    shutil.copytree(map_folder, restarted)
    (restarted / "summary.json").unlink()
    saved_path = RunPaths(restarted).eval_json(assets["task"])
    saved = json.loads(saved_path.read_text())
    assert saved["memory_kind"] == "rss_peak_trimmed"
    del saved["memory_kind"]
    saved_path.write_text(json.dumps(saved))
    messages: list[str] = []
    again = train_run(_config(assets, "adamw"), restarted, log=messages.append)
    assert any("was evaluated before the restart; reading it" in m for m in messages)
    assert again["cost"]["memory_kind"] == "rss_peak"


def test_ensemble_probabilities_are_the_mean_of_its_members_loaded_one_by_one(assets, finished, tmp_path):
    folder, summary = finished("ensemble")
    task = summary["task"]
    members = [folder / "final", *sorted(p for p in (folder / "final").iterdir() if p.is_dir())]
    assert len(members) == 2
    session, method = load_run(finished("adamw")[0])  # a single-adapter MAP session to load each member into
    probs = []
    for member in members:
        load_adapter_weights(session.model, member)
        [row] = method.predict(session.val_examples, session.scorer)
        probs.append(row.probs)
    saved = load_file(str(RunPaths(folder).eval_probs(task)))
    torch.testing.assert_close(saved["probs/ensemble"], torch.stack(probs).mean(0), rtol=0, atol=1e-12)
    assert not torch.equal(probs[0], probs[1])  # the members differ (own initialisation and data order)


def test_mc_dropout_samples_differ_and_equal_the_map_prediction_without_dropout(assets, finished, tmp_path):
    folder, summary = finished("mc_dropout")
    samples = load_file(str(RunPaths(folder).eval_probs(summary["task"])))["sample_probs/mc-dropout"]
    assert samples.shape[0] == 3 and not torch.equal(samples[0], samples[1])
    no_dropout = {"lora": {"dropout": 0.0}}
    map_run = train_run(_config(assets, "adamw", **no_dropout), tmp_path / "map", log=_quiet)
    mc = train_run(_config(assets, "mc_dropout", **no_dropout), tmp_path / "mc", log=_quiet, reuse=tmp_path / "map")
    task = map_run["task"]
    map_probs = load_file(str(RunPaths(tmp_path / "map").eval_probs(task)))["probs/adamw"]
    mc_samples = load_file(str(RunPaths(tmp_path / "mc").eval_probs(task)))["sample_probs/mc-dropout"]
    for sample in mc_samples:
        assert torch.equal(sample, map_probs)
    assert mc["results"][task]["mc-dropout"]["nll"] == map_run["results"][task]["adamw"]["nll"]


def test_fitted_temperature_is_the_minimum_of_a_fine_grid():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    # informative but over-confident logits: the true choice gets +1 before a scale of 6
    logits = 6 * (torch.randn(200, 4, generator=generator, dtype=torch.float64)
                  + torch.nn.functional.one_hot(labels, 4))
    logits[:, 3][labels != 3] = -math.inf  # a masked choice, as the cloze scorer gives for missing choices
    fitted = fit_temperature(logits, labels)
    grid = torch.logspace(-2, 2, 40_001, dtype=torch.float64)  # spacing 0.023% in T
    nll = torch.tensor([nll_at_temperature(logits, labels, float(t)) for t in grid], dtype=torch.float64)
    best = float(grid[nll.argmin()])
    assert abs(fitted - best) < 1e-3 * best and fitted > 1.0  # over-confident logits are softened
    assert nll_at_temperature(logits, labels, fitted) <= float(nll.min()) + 1e-12


def test_temperature_is_fitted_on_held_out_training_examples_only(finished):
    folder, summary = finished("temperature")
    session, _ = load_run(folder)
    used = set(summary["posthoc"]["calibration_ids"])
    assert summary["posthoc"]["calibration_split"].startswith("train") and len(used) == 16
    assert not used & {ex.id for ex in session.val_examples}  # never an evaluation example
    config = RunConfig.load(folder / "config.json")
    from varlora.session import setup

    trained_on = {ex.id for ex in setup(config, folder).train_examples}
    assert not used & trained_on  # nor one the adapter was trained on
    assert json.loads((folder / "final" / "temperature.json").read_text())["temperature"] > 0


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_no_module_outside_methods_names_a_method():
    """Labels, colours, τ and costs come from the methods or the stored prediction fields, never from a
    branch on a method's name (the optimizer package is IVON itself, not the harness)."""
    package = Path(varlora.__file__).parent
    names = set(METHODS) | {cls.label for cls in METHODS.values()} | {"ivon@mean", "zero-shot"}
    offenders = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.parts[0] in ("methods", "optim"):
            continue
        found = _string_constants(path) & names
        if found:
            offenders[str(rel)] = sorted(found)
    assert not offenders


def test_every_method_has_its_own_plot_colour():
    """Plots draw each method in the colour its class names; two methods sharing one would be indistinguishable
    in the reliability, selective-prediction and accuracy-vs-time figures."""
    colours = {}
    for name, cls in METHODS.items():
        colours.setdefault(cls.color, []).append(name)
    assert {colour: names for colour, names in colours.items() if len(names) > 1} == {}
