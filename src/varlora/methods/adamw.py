"""``adamw``: the MAP baseline, LoRA trained with AdamW (Loshchilov & Hutter 2019), one deterministic forward.

It is also the training stage of the post-hoc methods (MC dropout, temperature scaling, Laplace, TFB), which
subclass it and predict differently from the same adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from varlora import distributed
from varlora.config import check, option
from varlora.methods.base import Method, StepResult, register
from varlora.methods.training import (
    backward_batch,
    linear_scheduler,
    optimizer_state_bytes,
    restore,
    snapshot,
)
from varlora.sharding import shard_optimizer_state

__all__ = ["AdamWArgs", "AdamW", "adamw_step"]


@dataclass
class AdamWArgs:
    """AdamW, the MAP baseline (Loshchilov & Hutter 2019), and the training stage of post-hoc methods."""

    lr: float = option("peak learning rate", default=1e-3)
    weight_decay: float = option("decoupled weight decay", default=0.0)
    beta1: float = option("first-moment decay", default=0.9)
    beta2: float = option("second-moment decay", default=0.999)
    eps: float = option("denominator epsilon", default=1e-8)

    def __post_init__(self) -> None:
        check(self.lr > 0, "adamw.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "adamw.weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, "adamw.beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "adamw.beta2", self.beta2, "must be in [0, 1)")


def build_adamw(args: AdamWArgs, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                             weight_decay=args.weight_decay, foreach=True)


def adamw_step(session, examples, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> float:
    """Accumulate the batch gradient, average it over ranks, clip its norm (``train.max_grad_norm``), step.
    Returns the batch-mean loss (mean over ranks)."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward_batch(session, examples)
    distributed.average_gradients(params)
    if session.config.train.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, session.config.train.max_grad_norm)
    optimizer.step()
    return distributed.mean_over_ranks(loss)


@register
class AdamW(Method):
    """MAP LoRA: minimise the mean cross-entropy with AdamW and a linear schedule; predict at the weights."""

    name = "adamw"
    label = "adamw"
    color = "C3"
    args_class = AdamWArgs
    trains = True
    supports_distributed = True
    role = "map"

    @property
    def map_args(self) -> AdamWArgs:
        """The AdamW section (post-hoc subclasses read it too)."""
        return self.config.method_args("adamw")

    def setup(self) -> None:
        self.optimizer = build_adamw(self.map_args, list(self.session.params.values()))
        self.scheduler = linear_scheduler(self.session, self.optimizer)

    def train_step(self, step: int) -> StepResult:
        lr = self.optimizer.param_groups[0]["lr"]
        loss = adamw_step(self.session, self.session.batch(step), list(self.session.params.values()),
                          self.optimizer)
        self.scheduler.step()
        return StepResult(loss, {"lr": lr})

    def state_dict(self) -> dict:
        return {"params": snapshot(self.session.params), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        restore(self.session.params, state["params"])
        self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], list(self.session.params.values())))
        self.scheduler.load_state_dict(state["scheduler"])

    def extra_bytes(self) -> dict[str, int]:
        return {"extra_param_bytes": 0, "optimizer_state_bytes": optimizer_state_bytes(self.optimizer)}
