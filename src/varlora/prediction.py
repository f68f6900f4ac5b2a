"""A prediction row: the probabilities one method produced on a set of examples, and how it made them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Prediction"]


@dataclass
class Prediction:
    """One table row: a method's averaged probabilities on N examples, and how they were made.

    Attributes:
        label: the row's name in tables and plots, e.g. ``ivon@mean``, ``blob``, ``blob@mean``.
        method: the registry name of the method that made it (e.g. ``ivon``).
        probs: (N, K) float64, the predictive p̄ = (1/S) Σₛ pₛ (probabilities are averaged, never logits).
        labels: (N,) int64 true choices.
        sample_probs: (S, N, K) per-sample probabilities of a sampled predictive, else None. Laplace's
            logit-space Monte Carlo averages n_samples = 100,000 draws in ``probs`` and keeps only the first
            ``eval.n_samples`` here.
        logits: (N, K) float64 deterministic choice logits where the method keeps them, else None.
        tau: the posterior variance scale of an IVON-style predictive (0 = at the mean), else None.
        n_samples: samples averaged (1 for a deterministic predictive; 0 marks "at the mean" rows of
            methods whose default predictive samples, as BLoB's N = 0).
        forward_passes: forward passes of the LM per example (the inference cost).
        metrics: filled by :func:`varlora.evaluate.finish`.
    """

    label: str
    method: str
    probs: torch.Tensor
    labels: torch.Tensor
    sample_probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    tau: float | None = None
    n_samples: int = 1
    forward_passes: int = 1
    metrics: dict[str, float] = field(default_factory=dict)
