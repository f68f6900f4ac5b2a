"""``varlora experiment PRESET --status``: each run's state, and the hours left estimated from finished runs."""

from __future__ import annotations

from test_report import ID, M, _fake_run
from varlora._locking import claim_folder
from varlora.run_records import record_run
from varlora.study_status import run_seconds, study_status


def test_status_shows_each_state_and_estimates_from_finished_runs(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    finished = _fake_run(runs, "winogrande_s", "adamw", 21, {"winogrande_s": {"adamw": (ID, None, M, None, 1)}})
    record_run(finished, results / "runs" / "winogrande_s" / "adamw" / "seed21")
    _fake_run(runs, "arc_easy", "adamw", 21, {"arc_easy": {"adamw": (ID, None, M, None, 1)}})  # not recorded
    (runs / "winogrande_s" / "mc_dropout" / "seed21").mkdir(parents=True)
    (runs / "winogrande_s" / "mc_dropout" / "seed21" / "checkpoint.pt").write_bytes(b"")
    with claim_folder(runs / "winogrande_s" / "ivon" / "seed21") as claimed:  # another process's run
        assert claimed
        text = study_status("cpu", out=str(runs), results=str(results), tasks=["winogrande_s", "arc_easy", "obqa"],
                            seeds=[21])
    lines = text.splitlines()
    assert lines[2].split() == ["seed", "21", "zero_shot", "adamw", "ivon", "mc_dropout", "temperature",
                                "ensemble", "laplace", "blob", "tfb"]
    assert lines[3].split() == ["winogrande_s", "·", "✓", "▶", "~", "·", "·", "·", "·", "·"]
    assert lines[4].split() == ["arc_easy", "·", "f", "·", "·", "·", "·", "·", "·", "·"]
    # each fake run spent 10 s training and 2 s evaluating; no other variant has finished a run
    assert lines[5].split() == ["obqa", "·", "·", "·", "·", "·", "·", "·", "·", "·"]
    assert "1 recorded, 1 finished, 1 running, 1 started, 23 pending of 27 runs; the finished ones took 0.0 h" in text
    # OBQA's adamw run is estimated from the adamw runs of the other tasks (12 s each); nothing else can be
    assert "about 0.0 h of one process for 1 run(s)" in text and "plus 24 run(s) of variants with no" in text


def test_run_seconds_counts_a_reused_training_once():
    cost = {"train_seconds": 100.0, "fit_seconds": 5.0, "eval_seconds": {"a": 2.0, "b": 3.0}}
    assert run_seconds({"cost": cost, "trained_in": "this run"}) == 110.0
    assert run_seconds({"cost": cost, "trained_in": "runs/x/adamw/seed1"}) == 10.0
