"""``ensemble``: a deep ensemble of M MAP LoRA adapters (Lakshminarayanan et al. 2017), probabilities averaged.

The members are peft adapters of one base model (``default`` and ``member1`` … ``member{M-1}``), each with its
own initialisation of A (seed ``train.seed + m·1,000,003``; B starts at 0) and its own data order
(``train.seed + m·7,919``), trained jointly: every step runs one AdamW step of every member on its own batch,
so the run checkpoints and resumes like any other, at every step. Member 0 has the ``adamw`` run's
initialisation and data order. Prediction: p̄ = (1/M) Σₘ softmax(f(x; θₘ)), the usual definition (the
bayesian-peft code averages logits instead). Training and inference cost M times one adapter's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from varlora.config import check, option
from varlora.evaluate import sampled_prediction
from varlora.methods.adamw import AdamW, adamw_step, build_adamw
from varlora.methods.base import Prediction, StepResult, register
from varlora.methods.training import linear_scheduler, optimizer_state_bytes, restore, snapshot, tensor_bytes
from varlora.models import save_adapter
from varlora.session import load_adapter_weights

__all__ = ["EnsembleArgs", "DeepEnsemble", "member_names"]


@dataclass
class EnsembleArgs:
    """Deep ensemble of MAP adapters trained with the ``adamw`` section's settings."""

    members: int = option("number of adapters M (the BLoB paper's table uses 3)", default=3)

    def __post_init__(self) -> None:
        check(self.members >= 2, "ensemble.members", self.members, "must be >= 2")


def member_names(members: int) -> list[str]:
    return ["default", *(f"member{m}" for m in range(1, members))]


@register
class DeepEnsemble(AdamW):
    """M AdamW-trained adapters on one base model; the predictive averages their probabilities."""

    name = "ensemble"
    label = "ensemble"
    color = "C1"
    args_class = EnsembleArgs
    sections = ("adamw",)
    supports_distributed = False
    role = ""

    def _add_members(self) -> None:
        model = self.session.model
        config = model.peft_config["default"]
        self.members = member_names(self.args.members)
        for m, adapter in enumerate(self.members[1:], start=1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.train.seed + m * 1_000_003)
                model.add_adapter(adapter, config)
        model.base_model.set_adapter("default")
        self.member_params = {a: self._params_of(a) for a in self.members}

    def _params_of(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        named = {n: p for n, p in self.session.model.named_parameters() if f".{adapter}." in n and "lora_" in n}
        for p in named.values():
            p.requires_grad_(True)
        return dict(sorted(named.items()))

    @contextlib.contextmanager
    def _active(self, adapter: str) -> Iterator[None]:
        """Make ``adapter`` the one the forward uses; ``default`` again on exit."""
        model = self.session.model
        model.base_model.set_adapter(adapter)
        try:
            yield
        finally:
            model.base_model.set_adapter("default")
            for params in self.member_params.values():  # set_adapter freezes the inactive adapters
                for p in params.values():
                    p.requires_grad_(True)

    def setup(self) -> None:
        self._add_members()
        self.optimizers = [build_adamw(self.map_args, list(self.member_params[a].values())) for a in self.members]
        self.schedulers = [linear_scheduler(self.session, o) for o in self.optimizers]

    def train_step(self, step: int) -> StepResult:
        lr = self.optimizers[0].param_groups[0]["lr"]
        losses = []
        for m, adapter in enumerate(self.members):
            with self._active(adapter):
                params = list(self.member_params[adapter].values())
                losses.append(adamw_step(self.session, self.session.batch(step, seed_offset=m * 7_919), params,
                                         self.optimizers[m]))
            self.schedulers[m].step()
        return StepResult(sum(losses) / len(losses), {"lr": lr, **{f"loss_member{m}": x for m, x in
                                                                   enumerate(losses)}})

    def state_dict(self) -> dict:
        return {"params": {a: snapshot(self.member_params[a]) for a in self.members},
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        for adapter in self.members:
            restore(self.member_params[adapter], state["params"][adapter])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)

    def save(self, folder: Path) -> None:
        """peft writes ``default`` into ``folder`` and every other adapter into ``folder/<name>/``."""
        save_adapter(self.session.model, folder)

    def load(self, folder: Path) -> None:
        if not hasattr(self, "members"):
            self._add_members()
        for adapter in self.members:
            load_adapter_weights(self.session.model, Path(folder) if adapter == "default" else Path(folder) / adapter,
                                 adapter_name=adapter)

    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        def sample(m: int):
            return self._active(self.members[m])

        return [sampled_prediction(self, self.label, examples, scorer, sample, len(self.members))]

    def predict_at_mean(self, examples: Sequence, scorer: Any) -> Prediction:
        """Learning curves of an ensemble are the ensemble's own predictions."""
        [row] = self.predict(examples, scorer)
        return row

    def extra_bytes(self) -> dict[str, int]:
        extra = tensor_bytes(p for a in self.members[1:] for p in self.member_params[a].values())
        optimizers = getattr(self, "optimizers", [])
        return {"extra_param_bytes": extra, "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in optimizers)}
