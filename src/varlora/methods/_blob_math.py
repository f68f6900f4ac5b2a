"""BLoB's KL reweighting (Wang et al. 2024, following Blundell et al. 2015), apart from the method's bookkeeping.

BLoB minimises, at training step i, ``NLL(batch) + π_i · KL(q ‖ p)`` with the NLL the batch *mean* cross-entropy.
With ``"blundell"`` weights the KL is spread over a period of M steps with geometrically growing weights,

    π_i = 2^i / (2^(M+1) − 1),   i = (step mod M) + 1 ∈ {1, …, M},   Σᵢ π_i = 1 − 1/(2^(M+1) − 1) ≈ 1,

so that most of the KL arrives at the end of each period; ``"uniform"`` uses π = 1/M. M is the number of
batches per epoch or, with the reference code's "dataset rescaling", M = ⌊100 · N^(π/γ) / batch⌋ (N training
examples, γ = 8), which lengthens the period and so weakens the KL (the reference runs use it).

π depends only on the step index, so a resumed run needs no extra state for it.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["kl_weight", "kl_period", "KLWeighting"]

KLWeighting = Literal["blundell", "uniform"]


def kl_weight(step: int, period: int, kind: KLWeighting = "blundell") -> float:
    """π for 0-based training step ``step`` with period M = ``period`` (see the module docstring)."""
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if kind == "uniform":
        return 1.0 / period
    if kind != "blundell":
        raise ValueError(f"kind must be 'blundell' or 'uniform', got {kind!r}")
    i = step % period + 1
    # 2^i / (2^(M+1) − 1) = 2^(i−M−1) / (1 − 2^(−M−1)), which never overflows (underflows to 0 for i ≪ M)
    return math.ldexp(1.0, i - period - 1) / (1.0 - math.ldexp(1.0, -period - 1))


def kl_period(n_train: int, batch_size: int, dataset_rescaling: bool, gamma: float = 8.0) -> int:
    """M: batches per epoch ⌈N / batch⌉, or with dataset rescaling ⌊100 · N^(π/γ) / batch⌋ (at least 1)."""
    if n_train < 1 or batch_size < 1:
        raise ValueError(f"n_train and batch_size must be >= 1, got {n_train}, {batch_size}")
    if dataset_rescaling:
        return max(1, int(100 * n_train ** (math.pi / gamma) / batch_size))
    return math.ceil(n_train / batch_size)
