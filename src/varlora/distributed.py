"""Data-parallel training over several processes with ``torch.distributed`` (launch with ``torchrun``).

``torchrun --nproc-per-node N -m varlora.cli train ...`` (or ``... experiment PRESET``) starts N ranks;
:func:`init` joins them (NCCL on CUDA, one GPU per rank; gloo on CPU). Every rank holds the same LoRA weights
and takes ``batch_size / N`` examples of each global batch, so a step uses the same examples as a
single-process run:

* AdamW: the LoRA gradients are averaged over ranks (one flat all-reduce, as DDP does, without wrapping the
  model: the cloze scorer runs two forwards per backward), then clipped and applied on every rank.
* IVON: ``IVON(sync=True)``; every rank draws its own weight sample, and ``step()`` averages the gradient and
  Hessian estimates over ranks, so the ranks act as MC samples (Shen et al. 2024, Sec. 3: one sample per GPU).
  ``max_grad_norm`` clips each rank's gradient of its shard.

Evaluation splits the examples across ranks and gathers the probabilities (every rank draws the same posterior
samples, so the result equals one process's). Rank 0 alone writes files. Single-process runs never touch
``torch.distributed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["active", "all_gather_objects", "average_gradients", "barrier", "broadcast_object", "init", "is_main",
           "local_device", "main_only", "mean_over_ranks", "rank", "world_size"]

T = TypeVar("T")


def init() -> None:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


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
    """This rank's device: its GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if active() else torch.cuda.current_device())


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


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each ``p.grad`` by its mean over ranks (missing gradients count as zero), in one all-reduce."""
    if not active():
        return
    with_grad = [p for p in params if p.requires_grad]
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
