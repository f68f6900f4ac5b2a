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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from varlora import _io, plots
from varlora.run_paths import RunPaths

__all__ = ["RunResult", "find_runs", "aggregate", "markdown_table", "csv_table", "write_figures"]

METRICS = ("acc", "ece", "nll", "brier")
_LABELS = {"acc": "ACC %", "ece": "ECE %", "nll": "NLL", "brier": "Brier"}


@dataclass(frozen=True)
class RunResult:
    """The final metrics of one prediction row of one run on one evaluation task, and how it was made.

    ``method`` is the registry name of the run's method, ``row`` the label the run gave the prediction,
    ``variant`` the experiment variant (the method's name outside experiments) and ``label`` the row's name in
    tables (``row``, prefixed with the variant when the variant is not named after the method);
    ``tau``/``n_samples``/``forward_passes`` come from the prediction, ``cost`` from the run's summary.
    """

    folder: Path
    train_task: str
    eval_task: str
    label: str
    seed: int
    train_seconds: float
    metrics: dict[str, float]
    method: str = ""
    tau: float | None = None
    n_samples: int = 1
    forward_passes: int = 1
    cost: dict = field(default_factory=dict, hash=False, compare=False)
    row: str = ""
    variant: str = ""

    def in_variant(self, variant: str) -> RunResult:
        """This result as a row of experiment variant ``variant``."""
        label = self.row if variant == self.method else f"{variant} {self.row}"
        return replace(self, variant=variant, label=label)


def find_runs(root: str | Path) -> list[RunResult]:
    """Every (run, eval task, prediction row) under ``root`` whose ``summary.json`` exists (finished runs)."""
    results = []
    for summary_path in sorted(Path(root).rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        for eval_task, rows in summary["rows"].items():
            metrics = summary["results"][eval_task]
            for row in rows:
                results.append(RunResult(summary_path.parent, summary["task"], eval_task, row["label"],
                                         summary["seed"], summary["train_seconds"], metrics[row["label"]],
                                         method=row["method"], tau=row["tau"], n_samples=row["n_samples"],
                                         forward_passes=row["forward_passes"], cost=summary["cost"],
                                         row=row["label"], variant=summary["method"]))
    return results


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(results: Iterable[RunResult], methods: Sequence[str], tasks: Sequence[str]) -> dict:
    """``table[label][task][metric] = (mean, se, n_seeds)`` for the row labels ``methods``, plus an
    ``"average"`` column over tasks.

    The average column first averages the tasks within each seed, then takes mean ± s.e. over seeds, and
    only counts seeds that have every task (otherwise it is absent).
    """
    by_key: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for r in results:
        if r.eval_task == r.train_task:
            by_key[(r.label, r.train_task)][r.seed] = r.metrics | {"train_seconds": r.train_seconds}
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


def _color(result: RunResult) -> str:
    from varlora.methods import get_method

    return get_method(result.method).color if result.method else "C7"


def default_rows(results: Sequence[RunResult]) -> list[RunResult]:
    """The rows shown in per-method figures: all but the intermediate τ of a τ sweep."""
    return [r for r in results if r.tau is None or r.tau in (0.0, 1.0)]


def write_figures(results: Sequence[RunResult], out: str | Path, n_bins: int = 10,
                  order: Sequence[str] | None = None) -> list[Path]:
    """Reliability diagrams (pooled over tasks and seeds), the τ trade-off and accuracy-vs-time PNGs."""
    out = Path(out)
    written = []
    in_domain = [r for r in results if r.eval_task == r.train_task]
    pooled: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for r in default_rows(in_domain):
        tensors = load_file(str(RunPaths(r.folder).eval_probs(r.train_task)))
        confidence, prediction = tensors[f"probs/{r.row}"].max(dim=-1)
        pooled[r.label][0].append(confidence)
        pooled[r.label][1].append(prediction == tensors["labels"])
    if pooled:
        labels = [m for m in (order or sorted(pooled)) if m in pooled]
        data = {m: (torch.cat(pooled[m][0]), torch.cat(pooled[m][1])) for m in labels}
        written.append(plots.reliability_diagrams(data, out / "reliability.png", n_bins=n_bins,
                                                  title="pooled over tasks and seeds (top-label confidence)"))
    curves, baselines, curve_seeds = _tau_curves(in_domain)
    if curves:
        title = f"seeds {sorted(curve_seeds)}: those that evaluated every τ (means over them)"
        written.append(plots.tau_tradeoff(curves, out / "tau_tradeoff.png", baselines, title=title))
    time_curves, styles = {}, {}
    seeds = sorted({r.seed for r in in_domain})
    seen: set[Path] = set()
    for r in sorted(in_domain, key=lambda r: (r.train_task, r.label, r.seed)):
        if r.folder in seen or r.cost.get("trained_in", "this run") != "this run":
            continue
        seen.add(r.folder)
        rows = _eval_rows(r.folder)
        if rows:
            label = f"{r.train_task} {r.variant} (seed {r.seed})"
            time_curves[label] = rows
            styles[label] = {"color": _color(r), "linestyle": ("-", "--", ":", "-.")[seeds.index(r.seed) % 4]}
    if time_curves:
        written.append(plots.accuracy_vs_time(time_curves, out / "accuracy_vs_time.png", styles=styles))
    return written


def _tau_curves(results: Sequence[RunResult]) -> tuple[dict[str, list[dict]], dict[str, dict], set[int]]:
    """Per task (and variant), the metrics at each τ, averaged over the seeds that evaluated every τ of the
    task (a τ evaluated by one seed only must not be compared with means over several), the MAP method's
    metrics over the same seeds, and those seeds."""
    from varlora.methods import get_method

    curves: dict[str, list[dict]] = {}
    baselines: dict[str, dict] = {}
    used: set[int] = set()
    for task in sorted({r.train_task for r in results}):
        rows = [r for r in results if r.train_task == task]
        variants = sorted({r.variant for r in rows if r.tau is not None})
        for variant in variants:
            by_seed: dict[int, dict[float, dict]] = defaultdict(dict)
            for r in rows:
                if r.tau is not None and r.variant == variant:
                    by_seed[r.seed][r.tau] = r.metrics
            all_taus = {tau for taus in by_seed.values() for tau in taus}
            seeds = {seed for seed, taus in by_seed.items() if set(taus) == all_taus}
            if len(all_taus) < 2:
                continue
            used |= seeds
            key = task if len(variants) == 1 else f"{task} {variant}"
            curves[key] = [{"tau": t, **{m: statistics.fmean(by_seed[s][t][m] for s in seeds)
                                         for m in ("acc", "nll", "ece")}} for t in sorted(all_taus)]
            maps = [r.metrics for r in rows if r.method and get_method(r.method).role == "map" and r.seed in seeds]
            if maps:
                baselines[key] = {m: statistics.fmean(x[m] for x in maps) for m in ("acc", "nll", "ece")}
    return curves, baselines, used


def rank_table(table: dict, tasks: Sequence[str], metrics: Sequence[str] = ("acc", "ece", "nll")) -> str:
    """Mean rank of each row across ``tasks`` (ties share the mean rank; rows missing a task are not ranked
    on it), one column per metric: accuracy ranks high-to-low, ECE/NLL/Brier low-to-high."""
    lines = ["| method | " + " | ".join(f"rank {_LABELS[m]}" for m in metrics) + " | tasks |",
             "|---|" + "---|" * (len(metrics) + 1)]
    ranks: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task in tasks:
        for metric in metrics:
            cells = {label: cells[task][metric][0] for label, cells in table.items() if task in cells}
            sign = -1.0 if metric == "acc" else 1.0
            values = sorted(sign * v for v in cells.values())
            for label, value in cells.items():
                first = values.index(sign * value)
                ties = values.count(sign * value)
                ranks[label][metric].append(first + (ties + 1) / 2)
    for label in table:
        if label in ranks:
            n = len(ranks[label][metrics[0]])
            lines.append(f"| {label} | " + " | ".join(f"{statistics.fmean(ranks[label][m]):.2f}" for m in metrics)
                         + f" | {n} |")
    return "\n".join(lines) + "\n"


def cost_table(results: Sequence[RunResult], labels: Sequence[str]) -> str:
    """Per row label, means over its in-distribution runs: training seconds (and their ratio to the MAP
    method's on the same tasks and seeds), post-hoc fit seconds, evaluation seconds of the whole row's run,
    LM forward passes per example, peak memory while training and while evaluating, and the bytes of extra
    parameters and optimizer state beyond one LoRA adapter."""
    from varlora.methods import get_method

    in_domain = [r for r in results if r.eval_task == r.train_task]
    map_seconds = {(r.train_task, r.seed): r.cost["train_seconds"] for r in in_domain
                   if r.method and get_method(r.method).role == "map" and r.cost}
    lines = ["| method | training s | × MAP training | post-hoc fit s | evaluation s | forward passes / example "
             "| peak MB training | peak MB evaluation | extra params MB | optimizer state MB |",
             "|---|" + "---|" * 9]
    for label in labels:
        rows = [r for r in in_domain if r.label == label and r.cost]
        if not rows:
            continue
        cost = [r.cost for r in rows]
        ratios = [r.cost["train_seconds"] / map_seconds[(r.train_task, r.seed)] for r in rows
                  if map_seconds.get((r.train_task, r.seed))]

        def mean(values: Iterable[float]) -> float:
            return statistics.fmean(list(values))

        lines.append(
            f"| {label} | {mean(c['train_seconds'] for c in cost):.0f} | "
            + (f"{mean(ratios):.2f}" if ratios else "–")
            + f" | {mean(c['fit_seconds'] for c in cost):.1f} | "
            f"{mean(c['eval_seconds'][r.train_task] for c, r in zip(cost, rows, strict=True)):.1f} | "
            f"{rows[0].forward_passes} | {mean(c['peak_train_bytes'] for c in cost) / 2**20:.0f} | "
            f"{mean(c['peak_eval_bytes'] for c in cost) / 2**20:.0f} | "
            f"{mean(c['extra_param_bytes'] for c in cost) / 2**20:.2f} | "
            f"{mean(c['optimizer_state_bytes'] for c in cost) / 2**20:.2f} |")
    kinds = sorted({r.cost.get("memory_kind", "") for r in in_domain if r.cost})
    return "\n".join(lines) + f"\n\nPeak memory: {', '.join(kinds)} (weights included). Training seconds of a " \
        "post-hoc method are those of the MAP run whose adapter it reuses.\n"
