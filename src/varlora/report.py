"""Collect finished runs into the paper's tables (ACC %, ECE %, NLL per task and their average) and figures.

A run folder is the one written by :func:`varlora.train.train_run`. Aggregation over seeds reports the
mean ± standard error (sample std / √n_seeds), as Cong et al. (2024) do in Table 1.

Beyond the saved metrics, the tables of out-of-distribution detection (:func:`ood_detection`: in-distribution =
the training task's evaluation set, scored against each other evaluated task), of selective prediction
(:func:`selective_prediction`: AURC), the maximum calibration error (:func:`with_mce`) and the posterior's
scale (:func:`posterior_scale`: σ / |m|) are computed from what the run folder saved: the probabilities of
every prediction row and ``final/``.
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

from varlora import _io, plots
from varlora.cost import EXACT_KINDS, KINDS_BY_TRUST, UNNAMED_MEMORY_KIND
from varlora.metrics import (
    accuracy_coverage_curve,
    aurc,
    auroc,
    confidence_bins,
    fpr_at_95_tpr,
    mutual_information,
    predictive_entropy,
)
from varlora.posterior import scale_over_means
from varlora.run_paths import RunPaths

__all__ = ["RunResult", "find_runs", "aggregate", "markdown_table", "csv_table", "rank_table", "cost_table",
           "training_cost_ratios", "best_within_budget", "write_figures", "ood_detection", "selective_prediction",
           "with_mce", "posterior_scale", "selected_rows", "OOD_SIGNALS", "SavedProbs", "learning_curves"]

METRICS = ("acc", "ece", "mce", "nll", "brier")
#: OOD-detection signals, each a score that is higher for more in-distribution examples
OOD_SIGNALS = {"maxprob": "max prob", "entropy": "−entropy", "mi": "−MI"}
_LABELS = {"acc": "ACC %", "ece": "ECE %", "mce": "MCE %", "nll": "NLL", "brier": "Brier", "aurc": "AURC %",
           **{f"auroc_{k}": f"AUROC % ({v})" for k, v in OOD_SIGNALS.items()},
           **{f"fpr95_{k}": f"FPR@95 % ({v})" for k, v in OOD_SIGNALS.items()}}


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


def aggregate(results: Iterable[RunResult], methods: Sequence[str], tasks: Sequence[str],
              metrics: Sequence[str] | None = None) -> dict:
    """``table[label][task][metric] = (mean, se, n_seeds)`` for the row labels ``methods``, plus an
    ``"average"`` column over tasks.

    ``metrics`` defaults to :data:`METRICS` and the training seconds. A seed counts for a metric where its
    result has it (e.g. mutual information exists for sampled rows only). The average column first averages
    the tasks within each seed, then takes mean ± s.e. over seeds, and only counts seeds that have every task
    (otherwise it is absent).
    """
    keys = tuple(metrics) if metrics is not None else (*METRICS, "train_seconds")
    by_key: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for r in results:
        if r.eval_task == r.train_task:
            by_key[(r.label, r.train_task)][r.seed] = r.metrics | {"train_seconds": r.train_seconds}
    table: dict = {}
    for method in methods:
        table[method] = {}
        for task in tasks:
            seeds = by_key.get((method, task), {})
            cells = {m: [s[m] for s in seeds.values() if m in s] for m in keys}
            if any(cells.values()):
                table[method][task] = {m: (*_mean_se(v), len(v)) for m, v in cells.items() if v}
        if len(tasks) < 2:
            continue
        average = {}
        for m in keys:
            complete = set.intersection(*({s for s, v in by_key.get((method, t), {}).items() if m in v}
                                          for t in tasks))
            if complete:
                per_seed = [sum(by_key[(method, t)][s][m] for t in tasks) / len(tasks) for s in sorted(complete)]
                average[m] = (*_mean_se(per_seed), len(complete))
        if average:
            table[method]["average"] = average
    return table


def _fmt(cell: tuple[float, float, int] | None, metric: str) -> str:
    if cell is None:
        return "–"
    mean, se, _ = cell
    digits = _digits(metric)
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def _digits(metric: str) -> int:
    """Decimals shown: 3 for NLL and Brier (on two-choice tasks every NLL lies near ln 2 = 0.693, and two
    decimals would hide the ordering), 1 for the percentages."""
    return 3 if metric in ("nll", "brier") else 1


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


def _epochs(folder: Path, steps: float) -> float:
    """Training epochs after ``steps`` steps of the run in ``folder`` (batch size × steps / training questions)."""
    summary = json.loads((folder / "summary.json").read_text())
    batch = json.loads((folder / "config.json").read_text())["train"]["batch_size"]
    return steps * batch / max(summary["n_train"], 1)


def _reuses_training(r: RunResult) -> bool:
    """Whether the run's training curve is another method's (a post-hoc method trains, or reuses, a MAP adapter)."""
    from varlora.methods import get_method

    return bool(r.method) and get_method(r.method).posthoc_of is not None


def learning_curves(results: Sequence[RunResult], probs: SavedProbs | None = None) -> str:
    """Markdown table of every run that evaluated at its mean during training (``train.eval_every``): its training
    questions N, epochs, the chance level (1/K) and the share of the most frequent answer of the evaluation
    questions, the untrained model (step 0), the evaluation with the lowest NLL, the last one, and the regime
    verdicts of issue 31: *learned* (the best accuracy at least max(chance + 10, majority + 5) points) and
    *over-fits* (the NLL ends above its minimum, reached before the last evaluation)."""
    probs = probs or SavedProbs()
    lines = ["| task | variant | seed | N | epochs | chance % | majority % | step 0 ACC / NLL | lowest NLL (epoch) "
             "| ACC there | best ACC | last ACC / NLL | learned | over-fits |", "|" + "---|" * 14]
    seen: set[Path] = set()
    for r in sorted(results, key=lambda r: (r.train_task, r.variant, r.seed)):
        if r.folder in seen or r.eval_task != r.train_task or _reuses_training(r):
            continue
        seen.add(r.folder)
        rows = _eval_rows(r.folder)
        if len(rows) < 2:
            continue
        labels = probs.get(r.folder, r.eval_task)["labels"]
        k = int(probs.get(r.folder, r.eval_task)[f"probs/{r.row}"].shape[-1])
        chance, majority = 100.0 / k, 100.0 * float(torch.bincount(labels, minlength=k).max()) / len(labels)
        lowest = min(rows, key=lambda row: row["nll"])
        best, first, last = max(row["acc"] for row in rows), rows[0], rows[-1]
        learned = best >= max(chance + 10, majority + 5)
        overfits = lowest["step"] < last["step"] and last["nll"] > lowest["nll"]
        n_train = json.loads((r.folder / "summary.json").read_text())["n_train"]
        lines.append(f"| {r.train_task} | {r.variant} | {r.seed} | {n_train} | {_epochs(r.folder, last['step']):.1f} "
                     f"| {chance:.1f} | {majority:.1f} | {first['acc']:.1f} / {first['nll']:.3f} "
                     f"| {lowest['nll']:.3f} ({_epochs(r.folder, lowest['step']):.1f}) | {lowest['acc']:.1f} "
                     f"| {best:.1f} | {last['acc']:.1f} / {last['nll']:.3f} | {'yes' if learned else 'no'} "
                     f"| {'yes' if overfits else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _color(result: RunResult) -> str:
    from varlora.methods import get_method

    return get_method(result.method).color if result.method else "C7"


def default_rows(results: Sequence[RunResult]) -> list[RunResult]:
    """The rows shown in per-method figures: all but the intermediate τ of a τ sweep."""
    return [r for r in results if r.tau is None or r.tau in (0.0, 1.0)]


def _in_order(keys: Iterable[str], order: Sequence[str] | None) -> list[str]:
    """``keys`` in the order ``order`` gives them (those it omits are left out), or sorted without one."""
    keys = set(keys)
    return [k for k in (order or sorted(keys)) if k in keys]


def write_figures(results: Sequence[RunResult], out: str | Path, n_bins: int = 10,
                  order: Sequence[str] | None = None, task_order: Sequence[str] | None = None,
                  probs: SavedProbs | None = None) -> list[Path]:
    """The PNGs: reliability diagrams (pooled over tasks and seeds, one panel per row label), accuracy–coverage
    curves (one panel per task, pooled over seeds), the τ trade-off and accuracy vs training time. ``order``
    orders the row labels and ``task_order`` the accuracy–coverage panels (default: sorted); ``probs`` is a
    cache of the saved probabilities that the caller has already read (default: a new one)."""
    out = Path(out)
    written = []
    in_domain = [r for r in results if r.eval_task == r.train_task]
    probs = probs or SavedProbs()
    pooled: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    per_task: dict[tuple[str, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for r in default_rows(in_domain):
        confidence, correct = _confidence_correct(probs.get(r.folder, r.train_task), r.row)
        for key, store in ((r.label, pooled), ((r.train_task, r.label), per_task)):
            store[key][0].append(confidence)
            store[key][1].append(correct)
    if pooled:
        labels = _in_order(pooled, order)
        data = {m: (torch.cat(pooled[m][0]), torch.cat(pooled[m][1])) for m in labels}
        written.append(plots.reliability_diagrams(data, out / "reliability.png", n_bins=n_bins,
                                                  title="pooled over tasks and seeds (top-label confidence)"))
        styles = _row_styles([r for r in default_rows(in_domain)])
        panels: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for task in _in_order({task for task, _ in per_task}, task_order):
            panels[task] = {}
            for label in labels:
                if (task, label) in per_task:
                    coverage, acc, _ = accuracy_coverage_curve(torch.cat(per_task[(task, label)][0]),
                                                               torch.cat(per_task[(task, label)][1]))
                    panels[task][label] = (coverage, 100 * acc)
        written.append(plots.accuracy_coverage(panels, out / "accuracy_coverage.png", styles=styles,
                                               title="selective prediction by max probability (pooled over seeds)"))
    curves, baselines, curve_seeds, curve_styles = _tau_curves(in_domain, task_order)
    if curves:
        title = f"seeds {sorted(curve_seeds)}: those that evaluated every τ (means over them)"
        written.append(plots.tau_tradeoff(curves, out / "tau_tradeoff.png", baselines, title=title,
                                          styles=curve_styles))
    time_curves, time_styles, time_panels, time_folders = {}, {}, {}, []
    seeds = sorted({r.seed for r in in_domain})
    dashes = ("-", "--", ":", "-.")
    seen: set[Path] = set()
    for r in sorted(in_domain, key=lambda r: (r.train_task, r.label, r.seed)):
        if r.folder in seen or _reuses_training(r):
            continue
        seen.add(r.folder)
        rows = _eval_rows(r.folder)
        if rows:
            key = f"{r.train_task} {r.variant} (seed {r.seed})"
            time_curves[key] = rows
            time_folders.append(r.folder)
            time_panels[key] = r.train_task
            time_styles[key] = {"color": _color(r), "linestyle": dashes[seeds.index(r.seed) % 4], "label": r.variant}
    if time_curves:
        title = ("methods that train (post-hoc ones have their MAP adapter's curve); line style = seed: "
                 + ", ".join(f"{dashes[i % 4]} {s}" for i, s in enumerate(seeds)))
        written.append(plots.accuracy_vs_time(time_curves, out / "accuracy_vs_time.png", styles=time_styles,
                                              panels=time_panels, title=title))
        epoch_curves = {key: [{**row, "epoch": _epochs(folder, row["step"])} for row in rows]
                        for (key, rows), folder in zip(time_curves.items(), time_folders, strict=True)}
        written.append(plots.accuracy_vs_time(epoch_curves, out / "overfitting.png", styles=time_styles,
                                              panels=time_panels, title=title, x="epoch", y="nll"))
    return written


def _row_styles(results: Sequence[RunResult]) -> dict[str, dict]:
    """A line style per row label: the method's colour; labels that share a colour (two rows of one method,
    or two methods of one colour) told apart by the line style, the first one solid."""
    styles: dict[str, dict] = {}
    per_color: dict[str, int] = defaultdict(int)
    for r in results:
        if r.label not in styles:
            color = _color(r)
            styles[r.label] = {"color": color, "linestyle": ("-", "--", ":", "-.")[per_color[color] % 4]}
            per_color[color] += 1
    return styles


def _tau_curves(results: Sequence[RunResult], task_order: Sequence[str] | None = None
                ) -> tuple[dict[str, list[dict]], dict[str, dict], set[int], dict[str, dict]]:
    """Per task (and variant), in ``task_order`` (default: sorted), the metrics at each τ, averaged over the
    seeds that evaluated every τ of the task (a τ evaluated by one seed only must not be compared with means
    over several); the MAP method's metrics over the same seeds, with its row label and colour (``"label"``,
    ``"color"``); those seeds; and each curve's style (its method's colour, its variant as the label)."""
    from varlora.methods import get_method

    curves: dict[str, list[dict]] = {}
    baselines: dict[str, dict] = {}
    styles: dict[str, dict] = {}
    used: set[int] = set()
    for task in _in_order({r.train_task for r in results}, task_order):
        rows = [r for r in results if r.train_task == task]
        variants = sorted({r.variant for r in rows if r.tau is not None})
        for variant in variants:
            swept = [r for r in rows if r.tau is not None and r.variant == variant]
            by_seed: dict[int, dict[float, dict]] = defaultdict(dict)
            for r in swept:
                by_seed[r.seed][r.tau] = r.metrics
            all_taus = {tau for taus in by_seed.values() for tau in taus}
            seeds = {seed for seed, taus in by_seed.items() if set(taus) == all_taus}
            if len(all_taus) < 2:
                continue
            used |= seeds
            key = task if len(variants) == 1 else f"{task} {variant}"
            curves[key] = [{"tau": t, **{m: statistics.fmean(by_seed[s][t][m] for s in seeds)
                                         for m in ("acc", "nll", "ece")}} for t in sorted(all_taus)]
            styles[key] = {"color": _color(swept[0]), "label": variant}
            maps = [r for r in rows if r.method and get_method(r.method).role == "map" and r.seed in seeds]
            if maps:
                baselines[key] = {m: statistics.fmean(r.metrics[m] for r in maps) for m in ("acc", "nll", "ece")}
                baselines[key].update(label=maps[0].label, color=_color(maps[0]))
    return curves, baselines, used, styles


def rank_table(table: dict, tasks: Sequence[str], metrics: Sequence[str] = ("acc", "ece", "nll"),
               rows: Sequence[str] | None = None) -> str:
    """Mean rank of each of ``rows`` (default: every row of ``table``) across those of ``tasks`` that all of
    them have (ties share the mean rank), one column per metric: accuracy ranks high-to-low, ECE/NLL/Brier
    low-to-high. A task some ranked row lacks is left out for all of them, since a rank among fewer rows is not
    comparable (an unfinished study ranks its finished tasks)."""
    table = {label: table[label] for label in (table if rows is None else rows)}
    shared = [t for t in tasks if all(t in cells for cells in table.values())]
    lines = [f"Tasks ranked: {', '.join(shared) or 'none'} (those every ranked row has).", "",
             "| method | " + " | ".join(f"rank {_LABELS[m]}" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    ranks: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task in shared:
        for metric in metrics:
            cells = {label: cells[task][metric][0] for label, cells in table.items()}
            sign = -1.0 if metric == "acc" else 1.0
            values = sorted(sign * v for v in cells.values())
            for label, value in cells.items():
                first = values.index(sign * value)
                ties = values.count(sign * value)
                ranks[label][metric].append(first + (ties + 1) / 2)
    for label in ranks:
        lines.append(f"| {label} | " + " | ".join(f"{statistics.fmean(ranks[label][m]):.2f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _map_training_seconds(in_domain: Sequence[RunResult]) -> dict[tuple[str, int], float]:
    """Training seconds of the MAP run of each (task, seed)."""
    from varlora.methods import get_method

    return {(r.train_task, r.seed): r.cost["train_seconds"] for r in in_domain
            if r.method and get_method(r.method).role == "map" and r.cost}


def _training_seconds(r: RunResult, map_seconds: dict[tuple[str, int], float]) -> float:
    """A run's training seconds. A post-hoc method trains exactly the MAP adapter it reuses, so its training
    counts as the MAP run's of the same task and seed (where that run is recorded), even where its own record
    timed a retraining of that adapter on another machine."""
    from varlora.methods import get_method

    if r.method and get_method(r.method).posthoc_of:
        return map_seconds.get((r.train_task, r.seed), r.cost["train_seconds"])
    return r.cost["train_seconds"]


def training_cost_ratios(results: Sequence[RunResult], with_fit: bool = False) -> dict[str, float]:
    """Per row label, the mean over its in-distribution runs of training seconds (:func:`_training_seconds`:
    a post-hoc method's are the MAP run's, ratio 1) ÷ the MAP run's on the same task and seed; labels without a
    MAP run to compare with are absent. ``with_fit`` adds the post-hoc fit seconds (temperature's T, Laplace's
    curvature and prior, TFB's variance search) to the numerator: the cost of the predictor."""
    in_domain = [r for r in results if r.eval_task == r.train_task]
    map_seconds = _map_training_seconds(in_domain)
    ratios: dict[str, list[float]] = defaultdict(list)
    for r in in_domain:
        reference = map_seconds.get((r.train_task, r.seed))
        if not (r.cost and reference):
            continue
        seconds = _training_seconds(r, map_seconds) + (r.cost["fit_seconds"] if with_fit else 0.0)
        ratios[r.label].append(seconds / reference)
    return {label: statistics.fmean(values) for label, values in ratios.items()}


def cost_table(results: Sequence[RunResult], labels: Sequence[str]) -> str:
    """Per row label, means over its in-distribution runs: training seconds (and their ratio to the MAP
    method's on the same tasks and seeds), post-hoc fit seconds (and training + fit as a ratio to MAP's
    training), evaluation seconds of the whole row's run, LM forward passes per example, peak memory while
    training and while evaluating, and the bytes of extra parameters and optimizer state beyond one LoRA
    adapter. Forward passes are a range where they differ between tasks.

    Peak memory averages only the runs of the row's most trustworthy ``memory_kind`` (:mod:`varlora.cost`);
    a row with no exact measurement shows its upper bound, marked "≤"."""
    in_domain = [r for r in results if r.eval_task == r.train_task]
    ratios, with_fit = training_cost_ratios(in_domain), training_cost_ratios(in_domain, with_fit=True)
    map_seconds = _map_training_seconds(in_domain)
    kinds_used: set[str] = set()
    lines = ["| method | training s | × MAP training | post-hoc fit s | × MAP training + fit | evaluation s "
             "| forward passes / example | peak MB training | peak MB evaluation | extra params MB "
             "| optimizer state MB |",
             "|---|" + "---|" * 10]
    for label in labels:
        rows = [r for r in in_domain if r.label == label and r.cost]
        if not rows:
            continue
        cost = [r.cost for r in rows]

        def mean(values: Iterable[float]) -> float:
            return statistics.fmean(list(values))

        kind = min((_memory_kind(c) for c in cost), key=KINDS_BY_TRUST.index)
        measured = [c for c in cost if _memory_kind(c) == kind]
        bound = "" if kind in EXACT_KINDS else "≤ "
        kinds_used.add(kind)
        lines.append(
            f"| {label} | {mean(_training_seconds(r, map_seconds) for r in rows):.0f} | "
            + (f"{ratios[label]:.2f}" if label in ratios else "–")
            + f" | {mean(c['fit_seconds'] for c in cost):.1f} | "
            + (f"{with_fit[label]:.2f}" if label in with_fit else "–") + " | "
            f"{mean(c['eval_seconds'][r.train_task] for c, r in zip(cost, rows, strict=True)):.1f} | "
            f"{_span(r.forward_passes for r in rows)} | "
            f"{bound}{mean(c['peak_train_bytes'] for c in measured) / 2**20:.0f} | "
            f"{bound}{mean(c['peak_eval_bytes'] for c in measured) / 2**20:.0f} | "
            f"{mean(c['extra_param_bytes'] for c in cost) / 2**20:.2f} | "
            f"{mean(c['optimizer_state_bytes'] for c in cost) / 2**20:.2f} |")
    return "\n".join(lines) + "\n\n" + _memory_note(kinds_used) + " Training seconds of a post-hoc method are " \
        "those of the MAP run whose adapter it reuses (its × MAP training is 1 by construction).\n"


def _span(values: Iterable[int]) -> str:
    """"3" for one value, "3–5" for several (Laplace's passes grow with the number of choices K)."""
    distinct = sorted(set(values))
    return str(distinct[0]) if len(distinct) == 1 else f"{distinct[0]}–{distinct[-1]}"


def _memory_kind(cost: dict) -> str:
    kind = cost.get("memory_kind") or UNNAMED_MEMORY_KIND
    return kind if kind in KINDS_BY_TRUST else KINDS_BY_TRUST[-1]


_MEMORY_KIND_TEXT = {
    "cuda_max_allocated": "peak allocated GPU memory (cuda_max_allocated)",
    "rss_peak_trimmed": "the process's peak resident memory in the stage, counted from a start where the heap pages "
                        "freed by its earlier stages were handed back to the OS (rss_peak_trimmed)",
    "rss_peak": "the process's peak resident memory in the stage, with the heap pages it kept from earlier stages "
                "and runs (rss_peak): an upper bound",
    "rss_peak_since_start": "the process's peak resident memory since it started (rss_peak_since_start): an upper "
                            "bound",
}


def _memory_note(kinds: set[str]) -> str:
    """The cost table's sentence on what its memory columns measure."""
    described = "; ".join(_MEMORY_KIND_TEXT[k] for k in sorted(kinds, key=KINDS_BY_TRUST.index))
    note = f"Peak memory, weights included: {described}."
    if kinds - EXACT_KINDS:
        note += " A row's memory is the mean of its runs of the best kind it has; \"≤\" marks upper bounds."
    return note


def _ratio_over(ratio: float, budget: float) -> str:
    """``ratio`` (> ``budget``) with two decimals, or as many more as it takes not to print the budget itself
    (1.1004 over a budget of 1.1 reads "1.1004", not "1.10")."""
    digits = 2
    while float(f"{ratio:.{digits}f}") <= budget and digits < 8:
        digits += 1
    return f"{ratio:.{digits}f}"


def best_within_budget(table: dict, ratios: dict[str, float], tasks: Sequence[str], budget: float = 1.1,
                       metrics: Sequence[str] = ("acc", "ece", "nll"), basis: str = "training") -> str:
    """Per metric and column (task, average), the best and second-best rows of ``table`` (:func:`aggregate`)
    among those whose training costs at most ``budget`` × MAP's (``ratios``: :func:`training_cost_ratios`),
    with their mean over seeds: the cost-matched comparison of the paper's claim ("better than the
    alternatives at lower cost"). Accuracy ranks high-to-low, the others low-to-high; rows without a ratio
    are left out, and the text names the rows over budget. ``basis`` names the cost column the ratios are
    (``"training"`` or ``"training + fit"``: :func:`training_cost_ratios` without or with ``with_fit``)."""
    columns = [*tasks, "average"] if len(tasks) > 1 else list(tasks)
    eligible = [label for label in table if ratios.get(label, math.inf) <= budget]
    over = [f"{label} ({_ratio_over(ratios[label], budget)}×)" for label in table
            if ratios.get(label, -math.inf) > budget]
    lines = [f"Rows whose {basis} costs at most {budget:g}× MAP's training (measured: the cost table's "
             f"× MAP {basis} column); "
             f"over budget: {', '.join(over) or 'none'}. Each cell: best · second, mean over seeds.", "",
             "| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for metric in metrics:
        sign = -1.0 if metric == "acc" else 1.0
        digits = _digits(metric)
        cells = []
        for column in columns:
            ranked = sorted((sign * table[label][column][metric][0], label) for label in eligible
                            if metric in table[label].get(column, {}))
            cells.append(" · ".join(f"{label} {sign * value:.{digits}f}" for value, label in ranked[:2]) or "–")
        lines.append(f"| {_LABELS[metric]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class SavedProbs:
    """The saved probabilities of run folders, each file read once: ``get(folder, task)`` -> tensors."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Path, str], dict[str, torch.Tensor]] = {}

    def get(self, folder: Path, task: str) -> dict[str, torch.Tensor]:
        key = (folder, task)
        if key not in self._cache:
            self._cache[key], _ = _io.read_safetensors(RunPaths(folder).eval_probs(task))
        return self._cache[key]


def _ood_scores(tensors: dict[str, torch.Tensor], row: str) -> dict[str, torch.Tensor]:
    """Per example, each OOD signal of prediction row ``row`` (higher = more in-distribution); ``mi`` only
    where the row saved its per-sample probabilities."""
    probs = tensors[f"probs/{row}"]  # (N, K)
    scores = {"maxprob": probs.double().max(-1).values, "entropy": -predictive_entropy(probs)}
    if f"sample_probs/{row}" in tensors:
        scores["mi"] = -mutual_information(tensors[f"sample_probs/{row}"])  # (S, N, K) -> (N,)
    return scores


def ood_detection(results: Sequence[RunResult], probs: SavedProbs | None = None) -> list[RunResult]:
    """For every out-of-distribution result (``eval_task`` other than ``train_task``), the detection of that
    set against the run's in-distribution evaluation set by the same prediction row: ``auroc_<signal>`` and
    ``fpr95_<signal>`` in percent for each signal of :data:`OOD_SIGNALS` (mutual information for rows with
    samples only), the in-distribution examples as positives. Returned as results of "task" ``eval_task``
    (``train_task`` set to it), so that :func:`aggregate` puts the OOD sets in columns."""
    probs = probs or SavedProbs()
    out = []
    for r in results:
        if r.eval_task == r.train_task:
            continue
        in_dist = _ood_scores(probs.get(r.folder, r.train_task), r.row)
        shifted = _ood_scores(probs.get(r.folder, r.eval_task), r.row)
        metrics = {}
        for signal in OOD_SIGNALS:
            if signal in in_dist and signal in shifted:
                metrics[f"auroc_{signal}"] = 100 * auroc(in_dist[signal], shifted[signal])
                metrics[f"fpr95_{signal}"] = 100 * fpr_at_95_tpr(in_dist[signal], shifted[signal])
        out.append(replace(r, train_task=r.eval_task, metrics=metrics))
    return out


def ood_metrics(ood: Sequence[RunResult]) -> list[str]:
    """The keys of :func:`ood_detection` that some result has: AUROC blocks first, then FPR@95."""
    have = {k for r in ood for k in r.metrics}
    return [f"{kind}_{signal}" for kind in ("auroc", "fpr95") for signal in OOD_SIGNALS
            if f"{kind}_{signal}" in have]


def _confidence_correct(tensors: dict[str, torch.Tensor], row: str) -> tuple[torch.Tensor, torch.Tensor]:
    confidence, prediction = tensors[f"probs/{row}"].double().max(dim=-1)
    return confidence, prediction == tensors["labels"]


def selective_prediction(results: Sequence[RunResult], probs: SavedProbs | None = None) -> list[RunResult]:
    """Every result with its ``aurc`` (percent: area under the risk–coverage curve of the max probability),
    from the saved probabilities of its evaluation task."""
    probs = probs or SavedProbs()
    return [replace(r, metrics={"aurc": 100 * aurc(*_confidence_correct(probs.get(r.folder, r.eval_task), r.row))})
            for r in results]


def with_mce(results: Sequence[RunResult], probs: SavedProbs | None = None) -> list[RunResult]:
    """Every result with its ``mce`` added to its metrics: the maximum calibration error in percent
    (:func:`~varlora.metrics.maximum_calibration_error`, over the same ``n_bins`` as the run's ECE), from the
    saved probabilities of its evaluation task. Run records store ACC, ECE, NLL and Brier; the MCE is computed
    here, so every run has it alike, those recorded before it was reported included."""
    probs = probs or SavedProbs()
    return [replace(r, metrics=r.metrics | {"mce": 100 * confidence_bins(
        *_confidence_correct(probs.get(r.folder, r.eval_task), r.row), n_bins=int(r.metrics["n_bins"])).mce})
            for r in results]


def posterior_scale(folder: Path, method: str) -> dict[str, float] | None:
    """The scale of the mean-field Gaussian posterior that run ``folder`` of method ``method`` saved, against its
    means, or None where the method has none (:meth:`~varlora.methods.base.Method.saved_std`) or ``final/``
    holds none: ``sigma`` (mean σ over the weights that have one), ``ratio_a`` = mean σ / mean |m| over the LoRA
    A matrices and ``ratio_all`` the same over all of them (B starts at 0, so its |m| stays small after a short
    run; BLoB's B has no σ, so there the two ratios agree). m comes from the peft adapter
    ``final/adapter_model.safetensors``.
    """
    import re

    from varlora.methods import get_method

    final = RunPaths(folder).final
    adapter = final / "adapter_model.safetensors"
    std = get_method(method).saved_std(final) if method and adapter.is_file() else None
    if not std:
        return None
    means, _ = _io.read_safetensors(adapter)
    matched = {}
    for name, sigma in std.items():
        key = name if name in means else re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)
        if key not in means or means[key].shape != sigma.shape:
            return None
        matched[name] = means[key]
    return scale_over_means(std, matched)


def selected_rows(results: Sequence[RunResult]) -> dict[str, RunResult]:
    """Per experiment variant, the in-distribution row a tuning rule judges it by, from one of its results:
    its sampled predictive at full variance (``n_samples`` > 1, τ = 1 or no τ), or for a variant that does not
    sample, its single point prediction."""
    def rank(r: RunResult) -> int:
        return 0 if r.n_samples > 1 and r.tau in (None, 1.0) else 1 if r.n_samples == 1 else 2

    chosen: dict[str, RunResult] = {}
    for r in results:
        if r.eval_task == r.train_task and (r.variant not in chosen or rank(r) < rank(chosen[r.variant])):
            chosen[r.variant] = r
    return chosen
