"""``mc_dropout``: Monte Carlo dropout (Gal & Ghahramani 2016) on a MAP LoRA adapter.

Training is AdamW's (the same adapter as the ``adamw`` method; an experiment reuses that run). At test time
the LoRA dropout modules stay in train mode, every other module in eval mode (Llama's attention dropout is 0
anyway), and the probabilities of ``eval.n_samples`` passes are averaged: p̄ = (1/S) Σₛ softmax(f(x; θ, zₛ))
with zₛ the dropout masks (p = ``lora.dropout``, the rate the adapter was trained with). The masks come from
the global generator seeded with ``eval.seed`` inside a forked RNG, so a re-evaluation reproduces them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from varlora.evaluate import sampled_prediction
from varlora.methods.adamw import AdamW
from varlora.methods.base import Prediction, register

__all__ = ["MCDropout", "lora_dropout_modules"]


def lora_dropout_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA dropout modules of ``model`` (nn.Dropout; with dropout 0 peft uses nn.Identity)."""
    return [m for name, m in model.named_modules() if ".lora_dropout." in f".{name}." and
            isinstance(m, torch.nn.Dropout)]


@register
class MCDropout(AdamW):
    """The MAP adapter with LoRA dropout on at test time; S stochastic passes, probabilities averaged."""

    name = "mc_dropout"
    label = "mc-dropout"
    color = "C2"
    args_class = None
    sections = ("adamw",)
    posthoc_of = "adamw"
    supports_distributed = False
    role = ""

    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        modules = lora_dropout_modules(self.session.model)

        @contextlib.contextmanager
        def sample(_: int) -> Iterator[None]:
            for m in modules:
                m.train()
            try:
                yield
            finally:
                for m in modules:
                    m.eval()

        device = next(iter(self.session.params.values())).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.config.eval.seed)
            return [sampled_prediction(self, self.label, examples, scorer, sample, self.config.eval.n_samples)]
