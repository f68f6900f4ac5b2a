"""Where a resumable experiment stands (``varlora experiment PRESET --status``), without running anything.

Each run of the preset is in one state: recorded in ``<results>/runs`` (done, :mod:`varlora.run_records`),
finished in its run folder but not yet recorded, running in another process (it holds the folder's claim),
started (a folder with a checkpoint or a saved ``final/``, which a rerun continues), or pending. The compute
still needed is estimated from the finished runs: an unfinished run costs the mean of the finished runs of the
same task and variant, else of the same variant on any task (a lower bound where the task evaluates more sets,
e.g. OBQA's out-of-distribution ones), counting the seconds each run spent itself (a post-hoc run's reused MAP
training is counted once, in the MAP run).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from varlora import run_records
from varlora.checkpoint import find_checkpoint
from varlora.experiment import in_progress_elsewhere, load_preset, run_configs, run_folder
from varlora.run_paths import RunPaths

__all__ = ["study_status", "run_seconds"]

SYMBOLS = {"recorded": "✓", "finished": "f", "running": "▶", "started": "~", "pending": "·"}


def run_seconds(summary: dict) -> float:
    """The seconds a finished run spent itself: its training (unless it reused another run's adapter), its
    post-hoc fit and its evaluations."""
    cost = summary["cost"]
    own_training = cost["train_seconds"] if summary.get("trained_in", "this run") == "this run" else 0.0
    return own_training + cost.get("fit_seconds", 0.0) + sum(cost["eval_seconds"].values())


def _state(folder: Path, record: Path) -> str:
    if run_records.is_recorded(record):
        return "recorded"
    if (folder / "summary.json").is_file():
        return "finished"
    if in_progress_elsewhere(folder):
        return "running"
    if find_checkpoint(RunPaths(folder)) is not None or (folder / "final").is_dir():
        return "started"
    return "pending"


def study_status(preset_name: str, out: str | None = None, results: str | None = None,
                 tasks: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                 variants: Sequence[str] | None = None) -> str:
    """A grid per seed (tasks × variants, one symbol per run), the count of each state and the estimated
    single-process hours still needed."""
    preset = load_preset(preset_name)
    out_dir = Path(out or f"runs/experiment-{preset.name}")
    records = Path(results or f"results/experiment-{preset.name}") / run_records.RECORDS_FOLDER
    runs = run_configs(preset, tasks, seeds, variants=variants)
    states, spent = {}, {}
    for task, variant, seed, _ in runs:
        record = run_folder(records, task, variant, seed)
        folder = run_folder(out_dir, task, variant, seed)
        state = states[(task, variant, seed)] = _state(folder, record)
        if state in ("recorded", "finished"):
            summary = (record if state == "recorded" else folder) / "summary.json"
            spent[(task, variant, seed)] = run_seconds(json.loads(summary.read_text()))

    def estimate(task: str, variant: str) -> float | None:
        for same in (lambda t, v: (t, v) == (task, variant), lambda t, v: v == variant):
            seconds = [s for (t, v, _), s in spent.items() if same(t, v)]
            if seconds:
                return statistics.fmean(seconds)
        return None

    shown_variants = [v for v in preset.variants if any(v == r[1] for r in runs)]
    width = max(len(t) for t in preset.tasks)
    lines = [f"{preset.name}: " + "  ".join(f"{s} {k}" for k, s in SYMBOLS.items()), ""]
    for seed in dict.fromkeys(r[2] for r in runs):
        lines.append(f"seed {seed}".ljust(width) + "  " + " ".join(shown_variants))
        for task in dict.fromkeys(r[0] for r in runs):
            cells = [(SYMBOLS[states[(task, v, seed)]] if (task, v, seed) in states else "").center(len(v))
                     for v in shown_variants]
            lines.append((task.ljust(width) + "  " + " ".join(cells)).rstrip())
        lines.append("")
    counts = {k: sum(s == k for s in states.values()) for k in SYMBOLS}
    remaining = [estimate(t, v) for (t, v, _), s in states.items() if s not in ("recorded", "finished")]
    known = [s for s in remaining if s is not None]
    lines.append(", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" of {len(states)} runs; "
                 f"the finished ones took {sum(spent.values()) / 3600:.1f} h of one process")
    if remaining:
        unknown = len(remaining) - len(known)
        lines.append(f"still needed: about {sum(known) / 3600:.1f} h of one process for {len(known)} run(s) "
                     "(from the finished runs' own seconds)"
                     + (f", plus {unknown} run(s) of variants with no finished run yet" if unknown else ""))
    return "\n".join(lines)
