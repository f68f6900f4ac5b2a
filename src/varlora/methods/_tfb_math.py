"""Training-free Bayesianization (TFB, Shi et al.): the SVD reparameterisation of a LoRA adapter and the search
for its variance, apart from the method's bookkeeping.

A trained LoRA layer ``ΔW = s · B A`` (B: (out, r), A: (r, in)) is rewritten with the thin SVD B = U diag(d) Vᵀ as

    B′ = U diag(d),   A′ = Vᵀ A,   so that B′ A′ = B A,

and given the posterior A′ ~ N(A′, Σ) with per-row std σ_q / dᵢ. The update noise is then
B′ ΔA′ = U diag(d) diag(1/d) σ_q Z = σ_q U Z (Z ~ N(0, I)): isotropic noise of std σ_q in B's column space,
one scalar σ_q for the whole adapter. Rows with dᵢ = 0 (a rank-deficient B) get σ = 0: their noise would be
multiplied by a zero column of B′ anyway.

σ_q is the largest value whose predictive on an anchor set stays within a tolerance of the MAP adapter's
(:func:`search_sigma`, a bisection on [lo, hi]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["svd_reparameterise", "row_std", "search_sigma", "SigmaSearch"]


def svd_reparameterise(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A′, B′, d): A′ = Vᵀ A (r, in), B′ = U diag(d) (out, r), d the singular values of B (r,), computed in
    float64 and returned in A's and B's dtypes (d in float32)."""
    a = lora_a.detach().to(torch.float64)                                  # (r, in)
    b = lora_b.detach().to(torch.float64)                                  # (out, r)
    u, d, vh = torch.linalg.svd(b, full_matrices=False)                    # (out, r), (r,), (r, r)
    a_rot = vh @ a                                                         # (r, in)
    b_rot = u * d                                                          # (out, r)
    return a_rot.to(lora_a.dtype), b_rot.to(lora_b.dtype), d.to(torch.float32)


def row_std(singular_values: torch.Tensor, sigma_q: float, n_in: int) -> torch.Tensor:
    """σ of A′, (r, in): σ_q / dᵢ on row i, 0 where dᵢ = 0."""
    d = singular_values.to(torch.float64)
    inv = torch.where(d > 0, 1.0 / d.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(d))
    return (sigma_q * inv).to(torch.float32)[:, None].expand(-1, n_in).contiguous()


@dataclass
class SigmaSearch:
    """The result of :func:`search_sigma`: the chosen σ_q and every (σ, change) tried, in order."""

    sigma: float
    trace: list[tuple[float, float]] = field(default_factory=list)


def search_sigma(
    change: Callable[[float], float], lo: float, hi: float, steps: int, tolerance: float
) -> SigmaSearch:
    """The largest σ in [lo, hi] with ``change(σ) <= tolerance``, by bisection (TFB's search).

    ``change(σ)`` is the anchor-set change of the predictive at σ against σ = 0 (e.g. the relative NLL change
    or the fraction of flipped predictions; non-decreasing in σ for the search to be exact). ``hi`` is tried
    first (if within tolerance it is the answer); then ``steps`` halvings of [lo, hi], each keeping the half whose
    lower end is within tolerance. The answer is the largest σ tried that was within tolerance, so it is at most
    (hi − lo) / 2^steps below the boundary; ``lo`` is returned (untested) when nothing larger passes.

    The reference code (bayesian-peft, ``tfblora.py``) instead returns the last σ that *exceeded* the tolerance
    (or hi): just above the boundary rather than just below it.
    """
    if not 0 <= lo < hi:
        raise ValueError(f"need 0 <= lo < hi, got lo={lo}, hi={hi}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    trace: list[tuple[float, float]] = []

    def within(sigma: float) -> bool:
        value = float(change(sigma))
        trace.append((sigma, value))
        return value <= tolerance

    if within(hi):
        return SigmaSearch(sigma=hi, trace=trace)
    low, high = lo, hi
    for _ in range(steps):
        mid = (low + high) / 2
        if within(mid):
            low = mid
        else:
            high = mid
    return SigmaSearch(sigma=low, trace=trace)
