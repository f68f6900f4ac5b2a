"""Smoke test on the real shared model and data: `varlora train` (IVON) then `varlora eval` reproduces it."""

import json

import pytest

from conftest import SHARED_DATA, SHARED_MODEL, requires_shared
from varlora.cli import main

pytestmark = [pytest.mark.real, requires_shared]


def test_real_model_trains_saves_and_reevaluates_exactly(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--model.name", str(SHARED_MODEL), "--data.data_dir", str(SHARED_DATA),
            "--data.task", "arc_easy", "--data.scoring", "cloze", "--data.train_limit", "8", "--data.eval_limit", "12",
            "--method.name", "ivon", "--train.steps", "2", "--train.batch_size", "4",
            "--ivon.lr", "0.03", "--ivon.ess", "1e6", "--ivon.hess_init", "0.1", "--ivon.beta2", "0.99",
            "--ivon.clip_radius", "0.01", "--eval.n_samples", "2", "--eval.batch_size", "12"]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    methods = summary["results"]["arc_easy"]
    assert set(methods) == {"ivon@mean", "ivon"} and summary["n_eval"] == 12
    assert all(0 <= m["acc"] <= 100 and m["nll"] > 0 and m["n"] == 12 for m in methods.values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and 0 <= rows[0]["clip_fraction"] <= 1  # IVON's stats: steps 1, 11, ..
    assert all(0 <= r["clip_fraction"] <= 1 for r in rows if "clip_fraction" in r)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "arc_easy: reproduces the metrics saved by training" in capsys.readouterr().out
