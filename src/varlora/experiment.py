"""The paper's comparison as one resumable command: variants × tasks × seeds, then tables and figures.

A preset (``src/varlora/recipes/experiment_<name>.yaml`` or any YAML file) has::

    description: what it runs and on what budget (printed in the report)
    base: {section: {field: value}}          RunConfig sections shared by all runs
    variants: {name: {section: {...}}}       e.g. adamw / ivon, or a tuning grid
    tasks: {task: {section: {...}} | null}   per-task overrides
    seeds: [21, 42, 87]
    seed_overrides: {21: {section: {...}}}   optional, per-seed overrides (applied last), e.g. a finer τ grid
                                             for the seed that makes the figures
    variant_seeds: {variant: [21]}           optional, the seeds a variant runs on where not all of them
    selection: {metric: nll}                 optional, marks a tuning preset: the report names, per method, the
                                             variant with the best mean of ``metric`` (acc: highest, else lowest)
                                             on the row it is judged by (the sampled predictive at τ = 1, or the
                                             one point prediction), and the posterior's σ / |m| of each run

Runs go to ``<out>/<task>/<variant>/seed<seed>`` (each an ordinary ``varlora train`` folder, so a rerun
resumes the one that was killed; several processes may run the same command side by side and share the runs).
Each finished run is recorded in ``<results>/runs/`` (:mod:`varlora.run_records`: its summary, curve and saved
probabilities, without the adapters), and the report (``table.md``, ``table.csv``, ``runs.csv`` and the PNGs)
is rebuilt from the records in ``<results>`` after every run. A rerun skips every recorded run, so committing
``<results>`` is enough to continue a study on a machine without the run folders; a post-hoc run whose MAP run
survives only as a record trains that adapter again first. Where the runs evaluated ``eval.ood_tasks``, the
report adds their metrics and the OOD-detection table (AUROC, FPR@95); every report has the
selective-prediction table (AURC) and figure. Seeds are the outer loop, so a partial experiment has complete
tables for its first seeds.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from varlora import _io, distributed, report, run_records
from varlora._locking import claim_folder
from varlora.config import ConfigError, RunConfig

__all__ = ["Preset", "load_preset", "run_configs", "run_experiment", "write_report", "run_folder",
           "in_progress_elsewhere"]

Log = Callable[[str], None]
#: the training budget of the cost-matched comparison, × MAP's (the paper: IVON trains at about AdamW's cost)
CLAIM_BUDGET = 1.1


@dataclass
class Preset:
    name: str
    description: str
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    tasks: dict[str, dict[str, Any]]
    seeds: list[int]
    source: str
    seed_overrides: dict[int, dict[str, Any]]
    selection: dict[str, Any] | None = None
    variant_seeds: dict[str, list[int]] = field(default_factory=dict)


def _merge(into: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``into`` (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(into)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name (``cpu``, ``paper``, ``tune-cpu``) or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file not found: {path}")
        text, source = path.read_text(), str(path)
    else:
        resource = resources.files("varlora") / "recipes" / f"experiment_{name_or_path.replace('-', '_')}.yaml"
        if not resource.is_file():
            shipped = sorted(p.name for p in (resources.files("varlora") / "recipes").iterdir())
            raise ConfigError(f"unknown preset {name_or_path!r}; shipped: {shipped}")
        text, source = resource.read_text(), str(resource)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from err
    required = {"description", "base", "variants", "tasks", "seeds"}
    if not isinstance(data, dict) or required - set(data):
        raise ConfigError(f"{source}: a preset needs the keys {sorted(required)}")
    unknown = set(data) - required - {"seed_overrides", "selection", "variant_seeds"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}")
    tasks = {task: overrides or {} for task, overrides in data["tasks"].items()}
    seed_overrides = {int(seed): overrides for seed, overrides in (data.get("seed_overrides") or {}).items()}
    selection = data.get("selection")
    if selection is not None and (not isinstance(selection, dict) or set(selection) != {"metric"}
                                  or selection["metric"] not in report.METRICS):
        raise ConfigError(f"{source}: selection must be {{metric: one of {list(report.METRICS)}}}, got {selection!r}")
    variant_seeds = {name: [int(s) for s in seeds] for name, seeds in (data.get("variant_seeds") or {}).items()}
    for name, seeds in variant_seeds.items():
        if name not in data["variants"] or not set(seeds) <= {int(s) for s in data["seeds"]}:
            raise ConfigError(f"{source}: variant_seeds.{name}={seeds}: must name a variant and some of the seeds "
                              f"{data['seeds']}")
    preset = Preset(path.stem if path.suffix else name_or_path, data["description"].strip(), data["base"],
                    data["variants"], tasks, [int(s) for s in data["seeds"]], source, seed_overrides, selection,
                    variant_seeds)
    run_configs(preset)  # validate every run's config up front
    return preset


def run_configs(preset: Preset, tasks: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                overrides: dict[str, Any] | None = None,
                variants: Sequence[str] | None = None) -> list[tuple[str, str, int, RunConfig]]:
    """``(task, variant, seed, config)`` of every run, seed-major; ``overrides`` (sections) apply last.

    ``tasks``, ``seeds`` and ``variants`` select a subset (e.g. to share the runs among processes). A variant
    whose method is seed-independent (zero-shot) runs only at the preset's first seed. Within a seed and task,
    variants of post-hoc methods come after the others, so that they can reuse a finished MAP run.
    """
    from varlora.methods import get_method

    for kind, chosen, known in (("task", tasks, preset.tasks), ("variant", variants, preset.variants)):
        for name in chosen or []:
            if name not in known:
                raise ConfigError(f"{kind} {name!r} is not in preset {preset.name!r}: {sorted(known)}")
    runs = []
    for seed in seeds or preset.seeds:
        for task in tasks or preset.tasks:
            for variant in variants or preset.variants:
                data = _merge(_merge(preset.base, preset.variants[variant]), preset.tasks[task])
                data = _merge(data, preset.seed_overrides.get(seed, {}))
                data = _merge(data, {"data": {"task": task}, "train": {"seed": seed}})
                data = _merge(data, overrides or {})
                config = RunConfig.from_dict(data, source=f"{preset.source} [{task}/{variant}/seed {seed}]")
                if get_method(config.method.name).seed_independent and seed != preset.seeds[0]:
                    continue  # an untrained model's evaluation does not depend on the seed: run it once
                if seed not in preset.variant_seeds.get(variant, [seed]):
                    continue  # a variant the preset runs on fewer seeds (e.g. one shown dominated before)
                runs.append((task, variant, seed, config))
    if not runs:
        raise ConfigError(f"preset {preset.name!r} has no run for seeds {list(seeds or preset.seeds)} of the variants "
                          f"{list(variants or preset.variants)}: a seed-independent variant (zero-shot) runs only at "
                          f"the first seed, {preset.seeds[0]}, and variant_seeds limits "
                          f"{sorted(preset.variant_seeds) or 'no variant'}")
    posthoc = {v for _, v, _, c in runs if get_method(c.method.name).posthoc_of}
    return sorted(runs, key=lambda run: (preset.seeds.index(run[2]), list(preset.tasks).index(run[0]),
                                         run[1] in posthoc))


Run = tuple[str, str, int, RunConfig]


def run_folder(root: Path, task: str, variant: str, seed: int) -> Path:
    """Where a run of the experiment lives under ``root``: its run folder (``--out``) or its record."""
    return root / task / variant / f"seed{seed}"


def _reuse_source(runs: Sequence[Run], task: str, seed: int, config: RunConfig) -> Run | None:
    """For a post-hoc run, the run among ``runs`` (all the preset's variants, also those this process does not
    run) of the same task and seed that trains the adapter it starts from."""
    for other in runs:
        if (other[0], other[2]) == (task, seed) and config.starts_from(other[3]):
            return other
    return None


def in_progress_elsewhere(folder: Path) -> bool:
    """Whether another process holds the claim on run ``folder`` and it has not finished."""
    if (folder / "summary.json").exists() or not folder.exists():
        return False
    with claim_folder(folder) as claimed:
        return not claimed


def _run_claimed(config: RunConfig, folder: Path, log: Log, reuse: Path | None = None) -> dict[str, Any] | None:
    """``train_run`` in ``folder`` if this process gets its claim (all ranks together under torchrun); its
    summary, or None where another process has it."""
    from varlora.train import train_run

    main = distributed.is_main()
    with claim_folder(folder) if main else contextlib.nullcontext(None) as claimed:
        if not distributed.broadcast_object(claimed):
            return None
        return train_run(config, folder, log=log, reuse=reuse)


def _record_finished(runs: Sequence[Run], out_dir: Path, records: Path, log: Log) -> None:
    """Record every finished run folder of ``runs`` that has no record yet (e.g. one finished by an earlier
    version, or by a process that was killed between its summary and its record)."""
    for task, variant, seed, _ in runs:
        folder, record = run_folder(out_dir, task, variant, seed), run_folder(records, task, variant, seed)
        if (folder / "summary.json").is_file() and not run_records.is_recorded(record):
            run_records.record_run(folder, record)
            log(f"recorded {folder} → {record}")


def _rebuild_source(source: Run, out_dir: Path, records: Path, log: Log) -> bool:
    """Make the finished run folder a post-hoc run starts from, where only its record survives (the run folders
    are not committed): train it again in its folder (deterministic on one machine; the metrics are compared
    with the record's). False where another process is at it."""
    task, variant, seed, config = source
    folder = run_folder(out_dir, task, variant, seed)
    log(f"{task} {variant} seed {seed}: recorded, but its adapter is not in {folder}: training it again")
    summary = _run_claimed(config, folder, log)
    if summary is None:
        return False
    recorded = json.loads((run_folder(records, task, variant, seed) / "summary.json").read_text())["results"]
    if summary["results"] != recorded:
        log(f"warning: the rebuilt {folder} does not reproduce its record's metrics exactly (another CPU's "
            "arithmetic?); the post-hoc runs start from the rebuilt adapter")
    return True


def run_experiment(preset_name: str, out: str | None = None, results: str | None = None,
                   tasks: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                   report_only: bool = False, overrides: dict[str, Any] | None = None,
                   variants: Sequence[str] | None = None, log: Log = print) -> Path:
    """Run (or resume) every run of the preset that has no record, recording each and rewriting the report
    after it; return the report folder.

    Under ``torchrun`` all ranks run each run together: rank 0 claims the folder and writes the records and the
    report."""
    main = distributed.is_main()
    log = distributed.main_only(log)
    preset = load_preset(preset_name)
    out_dir = Path(out or f"runs/experiment-{preset.name}")
    results_dir = Path(results or f"results/experiment-{preset.name}")
    records = results_dir / run_records.RECORDS_FOLDER
    runs = run_configs(preset, tasks, seeds, overrides, variants)
    every_variant = run_configs(preset, tasks, seeds, overrides)  # post-hoc runs reuse MAP runs of any variant
    if main:
        _record_finished(every_variant, out_dir, records, log)
    if not report_only:
        for index, (task, variant, seed, config) in enumerate(runs, start=1):
            where = f"[{index}/{len(runs)}] {task} {variant} seed {seed}"
            folder, record = run_folder(out_dir, task, variant, seed), run_folder(records, task, variant, seed)
            distributed.check_on_main(ConfigError, run_records.check_config, record, config)
            if distributed.broadcast_object(run_records.is_recorded(record)):
                continue
            source = _reuse_source(every_variant, task, seed, config)
            source_folder = None if source is None else run_folder(out_dir, source[0], source[1], seed)
            if source is not None:
                waiting = main and in_progress_elsewhere(source_folder)
                lost = (main and not waiting and not (source_folder / "summary.json").is_file()
                        and run_records.is_recorded(run_folder(records, source[0], source[1], seed)))
                waiting, lost = distributed.broadcast_object((waiting, lost))
                if waiting or (lost and not _rebuild_source(source, out_dir, records, log)):
                    log(f"{where}: waiting for {source_folder} (another process trains it), skipping; rerun to "
                        "continue")
                    continue
            log(f"{where} → {folder}")
            started = time.perf_counter()
            if _run_claimed(config, folder, log, reuse=source_folder) is None:
                log(f"{where}: another process has it, skipping")
                continue
            log(f"{where}: done in {time.perf_counter() - started:.0f} s")
            if main:
                run_records.record_run(folder, record)
                write_report(preset, records, results_dir, runs[0][3])
    if main:
        write_report(preset, records, results_dir, runs[0][3])
    log(f"report: {results_dir / 'table.md'}")
    return results_dir


def _ordered_labels(results: Sequence[report.RunResult], preset: Preset) -> list[str]:
    """Row labels in the order of the preset's variants, each variant's rows in the order the run made them."""
    labels: list[str] = []
    for variant in preset.variants:
        for r in results:
            if r.variant == variant and r.label not in labels:
                labels.append(r.label)
    return labels


def write_report(preset: Preset, records: Path, results_dir: Path, sample: RunConfig) -> None:
    """From the run records under ``records`` (:mod:`varlora.run_records`): ``table.md`` (per-task tables, the
    average and the mean rank, mean ± s.e. over seeds; the cost table), ``table.csv``, ``runs.csv`` and the
    figures."""
    found = [r for r in report.find_runs(records) if r.folder.parent.parent.name in preset.tasks
             and r.folder.parent.name in preset.variants]
    if not found:
        return
    probs = report.SavedProbs()
    labelled = report.with_mce([r.in_variant(r.folder.parent.name) for r in found], probs)
    methods = _ordered_labels(labelled, preset)
    tasks = list(preset.tasks)  # every column, so that "average" is over all of them or absent
    table = report.aggregate(labelled, methods, tasks)
    seeds = sorted({r.seed for r in labelled})
    n_eval = sorted({(r.train_task, int(r.metrics["n"])) for r in labelled if r.eval_task == r.train_task})
    header = [
        f"# Experiment `{preset.name}`", "", preset.description, "",
        f"Scoring protocol: **{sample.data.scoring}**. Model: `{sample.model.name}`. "
        f"Seeds with results: {seeds}. Mean ± standard error over the seeds a cell has (no ± for one seed); the "
        f"average column uses only the seeds that have every task; ECE and MCE with {sample.eval.n_bins} bins "
        f"(MCE, the largest gap of a non-empty bin, is set by however few examples that bin holds: noisy at these "
        f"sizes; `reliability.png` shows each bin's count); "
        f"sampled methods average the probabilities of {sample.eval.n_samples} samples; IVON = τ 1, "
        f"IVON@mean = τ 0. Evaluation examples per task: "
        + ", ".join(f"{t} {n}" for t, n in n_eval) + ".", "",
    ]
    ranked = {r.label for r in report.default_rows(labelled)}  # not the τ figure's extra τ values
    sections = ["## Per task and average", "", report.markdown_table(table, tasks, metrics=report.METRICS),
                "## Mean rank across tasks (1 = best; ACC higher is better, the others lower)", "",
                "Rows of extra τ values (the τ figure's, on one task) are not ranked." if ranked < set(table) else "",
                report.rank_table(table, tasks, report.METRICS, [label for label in table if label in ranked]),
                "## Cost (means over tasks and seeds)", "", report.cost_table(labelled, methods),
                f"## Best at ≤ {CLAIM_BUDGET:g}× MAP's training cost", "",
                report.best_within_budget(table, report.training_cost_ratios(labelled), tasks, CLAIM_BUDGET),
                f"### The same, counting post-hoc fits (≤ {CLAIM_BUDGET:g}× MAP's training, fit included)", "",
                report.best_within_budget(table, report.training_cost_ratios(labelled, with_fit=True), tasks,
                                          CLAIM_BUDGET, basis="training + fit")]
    ood = [r for r in labelled if r.eval_task != r.train_task]
    in_domain = [r for r in labelled if r.eval_task == r.train_task]
    if ood:
        ood_tasks = sorted({r.eval_task for r in ood})
        trained_on = ", ".join(sorted({r.train_task for r in ood}))
        # extra τ rows appear only where they were evaluated out of distribution, not as rows of dashes
        ood_labels = {r.label for r in ood}
        ood_methods = [m for m in methods if m in ranked or m in ood_labels]
        ood_table = report.aggregate([replace(r, train_task=r.eval_task) for r in ood], ood_methods, ood_tasks)
        detection = report.ood_detection(ood, probs)
        sections += [f"## Out of distribution (trained on {trained_on}, evaluated unchanged)", "",
                     report.markdown_table(ood_table, ood_tasks),
                     f"## Out-of-distribution detection (in distribution: {trained_on}'s evaluation set)", "",
                     "Each signal scores an example higher the more in-distribution it looks (max probability, "
                     "negative predictive entropy, negative mutual information of the samples: rows that sample "
                     "only); AUROC (50 = chance, higher is better) and FPR@95 = the share of OOD examples accepted "
                     "at the threshold that keeps 95% of the in-distribution ones (lower is better), in %.", "",
                     report.markdown_table(report.aggregate(detection, ood_methods, ood_tasks,
                                                            report.ood_metrics(detection)),
                                           ood_tasks, report.ood_metrics(detection))]
    curves = report.learning_curves(labelled, probs)
    if curves:
        sections += ["## Learning curves (evaluations at the mean during training)", "",
                     "Chance = 1/K; majority = the share of the most frequent answer among the evaluation "
                     "questions; learned = the best accuracy is at least max(chance + 10, majority + 5); over-fits "
                     "= the validation NLL ends above its minimum, reached before the last evaluation "
                     "(`overfitting.png` draws the NLL against epochs).", "", curves, ""]
    selective = report.selective_prediction(in_domain, probs)
    sections += ["## Selective prediction (answer only the most confident examples)", "",
                 "AURC: area under the risk–coverage curve of the max probability, in % (lower is better; a "
                 "constant confidence scores its error rate); the curves are in `accuracy_coverage.png`.", "",
                 report.markdown_table(report.aggregate(selective, methods, tasks, ["aurc"]), tasks, ["aurc"])]
    if preset.selection:
        sections += _selection_section(preset, labelled, table, tasks, sample)
    _io.write_text(results_dir / "table.md", "\n".join(header) + "\n" + "\n".join(sections) + "\n")
    _io.write_text(results_dir / "table.csv", report.csv_table(table))
    _io.write_text(results_dir / "runs.csv", _runs_csv(labelled))
    report.write_figures(labelled, results_dir, n_bins=sample.eval.n_bins, order=methods, task_order=tasks,
                         probs=probs)


def _selection_section(preset: Preset, results: Sequence[report.RunResult], table: dict, tasks: Sequence[str],
                       sample: RunConfig) -> list[str]:
    """The tuning rule, its winner per method, and each variant's judged row with its posterior's σ / |m|."""
    metric = preset.selection["metric"]
    sign = -1.0 if metric == "acc" else 1.0
    column = "average" if len(tasks) > 1 else tasks[0]
    judged = report.selected_rows(results)
    scores = {v: table[r.label][column][metric] for v, r in judged.items()
              if metric in table.get(r.label, {}).get(column, {})}
    winners: dict[str, str] = {}
    for variant in preset.variants:
        if variant in scores:
            method = judged[variant].method
            if method not in winners or sign * scores[variant][0] < sign * scores[winners[method]][0]:
                winners[method] = variant
    where = (f"held out = {sample.data.holdout} *training* questions (`data.holdout`; the validation split is "
             "never read)" if sample.data.holdout else "held out = the evaluation set")
    column_text = "the average over tasks" if column == "average" else column
    lines = ["## Selection (tuning preset)", "",
             f"Rule: for each method, the variant with the {'highest' if sign < 0 else 'lowest'} held-out "
             f"{report._LABELS[metric]} of the **sampled predictive** (τ = 1, {sample.eval.n_samples} samples; a "
             f"method that does not sample: its point prediction), mean over the seeds on {column_text}; "
             f"{where}.", ""]
    for method, variant in winners.items():
        mean, se, n = scores[variant]
        lines.append(f"- winner ({method}): **{variant}**, row `{judged[variant].label}`, {report._LABELS[metric]} "
                     f"{_fine(mean, se, metric)} over {n} seed(s)")
    lines += ["", "σ/|m|: mean posterior σ over mean |m| of the saved posterior mean, over the LoRA A matrices "
              "and over all LoRA weights with a σ (B starts at 0; BLoB's B has no σ), mean over seeds; – where the "
              "method saves no mean-field posterior.", "",
              "| variant | row judged | ACC % | ECE % | NLL | mean σ | σ/\\|m\\| LoRA A | σ/\\|m\\| all |",
              "|---|---|---|---|---|---|---|---|"]
    for variant in preset.variants:
        if variant not in judged:
            continue
        label = judged[variant].label
        cells = table.get(label, {}).get(column, {})
        scales = [s for s in (run_records.recorded_posterior_scale(r.folder) for r in results
                              if r.variant == variant and r.label == label and r.eval_task == r.train_task)
                  if s is not None]
        scale = ["–"] * 3 if not scales else [f"{statistics.fmean(s[k] for s in scales):.3g}"
                                              for k in ("sigma", "ratio_a", "ratio_all")]
        metrics = " | ".join("–" if m not in cells else _fine(*cells[m][:2], m) for m in ("acc", "ece", "nll"))
        lines.append(f"| {variant} | {label} | {metrics} | " + " | ".join(scale) + " |")
    return [*lines, ""]


def _fine(mean: float, se: float, metric: str) -> str:
    """A tuning table's cell: one more digit than the comparison tables (NLL 0.912, ACC 61.37)."""
    digits = 3 if metric in ("nll", "brier") else 2
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def _runs_csv(results: Sequence[report.RunResult]) -> str:
    """Every run's every metric, one row per (run, eval task, method): the raw data behind the tables."""
    buffer = io.StringIO()
    keys = sorted({k for r in results for k in r.metrics})
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["train_task", "eval_task", "label", "method", "tau", "n_samples", "forward_passes", "seed",
                     "train_seconds", *keys])
    for r in sorted(results, key=lambda r: (r.train_task, r.eval_task, r.label, r.seed)):
        writer.writerow([r.train_task, r.eval_task, r.label, r.method, "" if r.tau is None else r.tau, r.n_samples,
                         r.forward_passes, r.seed, f"{r.train_seconds:.2f}",
                         *(f"{r.metrics[k]:.6g}" if k in r.metrics else "" for k in keys)])
    return buffer.getvalue()
