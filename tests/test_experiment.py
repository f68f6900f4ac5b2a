"""Experiment presets parse and expand; the report aggregates seeds as mean ± standard error."""

import json
import math
from dataclasses import replace
from importlib import resources

import pytest
import torch
from safetensors.torch import save_file

from varlora import report
from varlora.config import ConfigError
from varlora.experiment import _merge, load_preset, run_configs, write_report

SHIPPED = sorted(p.name.removeprefix("experiment_").removesuffix(".yaml").replace("_", "-")
                 for p in (resources.files("varlora") / "recipes").iterdir() if p.name.endswith(".yaml"))


def test_the_expected_presets_are_shipped():
    assert {"cpu", "paper", "demo", "tune-cpu"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_expands_to_valid_configs(name):
    preset = load_preset(name)
    runs = run_configs(preset)
    from varlora.methods import get_method

    once = [v for v in preset.variants if get_method(run_configs(preset, variants=[v])[0][3].method.name)
            .seed_independent]  # zero-shot variants run at the first seed only
    seeds_of = {v: preset.variant_seeds.get(v, preset.seeds) for v in preset.variants if v not in once}
    assert len(runs) == len(preset.tasks) * (sum(len(s) for s in seeds_of.values()) + len(once))
    assert [seed for _, _, seed, _ in runs] == sorted(seed for _, _, seed, _ in runs)  # seed-major
    for task, _variant, seed, config in runs:
        assert config.data.task == task and config.train.seed == seed


def test_paper_preset_matches_the_published_hyperparameters():
    runs = {(t, v): c for t, v, s, c in run_configs(load_preset("paper"), seeds=[21])}
    ivon = runs[("winogrande_m", "ivon")]
    assert (ivon.ivon.ess, ivon.ivon.hess_init, ivon.ivon.lr, ivon.ivon.clip_radius) == (1e8, 3e-4, 0.03, 1e-3)
    assert ivon.ivon.beta2 == 0.99999 and ivon.ivon.rescale_lr is False and ivon.ivon.weight_decay == 0.0
    assert runs[("arc_easy", "ivon")].ivon.ess == 1e6
    adamw = runs[("obqa", "adamw")]
    assert adamw.method.name == "adamw" and adamw.adamw.lr == 5e-5
    assert adamw.train.steps == 10_000 and adamw.train.batch_size == 4 and adamw.data.scoring == "letter"
    assert adamw.model.name == "meta-llama/Llama-2-7b-hf"


def test_seed_overrides_apply_to_their_seed_only(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("description: x\nbase: {eval: {taus: [0.0, 1.0]}}\nvariants: {ivon: {method: {name: ivon}}}\n"
                    "tasks: {arc_easy: null, obqa: {train: {steps: 3}}}\nseeds: [1, 2]\n"
                    "seed_overrides: {1: {eval: {taus: [0.0, 0.5, 1.0]}}}\n")
    runs = {(t, s): c for t, _, s, c in run_configs(load_preset(str(path)))}
    assert runs[("arc_easy", 1)].eval.taus == [0.0, 0.5, 1.0] and runs[("obqa", 1)].eval.taus == [0.0, 0.5, 1.0]
    assert runs[("arc_easy", 2)].eval.taus == [0.0, 1.0]
    assert runs[("obqa", 2)].train.steps == 3 and runs[("arc_easy", 2)].train.steps == 200


def test_a_zero_shot_variant_runs_once_at_the_first_seed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("description: x\nbase: {}\nvariants: {ivon: {method: {name: ivon}}, "
                    "zs: {method: {name: zero_shot}}}\ntasks: {arc_easy: null}\nseeds: [5, 3]\n")
    preset = load_preset(str(path))
    assert [(v, s) for _, v, s, _ in run_configs(preset)] == [("ivon", 5), ("zs", 5), ("ivon", 3)]
    assert [(v, s) for _, v, s, _ in run_configs(preset, seeds=[3])] == [("ivon", 3)]
    with pytest.raises(ConfigError, match=r"no run for seeds \[3\] of the variants \['zs'\].*first seed, 5"):
        run_configs(preset, seeds=[3], variants=["zs"])  # was an IndexError in run_experiment


def test_variant_seeds_run_a_variant_on_fewer_seeds(tmp_path):
    path = tmp_path / "p.yaml"
    text = ("description: x\nbase: {}\nvariants: {a: {method: {name: adamw}}, d: {method: {name: mc_dropout}}}\n"
            "tasks: {arc_easy: null}\nseeds: [5, 3]\nvariant_seeds: {d: [5]}\n")
    path.write_text(text)
    assert [(v, s) for _, v, s, _ in run_configs(load_preset(str(path)))] == [("a", 5), ("d", 5), ("a", 3)]
    for bad in ("{x: [5]}", "{d: [7]}"):
        path.write_text(text.replace("{d: [5]}", bad))
        with pytest.raises(ConfigError, match="variant_seeds"):
            load_preset(str(path))


def test_merge_is_deep_and_does_not_mutate():
    base = {"train": {"steps": 5, "seed": 1}, "eval": {"taus": [0.0]}}
    merged = _merge(base, {"train": {"steps": 9}, "eval": {"taus": [1.0]}})
    assert merged == {"train": {"steps": 9, "seed": 1}, "eval": {"taus": [1.0]}}
    assert base["train"]["steps"] == 5


def test_bad_presets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    path = tmp_path / "p.yaml"
    path.write_text("description: x\nbase: {}\nvariants: {a: {}}\ntasks: {arc_easy: null}\n")
    with pytest.raises(ConfigError, match="needs the keys"):
        load_preset(str(path))
    path.write_text("description: x\nbase: {train: {steps: -1}}\nvariants: {a: {}}\ntasks: {arc_easy: null}\n"
                    "seeds: [1]\n")
    with pytest.raises(ConfigError, match="train.steps=-1"):
        load_preset(str(path))


def _fake_run(root, task, variant, seed, metrics_by_label, seconds=10.0, method=None):
    """A finished run folder as train_run leaves it: summary.json and the evaluation probabilities."""
    method = method or variant
    folder = root / task / variant / f"seed{seed}"
    (folder / "eval").mkdir(parents=True)
    probs = torch.softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(seed)), dim=-1)
    save_file({"labels": torch.arange(20) % 4} | {f"probs/{m}": probs.clone() for m in metrics_by_label},
              str(folder / "eval" / f"{task}.probs.safetensors"))
    rows = [{"label": label, "method": method, "tau": {"ivon@mean": 0.0, "ivon": 1.0}.get(label), "n_samples": 1,
             "forward_passes": 1} for label in metrics_by_label]
    cost = {"train_seconds": seconds, "fit_seconds": 0.0, "eval_seconds": {task: 2.0}, "peak_train_bytes": 2**30,
            "peak_eval_bytes": 2**29, "extra_param_bytes": 0, "optimizer_state_bytes": 2**20,
            "memory_kind": "rss_peak_trimmed", "trained_in": "this run"}
    (folder / "summary.json").write_text(json.dumps({
        "task": task, "seed": seed, "method": method, "train_seconds": seconds,
        "results": {task: {k: v | {"n": 20} for k, v in metrics_by_label.items()}}, "rows": {task: rows},
        "cost": cost}))
    return folder


def _m(acc, ece=10.0, nll=1.0, brier=0.5):
    return {"acc": acc, "ece": ece, "nll": nll, "brier": brier, "n_bins": 10}


def test_aggregate_mean_and_standard_error(tmp_path):
    for seed, acc in ((1, 50.0), (2, 60.0), (3, 70.0)):
        _fake_run(tmp_path, "t1", "adamw", seed, {"adamw": _m(acc)})
        _fake_run(tmp_path, "t2", "adamw", seed, {"adamw": _m(acc + 10)})
    _fake_run(tmp_path, "t2", "ivon", 1, {"ivon@mean": _m(99.0)})
    table = report.aggregate(report.find_runs(tmp_path), ["adamw", "ivon@mean"], ["t1", "t2"])
    mean, se, n = table["adamw"]["t1"]["acc"]
    # values 50, 60, 70: mean 60, sample std 10, s.e. 10 / sqrt(3)
    assert (mean, n) == (60.0, 3) and se == pytest.approx(10 / math.sqrt(3))
    assert table["adamw"]["average"]["acc"][:2] == pytest.approx((65.0, 10 / math.sqrt(3)))
    assert "average" not in table["ivon@mean"]  # seed 1 lacks task t1
    assert math.isnan(table["ivon@mean"]["t2"]["acc"][1])
    md = report.markdown_table(table, ["t1", "t2"])
    assert "| adamw | 60.0 ± 5.8 | 70.0 ± 5.8 | 65.0 ± 5.8 |" in md
    assert "| ivon@mean | – | 99.0 | – |" in md
    assert "adamw,t1,acc,60,5.7735,3" in report.csv_table(table)


def test_nll_and_brier_are_shown_to_three_decimals(tmp_path):
    # two-choice tasks put every NLL near ln 2: 0.693 and 0.705 must not both print as 0.70
    _fake_run(tmp_path, "t1", "adamw", 1, {"adamw": _m(50.0, nll=0.6931, brier=0.5004)})
    _fake_run(tmp_path, "t1", "ivon", 1, {"ivon@mean": _m(51.0, nll=0.7049, brier=0.5051)})
    table = report.aggregate(report.find_runs(tmp_path), ["adamw", "ivon@mean"], ["t1"])
    md = report.markdown_table(table, ["t1"], metrics=report.METRICS)
    assert "| adamw | 0.693 |" in md and "| ivon@mean | 0.705 |" in md
    assert "| adamw | 0.500 |" in md and "| ivon@mean | 0.505 |" in md
    assert "| adamw | 50.0 |" in md


def test_write_report_labels_tuning_variants(tmp_path):
    preset = load_preset("tune-cpu")
    task = next(iter(preset.tasks))
    variant = next(v for v in preset.variants if v.startswith("ivon-"))
    _fake_run(tmp_path / "runs", task, variant, preset.seeds[0], {"ivon@mean": _m(40.0), "ivon": _m(41.0)},
              method="ivon")
    _fake_run(tmp_path / "runs", task, "adamw-lr1e-3", preset.seeds[0], {"adamw": _m(30.0)}, seconds=5.0,
              method="adamw")
    write_report(preset, tmp_path / "runs", tmp_path / "results", run_configs(preset)[0][3])
    text = (tmp_path / "results" / "table.md").read_text()
    assert f"| {variant} ivon@mean | 40.0 |" in text and "Scoring protocol: **cloze**" in text
    assert "| adamw-lr1e-3 adamw | 30.0 |" in text and f"{task} 20" in text  # evaluation size stated
    # the cost table: IVON's training time as a multiple of the MAP run's, on the same task and seed
    assert f"| {variant} ivon | 10 | 2.00 | 0.0 | 2.00 | 2.0 | 1 | 1024 | 512 | 0.00 | 1.00 |" in text
    assert "rank ACC %" in text and (tmp_path / "results" / "reliability.png").exists()


def test_rank_table_orders_and_shares_ties():
    cell = {"acc": (0, 0, 1), "ece": (0, 0, 1)}
    table = {"a": {"t1": cell | {"acc": (60.0, 0, 1)}, "t2": cell | {"acc": (50.0, 0, 1)}},
             "b": {"t1": cell | {"acc": (70.0, 0, 1)}, "t2": cell | {"acc": (50.0, 0, 1)}}}
    text = report.rank_table(table, ["t1", "t2"], ("acc", "ece"))
    assert "| a | 1.75 | 1.50 |" in text and "| b | 1.25 | 1.50 |" in text


def test_rank_table_ranks_only_the_tasks_every_row_has():
    """A rank among fewer rows is not comparable: c's missing t2 removes t2 for a and b too."""
    cell = {"acc": (0, 0, 1)}
    table = {"a": {"t1": {"acc": (60.0, 0, 1)}, "t2": {"acc": (10.0, 0, 1)}},
             "b": {"t1": {"acc": (70.0, 0, 1)}, "t2": {"acc": (90.0, 0, 1)}},
             "c": {"t1": cell}}
    text = report.rank_table(table, ["t1", "t2"], ("acc",))
    assert "Tasks ranked: t1 (" in text
    assert "| b | 1.00 |" in text and "| a | 2.00 |" in text and "| c | 3.00 |" in text
    without_c = report.rank_table(table, ["t1", "t2"], ("acc",), rows=["a", "b"])
    assert "Tasks ranked: t1, t2 (" in without_c and "| a | 2.00 |" in without_c and "| c |" not in without_c



def test_tau_curves_use_only_the_seeds_that_evaluated_every_tau(tmp_path):
    def result(label: str, seed: int, acc: float) -> report.RunResult:
        method = "adamw" if label == "adamw" else "ivon"
        tau = {"ivon@mean": 0.0, "ivon[tau=0.5]": 0.5, "ivon": 1.0}.get(label)
        return report.RunResult(tmp_path, "arc_easy", "arc_easy", label, seed, 1.0,
                                {"acc": acc, "nll": acc / 100, "ece": acc / 10}, method=method, tau=tau,
                                row=label, variant=method)

    results = [result("ivon@mean", 1, 60.0), result("ivon[tau=0.5]", 1, 61.0), result("ivon", 1, 62.0),
               result("adamw", 1, 50.0), result("ivon@mean", 2, 70.0), result("ivon", 2, 80.0),
               result("adamw", 2, 90.0)]
    curves, baselines, seeds, styles = report._tau_curves(results)
    assert seeds == {1}  # seed 2 lacks τ = 0.5: averaging it into τ 0 and 1 only would bend the curve
    assert [(row["tau"], row["acc"]) for row in curves["arc_easy"]] == [(0.0, 60.0), (0.5, 61.0), (1.0, 62.0)]
    assert baselines["arc_easy"]["acc"] == 50.0
    assert styles == {"arc_easy": {"color": "C0", "label": "ivon"}}  # from the runs and their methods
    assert (baselines["arc_easy"]["label"], baselines["arc_easy"]["color"]) == ("adamw", "C3")
    both = report._tau_curves([r for r in results if r.label != "ivon[tau=0.5]"])
    assert both[2] == {1, 2} and both[0]["arc_easy"][0]["acc"] == 65.0 and both[1]["arc_easy"]["acc"] == 70.0
    boolq = [replace(r, train_task="boolq", eval_task="boolq") for r in results]
    assert list(report._tau_curves(boolq + results)[0]) == ["arc_easy", "boolq"]  # default: sorted
    assert list(report._tau_curves(boolq + results, ["boolq", "arc_easy"])[0]) == ["boolq", "arc_easy"]


def test_a_posthoc_variant_reuses_the_map_variant_even_when_run_alone(tmp_path):
    """`--variants temperature` must still find the adamw variant's run of the same task and seed."""
    from varlora.experiment import _reuse_source

    path = tmp_path / "p.yaml"
    path.write_text("description: x\nbase: {adamw: {lr: 0.01}}\nvariants: {map: {method: {name: adamw}}, "
                    "other: {method: {name: adamw}, adamw: {lr: 0.5}}, t: {method: {name: temperature}}}\n"
                    "tasks: {arc_easy: null}\nseeds: [1, 2]\n")
    preset = load_preset(str(path))
    [(task, _, seed, config)] = run_configs(preset, variants=["t"], seeds=[2])
    source = _reuse_source(run_configs(preset), task, seed, config)
    assert source[:3] == ("arc_easy", "map", 2)  # not "other": its training differs


def test_best_within_budget_leaves_out_rows_over_budget_and_ranks_each_metric():
    cell = {"acc": (50.0, 0, 1), "nll": (1.0, 0, 1)}
    table = {"map": {"t1": cell, "t2": cell},
             "cheap": {"t1": cell | {"acc": (60.0, 0, 1), "nll": (0.9, 0, 1)}, "t2": cell | {"nll": (1.2, 0, 1)}},
             "costly": {"t1": cell | {"acc": (90.0, 0, 1), "nll": (0.1, 0, 1)}, "t2": cell},
             "unmeasured": {"t1": cell | {"acc": (99.0, 0, 1)}}}
    ratios = {"map": 1.0, "cheap": 1.1, "costly": 3.0, "just_over": 1.1004}
    text = report.best_within_budget(table | {"just_over": table["map"]}, ratios, ["t1", "t2"], budget=1.1,
                                     metrics=("acc", "nll"))
    assert "over budget: costly (3.00×), just_over (1.1004×)" in text  # not "1.10×", which reads as within
    assert "the cost table's × MAP training column" in text
    assert "| ACC % | cheap 60.0 · map 50.0 | cheap 50.0 · map 50.0 | – |" in text  # ties: by label
    assert "| NLL | cheap 0.900 · map 1.000 | map 1.000 · cheap 1.200 | – |" in text


def test_training_cost_ratios_divide_by_the_map_run_of_the_same_task_and_seed(tmp_path):
    def result(label, method, task, seed, seconds):
        return report.RunResult(tmp_path, task, task, label, seed, seconds, {}, method=method,
                                cost={"train_seconds": seconds})

    results = [result("adamw", "adamw", "a", 1, 100.0), result("adamw", "adamw", "a", 2, 200.0),
               result("ivon", "ivon", "a", 1, 110.0), result("ivon", "ivon", "a", 2, 180.0),
               result("ivon", "ivon", "b", 1, 50.0)]  # no MAP run on task b: not counted
    ratios = report.training_cost_ratios(results)
    assert ratios == pytest.approx({"adamw": 1.0, "ivon": (1.1 + 0.9) / 2})


def test_a_posthoc_method_trains_at_the_map_cost_and_its_fit_counts_only_with_fit(tmp_path):
    """Laplace's record timed a retraining of the MAP adapter (80 s on another machine): still 1× MAP."""
    def result(label, seconds, fit):
        return report.RunResult(tmp_path, "a", "a", label, 1, seconds, {}, method=label,
                                cost={"train_seconds": seconds, "fit_seconds": fit})

    results = [result("adamw", 100.0, 0.0), result("laplace", 80.0, 50.0), result("ivon", 105.0, 0.01)]
    assert report.training_cost_ratios(results) == pytest.approx({"adamw": 1.0, "laplace": 1.0, "ivon": 1.05})
    assert report.training_cost_ratios(results, with_fit=True) == pytest.approx(
        {"adamw": 1.0, "laplace": 1.5, "ivon": 1.0501})
