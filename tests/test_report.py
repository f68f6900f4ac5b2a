"""The report's tables computed from saved probabilities (OOD detection, AURC) and from ``final/`` (σ / |m|),
on fake run folders with hand-computed values; the OOD and tuning presets."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from varlora import report
from varlora.experiment import load_preset, run_configs, write_report
from varlora.posterior import Posterior
from varlora.run_records import record_run


def _peaked(confidence: float, top: int, k: int = 4) -> list[float]:
    """A probability vector with ``confidence`` on class ``top`` and the rest spread evenly."""
    return [confidence if c == top else (1 - confidence) / (k - 1) for c in range(k)]


def _fake_run(root, task, variant, seed, rows, method=None, **cost_fields):
    """A finished run folder: summary.json and eval/<task>.probs.safetensors for every task of ``rows``.

    ``rows[task][label]`` = (probs (N, K), sample_probs (S, N, K) or None, metrics, tau, n_samples)."""
    method = method or variant
    folder = root / task / variant / f"seed{seed}"
    (folder / "eval").mkdir(parents=True)
    summary_rows, results = {}, {}
    for eval_task, by_label in rows.items():
        n = next(iter(by_label.values()))[0].shape[0]
        tensors = {"labels": torch.arange(n) % 4}
        for label, (probs, samples, _, _, _) in by_label.items():
            tensors[f"probs/{label}"] = probs
            if samples is not None:
                tensors[f"sample_probs/{label}"] = samples
        save_file(tensors, str(folder / "eval" / f"{eval_task}.probs.safetensors"))
        summary_rows[eval_task] = [{"label": label, "method": method, "tau": tau, "n_samples": n_samples,
                                    "forward_passes": n_samples} for label, (*_, tau, n_samples) in by_label.items()]
        results[eval_task] = {label: metrics | {"n": n} for label, (_, _, metrics, _, _) in by_label.items()}
    cost = {"train_seconds": 10.0, "fit_seconds": 0.0, "eval_seconds": {task: 2.0}, "peak_train_bytes": 2**30,
            "peak_eval_bytes": 2**29, "extra_param_bytes": 0, "optimizer_state_bytes": 2**20,
            "memory_kind": "rss_peak", "trained_in": "this run"} | cost_fields
    (folder / "summary.json").write_text(json.dumps({
        "task": task, "seed": seed, "method": method, "train_seconds": 10.0, "results": results,
        "rows": summary_rows, "cost": cost}))
    return folder


M = {"acc": 50.0, "ece": 10.0, "nll": 1.0, "brier": 0.5, "n_bins": 10}

# In distribution (labels 0 1 2 3): confidences .9 .8 .7 .6, predicted classes 0 1 0 3 (the third is wrong).
#   AURC: by confidence right, right, wrong, right -> risks 0, 0, 1/3, 1/4 -> (7/12) / 4 = 7/48 = 14.58 %
ID = torch.tensor([_peaked(0.9, 0), _peaked(0.8, 1), _peaked(0.7, 0), _peaked(0.6, 3)], dtype=torch.float64)
# Out of distribution: confidences .75 .5 .4 .3. Max probability (and −entropy, monotone in it here):
#   AUROC = P(ID > OOD) = (4 + 4 + 3 + 3) / 16 = 87.5 %; FPR@95: ⌈0.95 · 4⌉ = 4 ID kept, t = .6, OOD >= .6: 1/4
OOD = torch.tensor([_peaked(0.75, 1), _peaked(0.5, 2), _peaked(0.4, 0), _peaked(0.3, 3)], dtype=torch.float64)
# Samples: in distribution two equal samples (MI 0 everywhere); out of distribution the first example agrees
# (MI 0, a tie with every ID example) and the others disagree (MI > 0). −MI: AUROC = (4 · 3 + ½ · 4) / 16 = 87.5 %,
# FPR@95: t = 0, one OOD example >= 0 -> 25 %.
ID_SAMPLES = torch.stack([ID, ID])
OOD_SAMPLES = torch.stack([OOD, torch.cat([OOD[:1], OOD[1:].roll(1, dims=-1)])])


def _runs(root, seeds=(1, 2)):
    for seed in seeds:
        _fake_run(root, "obqa", "adamw", seed, {
            "obqa": {"adamw": (ID, None, M, None, 1)},
            "arc_easy": {"adamw": (OOD, None, M, None, 1)}})
        _fake_run(root, "obqa", "ivon", seed, {
            "obqa": {"ivon@mean": (ID, None, M, 0.0, 1), "ivon": (ID_SAMPLES.mean(0), ID_SAMPLES, M, 1.0, 2)},
            "arc_easy": {"ivon@mean": (OOD, None, M, 0.0, 1),
                         "ivon": (OOD_SAMPLES.mean(0), OOD_SAMPLES, M, 1.0, 2)}})


def test_ood_detection_and_aurc_by_hand(tmp_path):
    _runs(tmp_path, seeds=(1,))
    found = report.find_runs(tmp_path)
    detection = {r.label: r.metrics for r in report.ood_detection(found)}
    assert detection["adamw"] == pytest.approx({"auroc_maxprob": 87.5, "fpr95_maxprob": 25.0,
                                                "auroc_entropy": 87.5, "fpr95_entropy": 25.0})
    assert detection["ivon"]["auroc_mi"] == pytest.approx(87.5) and detection["ivon"]["fpr95_mi"] == 25.0
    assert "auroc_mi" not in detection["ivon@mean"]  # a point prediction has no mutual information
    assert all(r.train_task == r.eval_task == "arc_easy" for r in report.ood_detection(found))
    aurc = {(r.label, r.eval_task): r.metrics["aurc"] for r in report.selective_prediction(found)}
    assert aurc[("adamw", "obqa")] == pytest.approx(100 * 7 / 48)
    # out of distribution, predicted 1 2 0 3 against labels 0 1 2 3: right only at .3 -> risks 1, 1, 1, 3/4
    assert aurc[("adamw", "arc_easy")] == pytest.approx(100 * (3 + 0.75) / 4)
    assert report.ood_metrics(report.ood_detection(found)) == [
        "auroc_maxprob", "auroc_entropy", "auroc_mi", "fpr95_maxprob", "fpr95_entropy", "fpr95_mi"]


def test_mce_from_the_saved_probabilities_with_the_runs_own_bins(tmp_path):
    """ID's confidences .9 .8 .7 .6 lie in four of 10 bins, right, right, wrong, right: gaps .1 .2 .7 .4, so
    MCE = 70 %; with 2 bins all four share (.5, 1]: |3 − 3.0| / 4 = 0."""
    _runs(tmp_path, seeds=(1,))
    found = [r for r in report.find_runs(tmp_path) if r.label == "adamw" and r.eval_task == "obqa"]
    [result] = report.with_mce(found)
    assert result.metrics["mce"] == pytest.approx(70.0) and result.metrics["ece"] == M["ece"]  # the rest kept
    [two_bins] = report.with_mce([replace(found[0], metrics=M | {"n_bins": 2})])
    assert two_bins.metrics["mce"] == pytest.approx(0.0)


def _block(text: str, header: str) -> list[str]:
    """The lines of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_write_report_has_the_ood_and_selective_tables(tmp_path):
    preset = load_preset("cpu")
    runs = tmp_path / "runs"
    _runs(runs)
    write_report(preset, runs, tmp_path / "results", run_configs(preset)[0][3])
    text = (tmp_path / "results" / "table.md").read_text()
    # two seeds with equal values: mean ± s.e. 0
    assert "| adamw | 87.5 ± 0.0 |" in _block(text, "| AUROC % (max prob) | arc_easy |")
    assert "| adamw | 25.0 ± 0.0 |" in _block(text, "| FPR@95 % (−entropy) | arc_easy |")
    mi = _block(text, "| AUROC % (−MI) | arc_easy |")
    assert "| ivon | 87.5 ± 0.0 |" in mi and "| adamw | – |" in mi
    # the preset's six task columns (obqa the fifth) and their average, absent while tasks are missing
    assert "| adamw | – | – | – | – | 14.6 ± 0.0 | – | – |" in _block(text, "| AURC % | winogrande_s |")
    assert "| ACC % | arc_easy |" in text  # the OOD sets' own metrics
    assert "## Out of distribution (trained on obqa, evaluated unchanged)" in text
    for png in ("reliability.png", "accuracy_coverage.png"):
        assert (tmp_path / "results" / png).stat().st_size > 0


def test_ood_tables_leave_out_extra_tau_rows_that_were_not_evaluated_there(tmp_path):
    preset = load_preset("cpu")
    runs = tmp_path / "runs"
    _runs(runs, seeds=(1,))
    # the τ figure's extra row, on the training task only (as the cpu preset does on arc_easy)
    _fake_run(runs, "arc_easy", "ivon", 1, {"arc_easy": {
        "ivon@mean": (ID, None, M, 0.0, 1), "ivon[tau=0.5]": (ID.clone(), None, M, 0.5, 1),
        "ivon": (ID.clone(), None, M, 1.0, 1)}})
    write_report(preset, runs, tmp_path / "results", run_configs(preset)[0][3])
    text = (tmp_path / "results" / "table.md").read_text()
    assert any(line.startswith("| ivon[tau=0.5] |") for line in _block(text, "| ACC % | winogrande_s |"))
    for header in ("| ACC % | arc_easy |", "| AUROC % (max prob) | arc_easy |"):
        labels = [line.split("|")[1].strip() for line in _block(text, header)[2:]]
        assert "ivon[tau=0.5]" not in labels and labels == ["adamw", "ivon@mean", "ivon"]


def test_in_distribution_report_has_aurc_but_no_ood_tables(tmp_path):
    preset = load_preset("cpu")
    _fake_run(tmp_path / "runs", "obqa", "adamw", 1, {"obqa": {"adamw": (ID, None, M, None, 1)}})
    write_report(preset, tmp_path / "runs", tmp_path / "results", run_configs(preset)[0][3])
    text = (tmp_path / "results" / "table.md").read_text()
    assert "| AURC % | winogrande_s |" in text and "| AUROC %" not in text and "## Out of distribution" not in text


def _posterior_run(root, variant, seed, nll_mean, nll_sampled):
    """An IVON run of the tuning preset whose final/ holds a posterior with σ_A = .1, σ_B = .2, |m_A| = .5,
    |m_B| = .1 (2 × 3 and 3 × 2 weights): mean σ = (6 · .1 + 6 · .2) / 12 = .15, σ/|m| over A = .2, over all
    = 1.8 / 3.6 = .5."""
    folder = _fake_run(root, "arc_easy", variant, seed, {"arc_easy": {
        "ivon@mean": (ID, None, M | {"nll": nll_mean}, 0.0, 1),
        "ivon": (ID_SAMPLES.mean(0), ID_SAMPLES, M | {"nll": nll_sampled}, 1.0, 2)}}, method="ivon")
    final = folder / "final"
    final.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    std = {f"{prefix}.lora_A.default.weight": torch.full((2, 3), 0.1),
           f"{prefix}.lora_B.default.weight": torch.full((3, 2), 0.2)}
    Posterior(std=std, hess={k: torch.ones_like(v) for k, v in std.items()}, ess=1e4, weight_decay=0.0).save(final)
    save_file({f"{prefix}.lora_A.weight": torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]]),
               f"{prefix}.lora_B.weight": torch.full((3, 2), -0.1)}, str(final / "adapter_model.safetensors"))
    return folder


def test_posterior_scale_by_hand(tmp_path):
    folder = _posterior_run(tmp_path, "v", 1, 1.0, 1.0)
    assert report.posterior_scale(folder, "ivon") == pytest.approx({"sigma": 0.15, "ratio_a": 0.2,
                                                                    "ratio_all": 0.5})
    assert report.posterior_scale(tmp_path / "nowhere", "ivon") is None
    assert report.posterior_scale(folder, "adamw") is None  # a point estimate has no σ, whatever final/ holds


def test_posterior_scale_of_blob_reads_sigma_as_rho_squared(tmp_path):
    """BLoB saves ρ per LoRA A by module name (σ = ρ², B has none): ρ = .5 → σ = .25 over |m_A| = .5 gives .5,
    and over "all" (A alone) the same."""
    from varlora.methods.blob import BLOB_FILE

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({module: torch.full((2, 3), 0.5)}, str(final / BLOB_FILE))
    save_file({f"{module}.lora_A.weight": torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]]),
               f"{module}.lora_B.weight": torch.full((3, 2), -0.1)}, str(final / "adapter_model.safetensors"))
    assert report.posterior_scale(tmp_path / "run", "blob") == pytest.approx(
        {"sigma": 0.25, "ratio_a": 0.5, "ratio_all": 0.5})
    (final / BLOB_FILE).unlink()
    assert report.posterior_scale(tmp_path / "run", "blob") is None


def test_tuning_report_states_the_rule_and_its_winner(tmp_path):
    preset = load_preset("tune-ivon-cpu")
    first, second = list(preset.variants)[:2]
    runs = tmp_path / "runs"
    # `first` has the better point prediction, `second` the better sampled predictive: the rule picks `second`
    records = tmp_path / "results" / "runs"
    for variant, nll_mean, nll_sampled in ((first, 0.5, 0.9), (second, 0.95, 0.8)):
        folder = _posterior_run(runs, variant, 21, nll_mean=nll_mean, nll_sampled=nll_sampled)
        record_run(folder, records / "arc_easy" / variant / "seed21")  # σ / |m| is kept, final/ is not
    write_report(preset, records, tmp_path / "results", run_configs(preset)[0][3])
    text = (tmp_path / "results" / "table.md").read_text()
    assert "lowest held-out NLL of the **sampled predictive** (τ = 1, 10 samples" in text
    assert "held out = 150 *training* questions (`data.holdout`; the validation split is never read)" in text
    assert f"- winner (ivon): **{second}**, row `{second} ivon`, NLL 0.800 over 1 seed(s)" in text
    assert f"| {first} | {first} ivon | 50.00 | 10.00 | 0.900 | 0.15 | 0.2 | 0.5 |" in text


def test_selected_rows_prefer_the_sampled_predictive_at_full_variance(tmp_path):
    def row(label, variant, tau, n_samples):
        return report.RunResult(tmp_path, "t", "t", label, 1, 1.0, {}, method=variant, tau=tau,
                                n_samples=n_samples, row=label, variant=variant)

    chosen = report.selected_rows([row("a[tau=0.5]", "a", 0.5, 10), row("a@mean", "a", 0.0, 1),
                                   row("a", "a", 1.0, 10), row("b", "b", None, 1), row("c", "c", None, 5)])
    assert {v: r.label for v, r in chosen.items()} == {"a": "a", "b": "b", "c": "c"}


def test_ood_and_tuning_presets():
    cpu = load_preset("cpu")
    ood_tasks = {t: c.eval.ood_tasks for t, _, _, c in run_configs(cpu, seeds=[42])}
    # the OBQA runs are also BLoB's out-of-distribution protocol; no other task evaluates elsewhere
    assert ood_tasks.pop("obqa") == ["arc_challenge", "arc_easy", "mmlu_college_chemistry", "mmlu_college_physics"]
    assert all(not v for v in ood_tasks.values())
    ood_runs = run_configs(cpu, seeds=[42], tasks=["obqa"])
    from varlora.tasks import get_task

    for task in ood_runs[0][3].eval.ood_tasks:
        assert get_task(task).num_choices == 4

    tune = load_preset("tune-ivon-cpu")
    assert tune.selection == {"metric": "nll"} and len(tune.variants) <= 8 and tune.seeds == [21]
    configs = [c for _, _, _, c in run_configs(tune)]
    grid = {(c.ivon.ess, c.ivon.hess_init) for c in configs}
    assert grid == {(ess, h0) for ess in (1e3, 1e4, 1e5) for h0 in (0.01, 0.1)}
    for c in configs:
        assert (c.data.task, c.data.holdout, c.data.train_limit, c.train.steps, c.train.batch_size) == (
            "arc_easy", 150, 64, 100, 4)
        assert (c.ivon.beta2, c.ivon.lr, c.ivon.clip_radius, c.eval.taus) == (0.99, 0.03, 1e-2, [0.0, 1.0])
    assert math.isclose(configs[0].train.steps * configs[0].train.batch_size / 64, 6.25)


def test_a_bad_selection_is_refused(tmp_path):
    from varlora.config import ConfigError

    path = tmp_path / "p.yaml"
    path.write_text("description: x\nbase: {}\nvariants: {a: {}}\ntasks: {arc_easy: null}\nseeds: [1]\n"
                    "selection: {metric: speed}\n")
    with pytest.raises(ConfigError, match="selection must be"):
        load_preset(str(path))


def test_accuracy_coverage_panels_follow_the_given_task_order(tmp_path, monkeypatch):
    for task in ("obqa", "arc_easy"):
        _fake_run(tmp_path / "runs", task, "adamw", 1, {task: {"adamw": (ID, None, M, None, 1)}})
    drawn = []
    monkeypatch.setattr(report.plots, "accuracy_coverage", lambda panels, path, **kw: drawn.append(list(panels)))
    found = report.find_runs(tmp_path / "runs")
    report.write_figures(found, tmp_path / "out", task_order=["winogrande_s", "obqa", "arc_easy"])
    report.write_figures(found, tmp_path / "out")
    assert drawn == [["obqa", "arc_easy"], ["arc_easy", "obqa"]]


def test_the_cost_table_takes_memory_from_a_rows_best_measurements_and_marks_upper_bounds(tmp_path):
    """adamw: seed 1 measured without the heap trim (4 GiB, an upper bound), seed 2 with it (1 GiB / 512 MiB):
    the row shows seed 2's figures unmarked. ivon: only untrimmed runs, so its figures are marked "≤"."""
    untrimmed = {"memory_kind": "rss_peak", "peak_train_bytes": 4 * 2**30, "peak_eval_bytes": 4 * 2**30}
    trimmed = {"memory_kind": "rss_peak_trimmed", "peak_train_bytes": 2**30, "peak_eval_bytes": 2**29}
    for seed, fields in ((1, untrimmed), (2, trimmed)):
        _fake_run(tmp_path, "obqa", "adamw", seed, {"obqa": {"adamw": (ID, None, M, None, 1)}}, **fields)
        _fake_run(tmp_path, "obqa", "ivon", seed, {"obqa": {"ivon@mean": (ID, None, M, 0.0, 1)}}, method="ivon")
    table = report.cost_table(report.find_runs(tmp_path), ["adamw", "ivon@mean"])
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
             if line.startswith("| adamw ") or line.startswith("| ivon@mean ")}
    assert cells["adamw"][7:9] == ["1024", "512"]
    assert cells["ivon@mean"][7:9] == ["≤ 1024", "≤ 512"]
    assert "(rss_peak_trimmed)" in table and "(rss_peak): an upper bound" in table and '"≤" marks' in table
    only_trimmed = report.cost_table(report.find_runs(tmp_path), ["adamw"])
    assert "(rss_peak)" not in only_trimmed and "≤" not in only_trimmed  # the note names only the kinds shown


def test_the_cost_table_gives_the_range_of_forward_passes_across_tasks(tmp_path):
    """Laplace's passes per example are 1 + K (K backward passes for the Jacobians): 3 on a two-choice task, 5 on a
    four-choice one."""
    _fake_run(tmp_path, "obqa", "laplace", 1, {"obqa": {"laplace": (ID, None, M, None, 5)}})
    _fake_run(tmp_path, "winogrande_s", "laplace", 1, {"winogrande_s": {"laplace": (ID, None, M, None, 3)}})
    _fake_run(tmp_path, "obqa", "adamw", 1, {"obqa": {"adamw": (ID, None, M, None, 1)}})
    table = report.cost_table(report.find_runs(tmp_path), ["adamw", "laplace"])
    passes = {line.split(" | ")[0].strip("| "): line.split(" | ")[6] for line in table.splitlines()[2:4]}
    assert passes == {"adamw": "1", "laplace": "3–5"}


def test_a_posthoc_rows_training_seconds_are_those_of_the_map_run_it_reuses(tmp_path):
    """The temperature record timed a retraining of the MAP adapter (99 s, on another machine); the adapter is
    the adamw run's (10 s), so both the seconds and the ratio are the MAP run's."""
    _fake_run(tmp_path, "obqa", "adamw", 1, {"obqa": {"adamw": (ID, None, M, None, 1)}})
    _fake_run(tmp_path, "obqa", "temperature", 1, {"obqa": {"temperature": (ID, None, M, None, 1)}},
              train_seconds=99.0, fit_seconds=5.0)
    table = report.cost_table(report.find_runs(tmp_path), ["adamw", "temperature"])
    row = next(line for line in table.splitlines() if line.startswith("| temperature |")).split(" | ")
    assert row[1:5] == ["10", "1.00", "5.0", "1.50"]


def test_learning_curves_judge_the_regime_by_hand(tmp_path):
    """Labels 0 1 2 3 repeat (majority 25 %, chance 25 %, so learned means a best accuracy >= 35 %); the
    AdamW curve's NLL is lowest at step 4 and rises after it (over-fits), IVON's falls to the end; a post-hoc
    method's copy of the MAP curve is not a row."""
    curves = {"adamw": [(0, 30.0, 1.40), (4, 40.0, 1.10), (8, 36.0, 1.25)],
              "ivon": [(0, 30.0, 1.40), (4, 33.0, 1.20), (8, 34.0, 1.15)],
              "temperature": [(0, 30.0, 1.40), (4, 40.0, 1.10), (8, 36.0, 1.25)]}
    results = []
    for variant, rows in curves.items():
        label = "ivon@mean" if variant == "ivon" else variant
        folder = _fake_run(tmp_path, "obqa", variant, 1, {"obqa": {label: (ID, None, M, None, 1)}})
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps(summary | {"n_train": 16}))
        (folder / "config.json").write_text(json.dumps({"train": {"batch_size": 4}}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"kind": "eval", "step": s, "acc": a, "nll": n})
                                                      + "\n" for s, a, n in rows))
        results += report.find_runs(folder)
    table = report.learning_curves(results).splitlines()
    assert len(table) == 4  # header, rule, adamw, ivon
    adamw, ivon = ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])
    assert adamw == ["obqa", "adamw", "1", "16", "2.0", "25.0", "25.0", "30.0 / 1.400", "1.100 (1.0)", "40.0",
                     "40.0", "36.0 / 1.250", "yes", "yes"]
    assert ivon[1] == "ivon" and ivon[-2:] == ["no", "no"] and ivon[8] == "1.150 (2.0)"
