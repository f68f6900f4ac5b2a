"""Run records: an experiment continues from its committed results when the run folders are gone."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import build_assets
from varlora import run_records
from varlora.config import ConfigError, RunConfig
from varlora.experiment import run_experiment
from varlora.tasks import jsonl_task, register_task

TASK = "colours_records"


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A two-variant preset on a registered tiny task: a MAP run and temperature scaling, post-hoc on it."""
    folder = tmp_path_factory.mktemp("records_assets")
    assets = build_assets(folder)
    train, validation = (spec.split("=")[1] for spec in assets["task"].removeprefix("jsonl:").split(","))
    register_task(jsonl_task(train, validation, name=TASK), overwrite=True)
    path = folder / "preset.yaml"
    path.write_text(
        "description: records\n"
        f"base: {{model: {{name: {assets['model']}}}, lora: {{r: 2, alpha: 4}}, "
        "data: {scoring: cloze, max_length: 64, train_limit: 24}, train: {steps: 3, batch_size: 4}, "
        "eval: {n_samples: 2, batch_size: 8}, adamw: {lr: 0.01}}\n"
        "variants: {map: {method: {name: adamw}}, t: {method: {name: temperature}, temperature: {holdout: 8}}}\n"
        f"tasks: {{{TASK}: null}}\nseeds: [5]\n")
    return str(path)


def _record(root, variant):
    return root / "results" / "runs" / TASK / variant / "seed5"


def test_a_study_continues_from_its_records_without_the_run_folders(preset, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    run_experiment(preset, out=str(runs), results=str(results), log=lambda _: None)
    for variant in ("map", "t"):
        record = _record(tmp_path, variant)
        assert run_records.is_recorded(record)
        assert sorted(p.name for p in (record / "eval").iterdir()) == [f"{TASK}.json", f"{TASK}.probs.safetensors"]
        assert not (record / "final").exists() and not (record / "checkpoint.pt").exists()  # no adapters
    table = (results / "table.md").read_text()
    summaries = {v: (_record(tmp_path, v) / "summary.json").read_text() for v in ("map", "t")}

    # a new machine: the run folders are gone, the committed results remain; nothing is trained again
    shutil.rmtree(runs)
    logged: list[str] = []
    run_experiment(preset, out=str(runs), results=str(results), log=logged.append)
    assert not runs.exists() and (results / "table.md").read_text() == table
    assert not any("→" in line for line in logged)

    # the post-hoc run was lost before it was recorded: its MAP run is trained again first, reproducing the record
    shutil.rmtree(_record(tmp_path, "t"))
    logged.clear()
    run_experiment(preset, out=str(runs), results=str(results), log=logged.append)
    assert any("recorded, but its adapter is not in" in line for line in logged)
    assert not any("warning" in line for line in logged)
    assert (runs / TASK / "map" / "seed5" / "summary.json").is_file()
    for variant in ("map", "t"):
        assert json.loads((_record(tmp_path, variant) / "summary.json").read_text())["results"] == \
            json.loads(summaries[variant])["results"]


def test_a_record_refuses_a_changed_config_and_names_the_field(preset, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    run_experiment(preset, out=str(runs), results=str(results), variants=["map"], log=lambda _: None)
    with pytest.raises(ConfigError, match=r"records a run with another config \(adamw.lr: saved 0.01, given 0.5\)"):
        run_experiment(preset, out=str(runs), results=str(results), variants=["map"],
                       overrides={"adamw": {"lr": 0.5}}, log=lambda _: None)
    saved = RunConfig.load(_record(tmp_path, "map") / "config.json")
    assert saved.difference(saved) == ""


def test_only_a_finished_run_is_recorded(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="not a finished run"):
        run_records.record_run(tmp_path / "run", tmp_path / "record")
    assert not (tmp_path / "record").exists()


def test_git_keeps_the_records_and_ignores_the_run_folders():
    """The records exist to be committed: an ignore rule for ``runs/`` must not reach ``results/*/runs/``."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0

    assert not ignored("results/experiment-cpu/runs/arc_easy/adamw/seed21/summary.json")
    assert ignored("runs/experiment-cpu/arc_easy/adamw/seed21/checkpoint.pt")
