"""Data-parallel training over several processes with ``torch.distributed`` (torchrun or accelerate launch).

``torchrun --nproc-per-node N -m varlora.cli train ...`` (or ``... experiment PRESET``) starts N ranks, and so
does ``accelerate launch --multi_gpu --num_processes N -m varlora.cli train ...`` (torchrun underneath; on a
machine without GPUs the ranks are CPU processes). ``accelerate launch --cpu --num_processes N`` starts one process
unless it is given ``--mpirun_hostfile``; then mpirun starts the N and describes them in MPI variables
(OpenMPI ``OMPI_COMM_WORLD_*``, Intel MPI/MPICH ``PMI_*``, MVAPICH ``MV2_COMM_WORLD_*``), read like accelerate
reads them (:func:`launch_env`). :func:`init` joins the ranks (NCCL on CUDA, one GPU per rank; gloo on CPU).
Every rank holds the same LoRA weights and takes ``batch_size / N`` examples of each global batch, so a step
uses the same examples as a single-process run:

* AdamW: the LoRA gradients are averaged over ranks (one flat all-reduce, as DDP does, without wrapping the
  model: the cloze scorer runs two forwards per backward), then clipped and applied on every rank.
* IVON: ``IVON(sync=True)``; every rank draws its own weight sample, and ``step()`` averages the gradient and
  Hessian estimates over ranks, so the ranks act as MC samples (Shen et al. 2024, Sec. 3: one sample per GPU).
  ``max_grad_norm`` clips each rank's gradient of its shard.

Evaluation splits the examples across ranks and gathers the probabilities (every rank draws the same posterior
samples, so the result equals one process's). Rank 0 alone writes files. Single-process runs never touch
``torch.distributed``.

With ``model.sharding=fsdp`` the ranks hold shards of the model instead of copies (:mod:`varlora.sharding`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["LaunchEnv", "active", "all_gather_objects", "average_gradients", "barrier", "broadcast_object",
           "check_on_main", "init", "is_main", "launch_env", "local_device", "main_only", "mean_over_ranks", "rank",
           "world_size"]

T = TypeVar("T")

# The variables naming a process's place, first set wins: torchrun's (also under `accelerate launch --multi_gpu`),
# then those of the MPI launchers that `accelerate launch --mpirun_hostfile` runs (the order accelerate reads them).
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


class LaunchEnv(NamedTuple):
    """This process's place as its launcher describes it."""

    rank: int
    world_size: int
    local_rank: int  # the rank among the processes of this machine: the GPU it uses


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def launch_env() -> LaunchEnv:
    """(rank, world size, local rank) from torchrun's variables, else MPI's; (0, 1, 0) when none is set."""
    env = LaunchEnv(_env_int(_RANK_VARS, 0), _env_int(_WORLD_SIZE_VARS, 1), _env_int(_LOCAL_RANK_VARS, 0))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"launcher environment gives rank {env.rank} of world size {env.world_size}")
    return env


def init() -> None:
    """Join the process group described by the launcher's environment (world size > 1); no-op otherwise.

    The rendezvous is ``MASTER_ADDR:MASTER_PORT`` (set by torchrun and accelerate launch; 127.0.0.1:29500 when a
    bare mpirun left them unset).
    """
    env = launch_env()
    if env.world_size <= 1 or active():
        return
    if not dist.is_available():
        raise RuntimeError(f"world size {env.world_size} > 1 but this torch build has no torch.distributed")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl", rank=env.rank, world_size=env.world_size)
    else:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)


def active() -> bool:
    """Whether this process is one rank of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """This rank's device: its GPU (the local rank) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", launch_env().local_rank if active() else torch.cuda.current_device())


def main_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0, a no-op on the others (one copy of every message)."""
    return log if is_main() else _discard


def _discard(_: str) -> None:
    pass


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_on_main(error: type[Exception], check: Callable[..., None], *args: Any) -> None:
    """Run ``check(*args)`` on rank 0 only (it reads or writes files); an ``error`` it raises is raised on every
    rank, with its message, so that no rank goes on to wait for the others at the next collective."""
    message = None
    if is_main():
        try:
            check(*args)
        except error as err:
            message = str(err)
    message = broadcast_object(message)
    if message is not None:
        raise error(message)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each ``p.grad`` by its mean over ranks (missing gradients count as zero), in one all-reduce.
    Parameters sharded by FSDP2 (DTensors) are left alone: their reduce-scatter already averaged them."""
    if not active():
        return
    with_grad = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
    if not with_grad:
        return
    for p in with_grad:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in with_grad]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size()
    torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


def mean_over_ranks(value: float) -> float:
    """The mean of a scalar over ranks (e.g. the training loss of each rank's shard)."""
    if not active():
        return value
    device = local_device()
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()
