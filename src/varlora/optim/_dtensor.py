r"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): :class:`~torch.distributed.tensor.DTensor`\ s
whose local tensor is this rank's dim-0 shard. The optimizer and the sampler do their math on the local shards
(plain tensors, the same ``torch._foreach_*`` kernels as unsharded) and keep their state as DTensors shaped like
the parameter, so that it shards with it. A plain tensor of a sharded parameter's full shape (a saved state, a
full noise draw) is cut to the shard with :func:`shard_of`: every rank keeps its own slice, nothing is sent.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["full", "is_sharded", "like", "local", "shard_of", "wrap"]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, or state created with ``*_like`` from one)."""
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage: writing it writes the DTensor), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_of(t: Tensor, param: Tensor) -> Tensor:
    """``t`` as this rank's part of ``param``: a DTensor's local shard; a plain tensor of ``param``'s full shape
    cut to ``param``'s shard (no communication); any other plain tensor as it is (already local)."""
    if isinstance(t, DTensor):
        return t.to_local()
    if not isinstance(param, DTensor) or t.shape != param.shape:
        return t
    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()


def like(t: Tensor, param: Tensor) -> Tensor:
    """A full tensor ``t`` sharded like ``param`` (a DTensor with its placements), or ``t`` if ``param`` is plain."""
    if not isinstance(param, DTensor) or isinstance(t, DTensor):
        return t
    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def full(t: Tensor) -> Tensor:
    """The full tensor of a DTensor (an all-gather: every rank of its mesh must call it), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def wrap(t: Tensor, param: Tensor) -> Tensor:
    """This rank's shard ``t`` of a tensor shaped like the DTensor ``param``, as a DTensor like it (no copy, no
    communication), or ``t`` if ``param`` is plain."""
    if not isinstance(param, DTensor):
        return t
    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())
