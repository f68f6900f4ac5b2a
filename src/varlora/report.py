"""Collect finished runs into the paper's tables (ACC %, ECE %, NLL per task and their average) and figures.

A run folder is the one written by :func:`varlora.train.train_run`. Aggregation over seeds reports the
mean ± standard error (sample std / √n_seeds), as Cong et al. (2024) do in Table 1.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from varlora import _io, plots
from varlora.run_paths import RunPaths

__all__ = ["RunResult", "find_runs", "aggregate", "markdown_table", "csv_table", "write_figures"]

METRICS = ("acc", "ece", "nll", "brier")
STANDARD_METHODS = ("adamw", "ivon@mean", "ivon")
_LABELS = {"acc": "ACC %", "ece": "ECE %", "nll": "NLL", "brier": "Brier"}


@dataclass(frozen=True)
class RunResult:
    """The final metrics of one method of one run on one evaluation task."""

    folder: Path
    train_task: str
    eval_task: str
    method: str
    seed: int
    train_seconds: float
    metrics: dict[str, float]


def find_runs(root: str | Path) -> list[RunResult]:
    """Every (run, eval task, method) under ``root`` whose ``summary.json`` exists (finished runs only)."""
    results = []
    for summary_path in sorted(Path(root).rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        for eval_task, methods in summary["results"].items():
            for method, metrics in methods.items():
                results.append(RunResult(summary_path.parent, summary["task"], eval_task, method, summary["seed"],
                                         summary["train_seconds"], metrics))
    return results


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(results: Iterable[RunResult], methods: Sequence[str], tasks: Sequence[str]) -> dict:
    """``table[method][task][metric] = (mean, se, n_seeds)``, plus an ``"average"`` column over tasks.

    The average column first averages the tasks within each seed, then takes mean ± s.e. over seeds, and
    only counts seeds that have every task (otherwise it is absent).
    """
    by_key: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for r in results:
        if r.eval_task == r.train_task:
            by_key[(r.method, r.train_task)][r.seed] = r.metrics | {"train_seconds": r.train_seconds}
    table: dict = {}
    for method in methods:
        table[method] = {}
        for task in tasks:
            seeds = by_key.get((method, task), {})
            if seeds:
                table[method][task] = {m: (*_mean_se([s[m] for s in seeds.values()]), len(seeds))
                                       for m in (*METRICS, "train_seconds")}
        complete = set.intersection(*(set(by_key.get((method, t), {})) for t in tasks)) if tasks else set()
        if complete and len(tasks) > 1:
            per_seed = {m: [sum(by_key[(method, t)][s][m] for t in tasks) / len(tasks) for s in sorted(complete)]
                        for m in (*METRICS, "train_seconds")}
            table[method]["average"] = {m: (*_mean_se(v), len(complete)) for m, v in per_seed.items()}
    return table


def _fmt(cell: tuple[float, float, int] | None, metric: str) -> str:
    if cell is None:
        return "–"
    mean, se, _ = cell
    digits = 2 if metric in ("nll", "brier") else 1
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def markdown_table(table: dict, tasks: Sequence[str], metrics: Sequence[str] = ("acc", "ece", "nll")) -> str:
    """One block per metric, methods as rows and tasks (+ average) as columns, like Cong et al. Table 1."""
    columns = [*tasks, "average"] if len(tasks) > 1 else list(tasks)
    lines = []
    for metric in metrics:
        lines.append(f"| {_LABELS[metric]} | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for method, cells in table.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(cells.get(c, {}).get(metric), metric)
                                                      for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def csv_table(table: dict) -> str:
    """Long format: method, task, metric, mean, se, n_seeds."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "task", "metric", "mean", "se", "n_seeds"])
    for method, cells in table.items():
        for task, metrics in cells.items():
            for metric, (mean, se, n) in metrics.items():
                writer.writerow([method, task, metric, f"{mean:.6g}", "" if math.isnan(se) else f"{se:.6g}", n])
    return buffer.getvalue()


def _eval_rows(folder: Path) -> list[dict]:
    return [r for r in _io.read_jsonl(folder / "metrics.jsonl") if r.get("kind") == "eval"]


def write_figures(results: Sequence[RunResult], out: str | Path, n_bins: int = 10) -> list[Path]:
    """Reliability diagrams (pooled over tasks and seeds), the τ trade-off and accuracy-vs-time PNGs."""
    out = Path(out)
    written = []
    in_domain = [r for r in results if r.eval_task == r.train_task]
    pooled: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for r in in_domain:
        if r.method in STANDARD_METHODS:
            tensors = load_file(str(RunPaths(r.folder).eval_probs(r.train_task)))
            confidence, prediction = tensors[f"probs/{r.method}"].max(dim=-1)
            pooled[r.method][0].append(confidence)
            pooled[r.method][1].append(prediction == tensors["labels"])
    if pooled:
        data = {m: (torch.cat(pooled[m][0]), torch.cat(pooled[m][1])) for m in STANDARD_METHODS if m in pooled}
        written.append(plots.reliability_diagrams(data, out / "reliability.png", n_bins=n_bins,
                                                  title="pooled over tasks and seeds (top-label confidence)"))
    curves, baselines, curve_seeds = _tau_curves(in_domain)
    if curves:
        title = f"seeds {sorted(curve_seeds)}: those that evaluated every τ (means over them)"
        written.append(plots.tau_tradeoff(curves, out / "tau_tradeoff.png", baselines, title=title))
    time_curves, styles = {}, {}
    seeds = sorted({r.seed for r in in_domain})
    for r in sorted(in_domain, key=lambda r: (r.train_task, r.method != "adamw", r.seed)):
        if r.method in ("adamw", "ivon@mean"):
            label = f"{r.train_task} {'AdamW' if r.method == 'adamw' else 'IVON@mean'} (seed {r.seed})"
            rows = _eval_rows(r.folder)
            if rows:
                time_curves[label] = rows
                styles[label] = {"color": "C3" if r.method == "adamw" else "C0",
                                 "linestyle": ("-", "--", ":", "-.")[seeds.index(r.seed) % 4]}
    if time_curves:
        written.append(plots.accuracy_vs_time(time_curves, out / "accuracy_vs_time.png", styles=styles))
    return written


def _tau_curves(results: Sequence[RunResult]) -> tuple[dict[str, list[dict]], dict[str, dict], set[int]]:
    """Per task, IVON's metrics at each τ and AdamW's, averaged over the seeds that evaluated every τ of the
    task (a τ evaluated by one seed only must not be compared with means over several), and those seeds."""
    curves: dict[str, list[dict]] = {}
    baselines: dict[str, dict] = {}
    used: set[int] = set()
    for task in sorted({r.train_task for r in results}):
        rows = [r for r in results if r.train_task == task]
        by_seed: dict[int, dict[float, dict]] = defaultdict(dict)
        for r in rows:
            tau = _tau_of(r.method)
            if tau is not None:
                by_seed[r.seed][tau] = r.metrics
        all_taus = {tau for taus in by_seed.values() for tau in taus}
        seeds = {seed for seed, taus in by_seed.items() if set(taus) == all_taus}
        if len(all_taus) < 2:
            continue
        used |= seeds
        curves[task] = [{"tau": t, **{m: statistics.fmean(by_seed[s][t][m] for s in seeds)
                                      for m in ("acc", "nll", "ece")}} for t in sorted(all_taus)]
        adamw = [r.metrics for r in rows if r.method == "adamw" and r.seed in seeds]
        if adamw:
            baselines[task] = {m: statistics.fmean(x[m] for x in adamw) for m in ("acc", "nll", "ece")}
    return curves, baselines, used


def _tau_of(method: str) -> float | None:
    """τ of a standard IVON method name (see :func:`varlora.evaluate.method_name`), None for any other."""
    if method == "ivon@mean":
        return 0.0
    if method == "ivon":
        return 1.0
    if method.startswith("ivon[tau=") and method.endswith("]"):
        return float(method.removeprefix("ivon[tau=").removesuffix("]"))
    return None

