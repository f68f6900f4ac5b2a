"""The predictive API (`varlora.load(...).predict`) and `varlora predict`, on every registered method.

A reloaded run predicts on the validation file it was evaluated on exactly what training saved, without
reading any task data; the per-example fields follow from the probabilities; the CLI writes them as JSONL.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import varlora
from conftest import build_assets
from test_methods import _config, _quiet
from varlora.cli import main
from varlora.methods import METHODS
from varlora.metrics import mutual_information, predictive_entropy
from varlora.run_paths import RunPaths
from varlora.tasks.registry import JsonlTask
from varlora.train import train_run

TFB = {"n_anchor": 8, "search_steps": 2, "search_samples": 2}  # fits the 24 unused training questions


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"), n_train=48, n_val=12)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {}

    def get(name: str):
        if name not in runs:
            runs[name] = root / name
            train_run(_config(assets, name, train={"steps": 2, "eval_every": 0}, tfb=TFB), runs[name], log=_quiet)
        return runs[name]

    return get


def _validation_file(assets) -> str:
    return assets["task"].split("validation=")[1]


def _no_task_data(monkeypatch):
    def refuse(self, split, data_dir):
        raise AssertionError(f"task data read: {self.name} {split}")

    monkeypatch.setattr(JsonlTask, "_load", refuse)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_predicts_what_training_saved_without_task_data(name, assets, finished, monkeypatch):
    run = finished(name)
    paths = RunPaths(run)
    task = json.loads(paths.eval_json(assets["task"]).read_text())
    saved = load_file(str(paths.eval_probs(assets["task"])))
    _no_task_data(monkeypatch)
    model = varlora.load(run)
    rows = model.predict(_validation_file(assets))
    assert len(rows) == task["n_examples"] == 12
    expected = next((r for r in task["predictions"] if f"sample_probs/{r['label']}" in saved),
                    task["predictions"][0])
    first = rows[0]
    assert first.row == expected["label"] and first.method == name and first.n_samples == expected["n_samples"]
    probs = torch.tensor([r.probs for r in rows], dtype=torch.float64)
    torch.testing.assert_close(probs, saved[f"probs/{first.row}"], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor([r.answer for r in rows]), saved["labels"])
    torch.testing.assert_close(torch.tensor([r.entropy for r in rows], dtype=torch.float64),
                               predictive_entropy(probs))
    for r in rows:
        assert r.prediction == max(range(4), key=r.probs.__getitem__) and r.choice == r.choices[r.prediction]
        assert r.confidence == max(r.probs)
    if f"sample_probs/{first.row}" in saved:
        sample = saved[f"sample_probs/{first.row}"]
        torch.testing.assert_close(torch.tensor([r.sample_probs for r in rows], dtype=torch.float64).transpose(0, 1),
                                   sample, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.tensor([r.mutual_information for r in rows], dtype=torch.float64),
                                   mutual_information(sample))
    else:
        assert all(r.sample_probs is None and r.mutual_information == 0.0 for r in rows)


def test_inputs_rows_tau_and_samples(assets, finished, tmp_path, monkeypatch):
    run = finished("ivon")
    _no_task_data(monkeypatch)
    model = varlora.load(run, model=assets["model"])
    one = model.predict("Which colour is red?", choices=["blue", "red", "green"])
    assert isinstance(one, varlora.ExamplePrediction) and one.answer is None and len(one.probs) == 3
    assert one.row == "ivon" and one.tau == 1.0 and len(one.sample_probs) == 3  # the run's eval.n_samples
    assert abs(sum(one.probs) - 1) < 1e-9 and one.mutual_information > 0
    # a dict, an explicit list, more samples, another tau and a row by label
    same = model.predict({"question": "Which colour is red?", "choices": ["blue", "red", "green"]})
    assert same.probs == one.probs  # the same eval seed: the same samples
    many = model.predict([{"question": "Which colour is red?", "choices": ["blue", "red", "green"], "answer": 1},
                          {"id": "x", "question": "Which colour is blue?", "choices": ["blue", "red"]}],
                         n_samples=5, tau=0.5)
    assert [m.id for m in many] == ["input-1", "x"] and [m.answer for m in many] == [1, None]
    assert all(m.tau == 0.5 and m.n_samples == 5 and len(m.sample_probs) == 5 for m in many)
    assert [len(m.probs) for m in many] == [3, 2]
    mean = model.predict("Which colour is red?", choices=["blue", "red", "green"], row="ivon@mean")
    assert mean.sample_probs is None and mean.mutual_information == 0.0 and mean.n_samples == 1
    assert model.predict("Which colour is red?", choices=["blue", "red", "green"], tau=0.0).probs == mean.probs
    # the run's own config is untouched by the overrides
    assert model.config.eval.n_samples == 3 and model.config.eval.taus == [0.0, 1.0]
    with pytest.raises(ValueError, match="has no row 'blob'"):
        model.predict("q?", choices=["a", "b"], row="blob")
    with pytest.raises(ValueError, match="eval.taus"):
        model.predict("q?", choices=["a", "b"], tau=2.0)
    with pytest.raises(FileNotFoundError, match="choices="):
        model.predict("Which colour is red?")
    with pytest.raises(ValueError, match="choices"):
        model.predict({"question": "q?", "choices": ["only one"]})


def test_load_needs_no_task_files(assets, tmp_path):
    """The run's task files deleted after training: prediction still works."""
    data = tmp_path / "data"
    data.mkdir()
    train, val = data / "train.jsonl", data / "val.jsonl"
    shutil.copy(assets["task"].split("train=")[1].split(",")[0], train)
    shutil.copy(_validation_file(assets), val)
    run = tmp_path / "run"
    config = _config({**assets, "task": f"jsonl:train={train},validation={val}"}, "adamw",
                     train={"steps": 1, "eval_every": 0})
    train_run(config, run, log=_quiet)
    shutil.rmtree(data)
    row = varlora.load(run).predict("Which colour is red?", choices=["blue", "red"])
    assert row.method == "adamw" and len(row.probs) == 2


def test_cli_predict_writes_jsonl_and_eval_limit(assets, finished, tmp_path, capsys):
    run = finished("ivon")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run), "--input", _validation_file(assets), "--output", str(out),
                 "--n-samples", "2", "--tau", "0.5"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 12 and lines[0]["n_samples"] == 2 and lines[0]["tau"] == 0.5
    assert set(lines[0]) >= {"probs", "sample_probs", "prediction", "confidence", "entropy", "mutual_information"}
    assert "n=12 predictions of ivon[tau=0.5]" in capsys.readouterr().out
    assert main(["eval", str(run), "--limit", "5"]) == 0
    printed = capsys.readouterr().out
    assert "(n=5," in printed and "reproduces" not in printed
    assert main(["eval", str(run), "--all"]) == 0
    assert "(n=12," in capsys.readouterr().out
    assert main(["eval", str(run), "--limit", "0"]) == 2
    assert "data.eval_limit=0" in capsys.readouterr().err
