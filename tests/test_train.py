"""End to end on a tiny random Llama: train with each optimizer, kill and resume, reload and re-evaluate."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_assets, write_colour_data
from varlora.cli import main
from varlora.config import ConfigError, RunConfig
from varlora.schedule import batch_indices, linear_schedule
from varlora.train import RunPaths, task_file_stem, train_run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


def _config(assets, method: str, **train) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": assets["model"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "method": {"name": method},
        "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64},
        "train": {"steps": 6, "batch_size": 4, "grad_accum": 2, "save_every": 2,
                  "eval_every": 3, "max_grad_norm": 1.0, "seed": 3} | train,
        "ivon": {"lr": 0.1, "ess": 1e4, "hess_init": 0.1, "beta2": 0.99, "clip_radius": 1.0, "mc_samples": 2},
        "adamw": {"lr": 1e-2},
        "eval": {"n_samples": 3, "taus": [0.0, 0.5, 1.0], "batch_size": 5},
    })


def test_task_file_stems_are_flat_and_distinct():
    assert task_file_stem("arc_easy") == "arc_easy"
    a, b = task_file_stem("jsonl:train=/x/a.jsonl"), task_file_stem("jsonl:train=/y/a.jsonl")
    assert "/" not in a and ":" not in a and a != b


def test_schedule_and_data_order_are_stateless():
    f = linear_schedule(2, 10)
    assert [f(s) for s in range(4)] == [0.5, 1.0, 1.0, 7 / 8]
    assert f(10) == 0.0
    first_epoch = sum((batch_indices(s, 4, 12, seed=1) for s in range(3)), [])
    assert sorted(first_epoch) == list(range(12))  # every example once per epoch
    second_epoch = sum((batch_indices(s, 4, 12, seed=1) for s in range(3, 6)), [])
    assert sorted(second_epoch) == list(range(12)) and second_epoch != first_epoch  # reshuffled each epoch
    assert batch_indices(1, 4, 12, seed=2) != batch_indices(1, 4, 12, seed=1)


@pytest.mark.parametrize("optimizer", ["adamw", "ivon"])
def test_train_evaluate_and_reload_reproduce_metrics(assets, tmp_path, optimizer, capsys):
    run = tmp_path / optimizer
    summary = train_run(_config(assets, optimizer), run, log=lambda _: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 3, 6]
    methods = summary["results"][summary["task"]]
    expected = {"adamw"} if optimizer == "adamw" else {"ivon@mean", "ivon[tau=0.5]", "ivon"}
    assert set(methods) == expected
    if optimizer == "ivon":
        with_stats = [r for r in rows if r["kind"] == "train" and "clip_fraction" in r]  # IVON: steps 1, 11, ...
        assert with_stats[0]["step"] == 1 and all(0.0 <= r["clip_fraction"] <= 1.0 for r in with_stats)
        assert (run / "final" / "posterior.safetensors").is_file()
        # different tau -> different (sampled) predictions
        assert methods["ivon"]["nll"] != methods["ivon@mean"]["nll"]
    # the LoRA weights moved away from their initialisation (B starts at 0)
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    # `varlora eval` reloads base + adapter + posterior and reproduces the saved metrics exactly
    saved = json.loads(RunPaths(run).eval_json(summary["task"]).read_text())
    assert len(list((run / "eval").iterdir())) == 2  # a jsonl spec becomes one flat, safe file name
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "reproduces the metrics saved by training" in capsys.readouterr().out
    assert json.loads(RunPaths(run).eval_json(summary["task"]).read_text())["predictions"] == saved["predictions"]
    # out of distribution: the same posterior evaluated on another task's data
    other = f"jsonl:validation={write_colour_data(run, 10, seed=5)}"
    assert main(["eval", str(run), "--task", other]) == 0
    ood = json.loads(RunPaths(run).eval_json(other).read_text())
    assert ood["task"] == other and ood["train_task"] == summary["task"] and ood["n_examples"] == 10
    assert {row["label"] for row in ood["predictions"]} == set(methods)
    # a finished run is not trained again
    assert train_run(_config(assets, optimizer), run, log=lambda _: None)["results"] == summary["results"]


def test_zero_shot_evaluates_the_base_model(assets, tmp_path):
    from varlora.evaluate import predict_logits
    from varlora.train import setup

    config = _config(assets, "zero_shot", eval_every=0)
    summary = train_run(config, tmp_path / "zs", log=lambda _: None)
    assert list(summary["results"][summary["task"]]) == ["zero-shot"] and summary["train_seconds"] == 0.0
    assert not (tmp_path / "zs" / "final" / "posterior.safetensors").exists()
    # a zero-shot run never steps: no optimizer's section can make it a different run
    retuned = RunConfig.from_dict(config.to_dict() | {"adamw": {"lr": 0.5}, "ivon": {"ess": 7.0}})
    assert train_run(retuned, tmp_path / "zs", log=lambda _: None) == summary
    session = setup(config, tmp_path / "other")  # LoRA B = 0: the adapter adds nothing to the base model
    with session.model.disable_adapter():
        base = torch.softmax(predict_logits(session.model.eval(), session.scorer, session.val_examples,
                                            config.eval.batch_size), -1)
    saved = load_file(str(RunPaths(tmp_path / "zs").eval_probs(summary["task"])))["probs/zero-shot"]
    torch.testing.assert_close(saved, base, rtol=0, atol=1e-12)


def test_a_different_config_in_the_same_folder_is_refused(assets, tmp_path):
    first = _config(assets, "adamw", steps=2, eval_every=0)
    summary = train_run(first, tmp_path, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"train.steps: saved 2, given 3"):
        train_run(_config(assets, "adamw", steps=3, eval_every=0), tmp_path, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"adamw.lr: saved 0.01, given 0.02"):
        train_run(RunConfig.from_dict(first.to_dict() | {"adamw": {"lr": 0.02}}), tmp_path, log=lambda _: None)
    # the IVON section cannot affect an AdamW run: changing it is not a different run
    other_ivon = RunConfig.from_dict(first.to_dict() | {"ivon": {"beta2": 0.5}})
    assert train_run(other_ivon, tmp_path, log=lambda _: None) == summary


def test_truncation_of_every_split_is_logged_and_recorded(assets, tmp_path):
    """summary.json's ``truncation``, per split, equals an oracle: each example's full encoding (max_length
    large enough for all) less the one fitted to max_length; the log has one line per split."""
    from varlora.scoring import make_scorer
    from varlora.tasks import get_task

    ood = f"jsonl:validation={write_colour_data(tmp_path, 6, seed=4)}"
    config = RunConfig.from_dict(_config(assets, "adamw", steps=1, eval_every=0).to_dict()
                                 | {"data": {"task": assets["task"], "scoring": "cloze", "max_length": 26,
                                             "train_limit": 40},
                                    "eval": {"ood_tasks": [ood], "batch_size": 5}})
    messages: list[str] = []
    summary = train_run(config, tmp_path / "run", log=messages.append)

    def oracle(task_name: str, examples) -> dict:
        full, fitted = (make_scorer("cloze", _tokenizer(assets), get_task(task_name), max_length=n)
                        for n in (10**4, 26))
        cuts = [c for ex in examples if (c := max(len(a) - len(b) for (a, _), (b, _) in
                                                   zip(full.encode(ex), fitted.encode(ex), strict=True)))]
        return {"examples": len(examples), "max_length": 26, "truncated": len(cuts),
                "tokens_cut": {"total": sum(cuts), "mean": statistics.fmean(cuts), "median": statistics.median(cuts),
                               "max": max(cuts)}}

    task = get_task(assets["task"])
    pool = task.load("train")
    train = task.load("train", limit=40, seed=3)
    unused = [ex for ex in pool if ex not in train]
    expected = {"train": oracle(assets["task"], train), "validation": oracle(assets["task"], task.load("validation")),
                "unused train": oracle(assets["task"], unused),
                f"{ood} validation": oracle(ood, get_task(ood).load("validation"))}
    assert summary["truncation"] == expected
    assert all(record["truncated"] > 0 for record in expected.values())
    for label in ("train", "validation", "unused train"):
        record = expected[label]
        line = (f"{assets['task']} {label}: {record['truncated']} of {record['examples']} examples truncated to "
                f"max_length 26, by {record['tokens_cut']['mean']:.1f} tokens on average (median ")
        assert sum(m.startswith(line) for m in messages) == 1, line


def _tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


def test_unscorable_rows_stop_the_run_before_its_first_step(assets, tmp_path, capsys):
    """A jsonl file with two rows whose answer is longer than max_length: the run stops in setup, listing both
    rows by file and line, and writes no step."""
    bad = tmp_path / "bad.jsonl"
    train_file, val_file = re.fullmatch(r"jsonl:train=(.*),validation=(.*)", assets["task"]).groups()
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
    rows[1]["choices"][2] = "red " * 40
    rows[4]["choices"][0] = "blue " * 40
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--model.name", assets["model"], "--data.task",
            f"jsonl:train={bad},validation={val_file}", "--data.max_length", "32",
            "--lora.r", "4", "--method.name", "adamw", "--train.steps", "2", "--train.eval_every", "0"]
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("varlora train: error: "))
    err = [lines[first], *(line for line in lines[first + 1 :] if line.startswith("  "))]
    assert err[0].startswith("varlora train: error: 2 of the 48 rows of jsonl:train=") and err[0].endswith(
        " train cannot be scored (cloze scoring, max_length 32); fix or remove them:")
    assert err[1].startswith(f"  {bad}, line 2 (example 's1q1'): the continuation of choice 2 (' red red")
    assert err[2].startswith(f"  {bad}, line 5 (example 's1q4'): the continuation of choice 0 (' blue blue")
    assert all("leaves no room for its context within max_length = 32" in line for line in err[1:3])
    assert len(err) == 3
    assert not RunPaths(run).metrics.exists() and not (run / "final").exists()
    assert not list(run.glob("checkpoint*"))


def _train_command(assets, run: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "varlora.cli", "train", "--run-dir", str(run), "--model.name", assets["model"],
            "--data.task", assets["task"], "--data.max_length", "64", "--lora.r", "4",
            "--method.name", "ivon", "--train.steps", str(steps), "--train.save_every", "7",
            "--train.eval_every", "0", "--ivon.lr", "0.1", "--ivon.ess", "1e4", "--ivon.hess_init", "0.1",
            "--ivon.clip_radius", "1.0", "--ivon.beta2", "0.99", "--eval.n_samples", "2"]


def test_killed_run_resumes_bit_for_bit(assets, tmp_path):
    """SIGKILL a real training process in the middle of a step after its first checkpoint; the rerun resumes from
    that checkpoint and ends exactly like a clean run."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    steps = 120
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_train_command(assets, clean, steps), check=True, env=env, capture_output=True)
    process = subprocess.Popen(_train_command(assets, killed, steps), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def steps_done() -> int:  # the last complete row of metrics.jsonl (a torn last line is ignored)
        rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()[:-1]] \
            if (killed / "metrics.jsonl").exists() else []
        return max((r["step"] for r in rows), default=0)

    deadline = time.time() + 120
    while not (steps_done() > 7 + 1 and (killed / "checkpoint.safetensors").exists()) and time.time() < deadline \
            and process.poll() is None:
        time.sleep(0.01)
    had_checkpoint = (killed / "checkpoint.safetensors").exists()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert had_checkpoint, "no checkpoint was written before the kill"
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    rerun = subprocess.run(_train_command(assets, killed, steps), check=True, env=env, capture_output=True,
                           text=True)
    resumed = re.search(rf"resuming {re.escape(str(killed))} from step (\d+)/{steps}", rerun.stdout)
    assert resumed and int(resumed.group(1)) > 0 and int(resumed.group(1)) % 7 == 0, rerun.stdout
    a = load_file(str(clean / "final" / "adapter_model.safetensors"))
    b = load_file(str(killed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa = load_file(str(clean / "final" / "posterior.safetensors"))
    pb = load_file(str(killed / "final" / "posterior.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert losses(clean) == losses(killed)


def test_a_base_model_in_memory_gives_the_session_of_the_same_model_loaded_from_disk(assets, tmp_path):
    from conftest import tiny_llama, tiny_tokenizer
    from varlora.evaluate import predict_logits
    from varlora.session import setup

    config = _config(assets, "adamw")
    loaded = setup(config, tmp_path / "a")
    given = setup(config, tmp_path / "b", base_model=tiny_llama(seed=0), tokenizer=tiny_tokenizer())
    assert list(given.params) == list(loaded.params)
    assert all(torch.equal(given.params[n], loaded.params[n]) for n in loaded.params)  # same seeded LoRA init
    frozen = [p for n, p in given.model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen) and all(p.requires_grad for p in given.params.values())
    examples = loaded.val_examples[:6]
    assert torch.equal(predict_logits(given.model.eval(), given.scorer, examples, 3),
                       predict_logits(loaded.model.eval(), loaded.scorer, examples, 3))
    with pytest.raises(ValueError, match="base_model and tokenizer together"):
        setup(config, tmp_path / "c", base_model=tiny_llama(seed=0))
