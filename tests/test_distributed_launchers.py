"""`varlora train` under the launchers of accelerate: `accelerate launch --multi_gpu` (torchrun's variables) and
mpirun's variables (`accelerate launch --cpu --mpirun_hostfile`), 2 CPU processes each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_train_distributed import WORLD, _adapter, _config, assets  # noqa: F401 (assets is a fixture)
from varlora import distributed
from varlora.config import RunConfig
from varlora.distributed import LaunchEnv, launch_env
from varlora.train import train_run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

_ALL_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
             "MV2_COMM_WORLD_LOCAL_RANK")


@pytest.mark.parametrize(("env", "expected"), [
    ({}, LaunchEnv(0, 1, 0)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, LaunchEnv(1, 2, 1)),  # torchrun, accelerate --multi_gpu
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     LaunchEnv(3, 4, 1)),  # OpenMPI
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, LaunchEnv(1, 2, 1)),  # Intel MPI / MPICH
    ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2"}, LaunchEnv(1, 2, 0)),  # MVAPICH
    ({"RANK": "0", "WORLD_SIZE": "2", "PMI_RANK": "1", "PMI_SIZE": "8"}, LaunchEnv(0, 2, 0)),  # torchrun's first
])
def test_launch_env_reads_each_launcher(monkeypatch, env, expected):
    for name in _ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_env() == expected


@pytest.mark.parametrize(("env", "message"), [
    ({"OMPI_COMM_WORLD_SIZE": "two"}, "OMPI_COMM_WORLD_SIZE='two' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 of world size 2"),
])
def test_launch_env_rejects_bad_values(monkeypatch, env, message):
    for name in _ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        launch_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_worker(rank: int, port: int, config: dict, folder: str) -> None:
    """A rank as OpenMPI's mpirun under `accelerate launch --mpirun_hostfile` starts it: no torchrun variables."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMPI_COMM_WORLD_RANK=str(rank),
                      OMPI_COMM_WORLD_SIZE=str(WORLD), OMPI_COMM_WORLD_LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init()
    try:
        assert (distributed.rank(), distributed.world_size()) == (rank, WORLD)
        train_run(RunConfig.from_dict(config), folder, log=lambda _: None)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):  # noqa: F811
    """The folder of the single-process AdamW run that two ranks must follow."""
    folder = tmp_path_factory.mktemp("one")
    assert train_run(RunConfig.from_dict(_config(assets, "adamw")), folder, log=lambda _: None)["processes"] == 1
    return folder


def _assert_like_one_process(one_process, folder) -> None:
    """AdamW on two ranks (half a batch each, gradients averaged) follows one process, up to float rounding."""
    assert json.loads((folder / "summary.json").read_text())["processes"] == WORLD
    one, two = _adapter(one_process), _adapter(folder)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def test_mpi_variables_start_two_ranks(assets, one_process, tmp_path):  # noqa: F811
    config = _config(assets, "adamw")
    mp.spawn(_mpi_worker, args=(_free_port(), config, str(tmp_path / "two")), nprocs=WORLD, join=True)
    _assert_like_one_process(one_process, tmp_path / "two")


def test_accelerate_launch_runs_varlora_train_on_two_cpu_processes(assets, one_process, tmp_path):  # noqa: F811
    """The real launcher, as a user types it: `accelerate launch --multi_gpu --num_processes 2 -m varlora.cli`."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_config(assets, "adamw")))
    env = {k: v for k, v in os.environ.items() if k not in _ALL_VARS} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "varlora.cli", "train", "--config", str(recipe), "--run-dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_like_one_process(one_process, tmp_path / "two")
