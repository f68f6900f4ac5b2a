"""`varlora train` over 2 CPU processes (gloo, torchrun's environment): the same examples per step as one
process, one set of files, and an exact resume with every rank's noise."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import build_assets
from varlora import distributed
from varlora.checkpoint import read_checkpoint
from varlora.config import ConfigError, RunConfig
from varlora.train import train_run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"), n_train=32, n_val=15)


def _config(assets, method: str, **train) -> dict:
    return {
        "model": {"name": assets["model"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "method": {"name": method},
        "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64},
        "train": {"steps": 4, "batch_size": 4, "save_every": 2, "eval_every": 0,
                  "max_grad_norm": 1.0, "seed": 5} | train,
        "ivon": {"lr": 0.1, "ess": 1e4, "hess_init": 0.1, "beta2": 0.99, "clip_radius": 1.0},
        "adamw": {"lr": 1e-2},
        "eval": {"n_samples": 3, "taus": [0.0, 1.0], "batch_size": 4},
    }


class _Stop(Exception):
    """Stands for a kill right after a checkpoint."""


def _worker(rank: int, port: int, jobs: list[tuple[dict, str, int | None]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    distributed.init()
    import varlora.train as train_module

    save = train_module.save_checkpoint
    try:
        for config, folder, stop_at in jobs:
            def save_then_stop(session, method, step, seconds, stop_at=stop_at):
                save(session, method, step, seconds)
                if step == stop_at:
                    raise _Stop

            train_module.save_checkpoint = save_then_stop
            try:
                train_run(RunConfig.from_dict(config), folder, log=lambda _: None)
            except _Stop:
                pass
    finally:
        dist.destroy_process_group()


def _spawn(jobs: list[tuple[dict, str, int | None]]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, jobs), nprocs=WORLD, join=True)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "final" / "adapter_model.safetensors"))


def test_two_processes_train_like_one_on_the_same_batches(assets, tmp_path):
    """AdamW: each rank takes half of every batch and the gradients are averaged, so two processes follow
    the single-process run (up to float rounding: the half batches are padded differently)."""
    config = _config(assets, "adamw")
    single = train_run(RunConfig.from_dict(config), tmp_path / "one", log=lambda _: None)
    _spawn([(config, str(tmp_path / "two"), None)])
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == WORLD and single["processes"] == 1
    one_adapter, two_adapter = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one_adapter.keys() == two_adapter.keys()
    for key in one_adapter:
        torch.testing.assert_close(two_adapter[key], one_adapter[key], rtol=1e-4, atol=1e-6)
    task = single["task"]
    for metric in ("acc", "nll", "ece"):
        assert two["results"][task]["adamw"][metric] == pytest.approx(single["results"][task]["adamw"][metric],
                                                                      rel=1e-4, abs=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # written once, by rank 0


def test_ivon_on_two_processes_resumes_exactly_and_refuses_another_world_size(assets, tmp_path):
    """IVON: the ranks are MC samples with their own noise; a run stopped after its step-2 checkpoint and
    rerun ends bit for bit like an uninterrupted one."""
    config = _config(assets, "ivon")
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    _spawn([(config, whole, None), (config, cut, 2), (config, cut, None)])
    for name, tensor in _adapter(Path(whole)).items():
        assert torch.equal(tensor, _adapter(Path(cut))[name]), name
    posterior = [load_file(str(Path(f) / "final" / "posterior.safetensors")) for f in (whole, cut)]
    assert all(torch.equal(posterior[0][k], posterior[1][k]) for k in posterior[0])
    checkpoint = read_checkpoint(Path(cut) / "checkpoint.safetensors")
    generators = [r["method"]["ivon"]["generators"]["cpu"] for r in checkpoint["ranks"]]
    assert len(generators) == WORLD and not torch.equal(*generators)  # each rank its own noise
    # the single-process IVON run differs: two ranks are two MC samples
    single = train_run(RunConfig.from_dict(config), tmp_path / "one", log=lambda _: None)
    assert single["results"] != json.loads((Path(whole) / "summary.json").read_text())["results"]
    # a checkpoint of 2 processes cannot be resumed by 1
    (Path(cut) / "summary.json").unlink()
    shutil.rmtree(Path(cut) / "final")  # back to "training not finished"
    with pytest.raises(ConfigError, match="written by 2 process"):
        train_run(RunConfig.from_dict(config), cut, log=lambda _: None)


def test_a_single_process_method_refuses_torchrun(assets, tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="'ensemble' runs in one process only"):
        _spawn([(_config(assets, "ensemble"), str(tmp_path / "ens"), None)])


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(assets, tmp_path):
    config = _config(assets, "adamw", batch_size=3)
    with pytest.raises(mp.ProcessRaisedException, match="batch_size=3 must split evenly over 2 processes"):
        _spawn([(config, str(tmp_path / "odd"), None)])
