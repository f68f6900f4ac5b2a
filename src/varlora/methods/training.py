"""Pieces shared by the methods that train: the batch loss and its gradients, optimizer bookkeeping, sizes.

The training loss of every method is the cross-entropy of the scorer's K choice logits, averaged over the
global batch: ℓ = −(1/B) Σᵢ log softmax(s(xᵢ))_{yᵢ}. Under :mod:`varlora.distributed` each rank takes every
N-th example of the batch, and ``train.grad_accum`` splits a rank's share into micro-batches whose gradients
accumulate to those of the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from varlora import distributed
from varlora.optim._dtensor import full, like
from varlora.schedule import linear_schedule

if TYPE_CHECKING:
    from varlora.session import Session
    from varlora.tasks import Example

__all__ = ["backward_batch", "linear_scheduler", "tensor_bytes", "optimizer_state_bytes", "snapshot"]


def backward_batch(session: Session, examples: list[Example],
                   extra_loss: Callable[[], torch.Tensor] | None = None) -> float:
    """Forward + backward of this rank's share of ``examples`` in ``train.grad_accum`` micro-batches.

    Gradients accumulate to ∇ of the batch-mean cross-entropy (plus ``extra_loss()`` once per micro-batch,
    scaled by 1/micro-batches, e.g. a KL term). Returns this rank's mean cross-entropy (no extra loss), read
    once at the end: a read per micro-batch would make the host wait for each backward before queuing the next
    forward.
    """
    n_micro = session.config.train.grad_accum
    share = examples[distributed.rank() :: distributed.world_size()]
    total = torch.zeros((), dtype=torch.float64)  # the sum in double, as Python floats would add it
    for micro in (share[i::n_micro] for i in range(n_micro)):
        batch = session.scorer.collate(micro)
        logits = session.scorer.choice_logits(session.model, batch)  # (B, K)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device)) / n_micro
        objective = loss + extra_loss() / n_micro if extra_loss is not None else loss
        objective.backward()
        total = total.to(loss.device) + loss.detach().double()
    return float(total)


def linear_scheduler(session: Session, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``train.warmup_steps``, then linear decay to 0 at ``train.steps``."""
    cfg = session.config.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.warmup_steps, cfg.steps))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (momenta, Hessian estimates, ...)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    """CPU copies of named parameters (for checkpoints); sharded ones gathered whole (every rank calls it)."""
    return {n: full(p.detach()).cpu().clone() for n, p in params.items()}


def restore(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (full tensors) into the named parameters; a sharded (FSDP2) one takes its shard."""
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(like(saved[name], param))
