"""Faults with real processes: SIGKILL at chosen points, a full disk, damaged files, a diverging loss.

Each kill is aimed with a ``sitecustomize.py`` that only these tests put on the training process's PYTHONPATH: it
wraps :func:`varlora._io.atomic_path` / :func:`~varlora._io.atomic_dir` so that one chosen write stops, its data
in the temporary file (cut to half for a file: a torn write) but not yet renamed into place, and tells the test,
which then kills the process. Library code has no hook for it. The full disk is ``RLIMIT_FSIZE``: a write past the
limit fails with EFBIG (SIGXFSZ ignored), as on a full disk, while the small files stay writable.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_assets, write_colour_data
from varlora.checkpoint import read_checkpoint
from varlora.cli import main
from varlora.run_paths import task_file_stem

STEPS, SAVE_EVERY = 12, 4

_HOOK = '''
import contextlib, os, time
from pathlib import Path

_name, _nth, _marker = os.environ["VARLORA_TEST_PAUSE"].split(":", 2)
_seen = [0]
from varlora import _io

def _stop_here(path, tmp):
    if _name not in Path(path).name:
        return
    _seen[0] += 1
    if _seen[0] != int(_nth):
        return
    if tmp.is_file():
        os.truncate(tmp, tmp.stat().st_size // 2)  # a torn write
    Path(_marker).write_text(str(tmp))
    time.sleep(600)  # the test kills the process here

_atomic_path, _atomic_dir = _io.atomic_path, _io.atomic_dir

@contextlib.contextmanager
def atomic_path(path):
    with _atomic_path(path) as tmp:
        yield tmp
        _stop_here(path, tmp)

@contextlib.contextmanager
def atomic_dir(path):
    with _atomic_dir(path) as tmp:
        yield tmp
        _stop_here(path, tmp)

_io.atomic_path, _io.atomic_dir = atomic_path, atomic_dir
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny model and task, and a second validation set that every run also evaluates (out of distribution)."""
    folder = tmp_path_factory.mktemp("assets")
    return build_assets(folder) | {"ood": f"jsonl:validation={write_colour_data(folder, 12, seed=3)}"}


def _command(assets, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "varlora.cli", "train", "--run-dir", str(run), "--model.name", assets["model"],
            "--data.task", assets["task"], "--data.max_length", "64", "--lora.r", "4", "--method.name", "ivon",
            "--train.steps", str(STEPS), "--train.save_every", str(SAVE_EVERY), "--train.eval_every", "0",
            "--ivon.lr", "0.1", "--ivon.ess", "1e4", "--ivon.hess_init", "0.1", "--ivon.clip_radius", "1.0",
            "--ivon.beta2", "0.99", "--eval.n_samples", "2", "--eval.ood_tasks", assets["ood"], *extra]


def _env(**extra: str) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"} | extra


def _train(assets, run: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(_command(assets, run), env=_env(), capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def clean(assets, tmp_path_factory) -> Path:
    """An uninterrupted run, the reference of every rerun."""
    run = tmp_path_factory.mktemp("clean") / "run"
    result = _train(assets, run)
    assert result.returncode == 0, result.stderr
    return run


def _kill_at(assets, run: Path, tmp_path: Path, name: str, nth: int) -> str:
    """Start a training process, stop it at the ``nth`` atomic write of a file (or folder) whose name contains
    ``name``, and SIGKILL it there. Returns the path of the temporary file the write was filling."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    marker = tmp_path / "paused"
    env = _env(VARLORA_TEST_PAUSE=f"{name}:{nth}:{marker}",
               PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    process = subprocess.Popen(_command(assets, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert alive and marker.exists(), f"the process never reached write {nth} of {name}: {stderr.decode()[-2000:]}"
    return marker.read_text()


def _assert_same_final(clean: Path, run: Path) -> None:
    """The adapter, posterior and saved probabilities equal the clean run's bit for bit."""
    for name in ("final/adapter_model.safetensors", "final/posterior.safetensors"):
        a, b = load_file(str(clean / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for probs in (clean / "eval").glob("*.safetensors"):
        a, b = load_file(str(probs)), load_file(str(run / "eval" / probs.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), probs.name
    results = [json.loads((r / "summary.json").read_text())["results"] for r in (clean, run)]
    assert results[0] == results[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_size_limit(limit: int):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


def test_killed_while_writing_a_checkpoint_then_disk_full_then_resumed(assets, clean, tmp_path):
    """SIGKILL in the middle of writing the 2nd checkpoint; the rerun meets a full disk at its next checkpoint
    (exit 2, one line naming the checkpoint, the previous checkpoint intact); with space back it finishes exactly
    like the uninterrupted run."""
    run = tmp_path / "run"
    torn = Path(_kill_at(assets, run, tmp_path, "checkpoint.safetensors", nth=2))
    assert torn.name.startswith(".checkpoint.safetensors.") and torn.exists()  # the torn write, never renamed
    before = _sha(run / "checkpoint.safetensors")
    assert read_checkpoint(run / "checkpoint.safetensors")["step"] == SAVE_EVERY

    limit = (run / "checkpoint.safetensors").stat().st_size // 2  # checkpoints no longer fit; the small files do
    full = subprocess.run(_command(assets, run), env=_env(), capture_output=True, text=True,
                          preexec_fn=_file_size_limit(limit))
    assert full.returncode == 2, full.stderr
    assert f"resuming {run} from step {SAVE_EVERY}/{STEPS}" in full.stdout
    [line] = [x for x in full.stderr.splitlines() if "error" in x.lower()]
    assert line.startswith("varlora train: error: cannot write ") and str(run / "checkpoint.safetensors") in line
    assert "File too large" in line and "previous checkpoint is kept" in line and "Traceback" not in full.stderr
    assert _sha(run / "checkpoint.safetensors") == before  # untouched
    assert not (run / "final").exists()

    again = _train(assets, run)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run} from step {SAVE_EVERY}/{STEPS}" in again.stdout
    _assert_same_final(clean, run)


@pytest.mark.parametrize(("name", "expect"), [
    ("final", "resuming {run} from step 12/12"),  # final/ written into its temporary folder, not yet in place
    pytest.param("probs.safetensors", "{run}/final is complete; evaluating it",  # evaluation's first file torn
                 marks=pytest.mark.slow),
])
def test_killed_during_final_save_or_evaluation_resumes_exactly(assets, clean, tmp_path, name, expect):
    run = tmp_path / "run"
    _kill_at(assets, run, tmp_path, name, nth=1)
    assert (run / "final").exists() == (name != "final") and not (run / "summary.json").exists()
    again = _train(assets, run)
    assert again.returncode == 0, again.stderr
    assert expect.format(run=run) in again.stdout
    _assert_same_final(clean, run)


def _reads_saved(stdout: str, run: Path, task: str) -> bool:
    return f"{run / 'eval' / task_file_stem(task)}.json was evaluated before the restart; reading it" in stdout


def test_a_resumed_run_reads_the_evaluations_that_finished_before_the_kill(assets, clean, tmp_path):
    """Killed while saving the second task's probabilities: the rerun reads the first task's evaluation (its
    fingerprint matches final/ and the config), evaluates the second again, and ends exactly like the clean run."""
    run = tmp_path / "run"
    _kill_at(assets, run, tmp_path, "probs.safetensors", nth=2)
    again = _train(assets, run)
    assert again.returncode == 0, again.stderr
    assert _reads_saved(again.stdout, run, assets["task"]) and not _reads_saved(again.stdout, run, assets["ood"])
    _assert_same_final(clean, run)
    saved = json.loads((run / "eval" / f"{task_file_stem(assets['task'])}.json").read_text())
    cost = json.loads((run / "summary.json").read_text())["cost"]
    assert cost["peak_eval_bytes"] >= saved["peak_eval_bytes"] > 0
    assert cost["eval_seconds"][assets["task"]] == saved["eval_seconds"]


@pytest.mark.parametrize("how", ["other posterior", "other probabilities", "written before fingerprints"])
def test_a_saved_evaluation_that_may_not_match_the_posterior_is_done_again(assets, clean, tmp_path, how):
    run = tmp_path / "run"
    _kill_at(assets, run, tmp_path, "probs.safetensors", nth=2)
    saved_json = run / "eval" / f"{task_file_stem(assets['task'])}.json"
    saved = json.loads(saved_json.read_text())
    for row in saved["predictions"]:
        row["metrics"]["acc"] = -1.0  # would show in the summary if this file were taken
    if how == "other posterior":
        saved["fingerprint"] = "0" * 64
    elif how == "other probabilities":
        probs = saved_json.with_name(f"{task_file_stem(assets['task'])}.probs.safetensors")
        probs.write_bytes(probs.read_bytes()[:-1] + b" ")
    else:
        del saved["fingerprint"], saved["probs_sha256"], saved["peak_eval_bytes"]
    saved_json.write_text(json.dumps(saved))
    again = _train(assets, run)
    assert again.returncode == 0, again.stderr
    assert not _reads_saved(again.stdout, run, assets["task"])
    _assert_same_final(clean, run)


# ---- damaged files: one line naming the file, exit 2 -----------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte flipped near the end, in the data rather than a header
        i = len(data) - max(1, len(data) // 10)
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("varlora ")]  # progress bars of transformers aside
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_damaged_files_of_final_are_named(clean, tmp_path, how, capsys):
    """Every file of final/ is checked against the digest recorded when it was saved."""
    names = sorted(p.relative_to(clean / "final").as_posix() for p in (clean / "final").rglob("*") if p.is_file())
    assert {"adapter_model.safetensors", "posterior.safetensors", "stage.json"} <= set(names)
    for name in names:
        run = tmp_path / f"{name}-{how}"
        shutil.copytree(clean, run)
        _damage(run / "final" / name, how)
        assert main(["eval", str(run)]) == 2, name
        line = _error_line(capsys)
        assert line.startswith("varlora eval: error: ") and str(run / "final" / name) in line, line
        assert "truncated or corrupted" in line


class _RunsCode:
    """Unpickling it creates a file: what a crafted checkpoint.pt could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["truncated", "corrupted", "crafted pickle"])
def test_a_damaged_checkpoint_is_named(clean, tmp_path, how, capsys):
    """A damaged checkpoint.safetensors, or a checkpoint.pt (the old, pickled format) crafted to run code: the
    run stops with one line naming the file, and the crafted file's code never runs."""
    run = tmp_path / "run"
    shutil.copytree(clean, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    checkpoint, marker = run / "checkpoint.safetensors", tmp_path / "code-ran"
    if how == "crafted pickle":
        state = read_checkpoint(checkpoint) | {"method_name": "ivon", "payload": _RunsCode(marker)}
        checkpoint.unlink()
        checkpoint = run / "checkpoint.pt"
        torch.save(state, checkpoint)
    else:
        _damage(checkpoint, how)
    assert main(["train", "--run-dir", str(run), "--config", str(run / "config.json")]) == 2
    line = _error_line(capsys)
    assert line.startswith("varlora train: error: ") and str(checkpoint) in line, line
    assert "delete it to restart the run" in line
    if how == "crafted pickle":
        assert "is not a checkpoint written by varlora: it is a pickle that needs posix.system" in line, line
        assert not marker.exists()
    else:
        assert "truncated or corrupted" in line


def test_a_diverging_loss_stops_with_the_step_and_keeps_the_last_checkpoint(assets, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--model.name", assets["model"], "--data.task", assets["task"],
            "--data.max_length", "64", "--lora.r", "4", "--method.name", "adamw", "--adamw.lr", "1e30",
            "--train.steps", "8", "--train.save_every", "1", "--train.eval_every", "0"]
    assert main(argv) == 2
    line = _error_line(capsys)
    step = read_checkpoint(run / "checkpoint.safetensors")["step"]
    assert line == (f"varlora train: error: training loss became nan at step {step + 1} (checkpoint.safetensors of "
                    f"step {step} is kept); lower the learning rate in a new run folder")
    assert step >= 1 and not (run / "final").exists()
