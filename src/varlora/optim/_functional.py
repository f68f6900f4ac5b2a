r"""The math of one IVON step on lists of tensors of one parameter group, with ``torch._foreach_*`` ops.

Symbols as in :class:`varlora.IVON`: :math:`m` mean, :math:`h` Hessian estimate, :math:`\bar g` momentum,
:math:`\lambda` ``ess``, :math:`\delta` ``weight_decay``, :math:`\sigma = 1/\sqrt{\lambda(h+\delta)}`, and
:math:`d_s = \theta_s - m = \sigma\odot\epsilon_s` the offset of training sample :math:`s`. Every function
works in place on the state it updates. ``tests/ivon_oracle.py`` writes the same equations one tensor at a
time, and ``tests/test_ivon.py`` checks that they agree in float64. Nothing here allocates a parameter-sized
tensor: the caller passes the buffers (:class:`~varlora.optim.IVON` reuses the same two per parameter every step).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["add_sample_", "posterior_std", "start_sums_", "update_"]


def posterior_std(hessians: list[Tensor], *, ess: float, weight_decay: float,
                  out: list[Tensor] | None = None) -> list[Tensor]:
    r""":math:`\sigma = 1/\sqrt{\lambda (h + \delta)}`, in ``out`` (else new tensors)."""
    if out is None:
        out = torch._foreach_add(hessians, weight_decay)
    else:
        torch._foreach_copy_(out, hessians)
        if weight_decay:
            torch._foreach_add_(out, weight_decay)
    torch._foreach_mul_(out, ess)
    torch._foreach_rsqrt_(out)
    return out


def start_sums_(grad_sums: list[Tensor], hess_sums: list[Tensor], grads: list[Tensor], offsets: list[Tensor], *,
                price: bool) -> None:
    r"""Start the sums with a step's first sample: :math:`\sum g \leftarrow g` and :math:`\sum g\odot d \leftarrow
    g\odot d` (``price``) or :math:`\sum g\odot g \leftarrow g\odot g`. ``hess_sums`` may be the very tensors of
    ``offsets``."""
    torch._foreach_copy_(grad_sums, grads)
    if price:
        if any(h is not d for h, d in zip(hess_sums, offsets, strict=True)):
            torch._foreach_copy_(hess_sums, offsets)
        torch._foreach_mul_(hess_sums, grads)
    else:
        torch._foreach_copy_(hess_sums, grad_sums)
        torch._foreach_mul_(hess_sums, grad_sums)


def add_sample_(grad_sums: list[Tensor], hess_sums: list[Tensor], grads: list[Tensor], offsets: list[Tensor], *,
                price: bool) -> None:
    r"""Add a further sample to the sums: :math:`\sum g \mathrel{+}= g`, :math:`\sum g\odot d \mathrel{+}= g\odot d`
    (``price``) or :math:`\sum g\odot g \mathrel{+}= g\odot g`."""
    torch._foreach_add_(grad_sums, grads)
    torch._foreach_addcmul_(hess_sums, offsets if price else grads, grads)


def update_(
    means: list[Tensor],
    grad_sums: list[Tensor],
    hess_sums: list[Tensor],
    momenta: list[Tensor],
    hessians: list[Tensor],
    *,
    num_samples: int,
    lr: float,
    ess: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    clip_radius: float,
    bias_correction: float,
    price: bool,
    count_clipped: bool = False,
) -> list[Tensor] | None:
    r"""One update of :math:`\bar g`, :math:`h` and :math:`m` from the sums of ``num_samples`` = :math:`S` samples.

    With :math:`\hat g = \frac1S\sum_s g_s`, :math:`\hat h = \frac{\lambda}{S}(h+\delta)\odot\sum_s g_s\odot d_s`
    (Price's estimator, :math:`= \frac1S\sum_s g_s\odot(\theta_s - m)/\sigma^2`) or
    :math:`\frac{\lambda}{S}\sum_s g_s\odot g_s` (``price=False``), :math:`D = h - \hat h`, :math:`b` =
    ``bias_correction`` and :math:`\alpha` = ``lr`` (already rescaled by the caller):

    .. math::
        \bar g &\leftarrow \beta_1\bar g + (1-\beta_1)\hat g \\
        h &\leftarrow h - (1-\beta_2) D + \tfrac12(1-\beta_2)^2\, D^2/(h+\delta) \\
        m &\leftarrow m - \tfrac{\alpha}{b}\,\mathrm{clip}\big((\bar g + \delta b\,m)/(h+\delta),\ \pm\rho b\big)

    (the last is :math:`m - \alpha\,\mathrm{clip}((\bar g/b + \delta m)/(h+\delta), \pm\rho)`). The sums serve
    as scratch space (no allocation) and hold garbage on return. Returns, with ``count_clipped`` and a finite
    :math:`\rho`, the number of clipped coordinates of each tensor (0-dim int64 tensors, no host sync), else None.
    """
    scratch, diff = grad_sums, hess_sums
    if num_samples > 1:
        torch._foreach_div_(grad_sums, num_samples)  # ĝ
    torch._foreach_lerp_(momenta, grad_sums, 1.0 - beta1)  # ḡ ← β₁ḡ + (1−β₁)ĝ
    torch._foreach_copy_(scratch, hessians)
    if weight_decay:
        torch._foreach_add_(scratch, weight_decay)  # h + δ, before h changes
    if price:
        torch._foreach_mul_(diff, scratch)
    torch._foreach_mul_(diff, -ess / num_samples)
    torch._foreach_add_(diff, hessians)  # D = h − ĥ
    torch._foreach_add_(hessians, diff, alpha=-(1.0 - beta2))  # h ← β₂h + (1−β₂)ĥ
    torch._foreach_mul_(diff, diff)
    torch._foreach_addcdiv_(hessians, diff, scratch, value=0.5 * (1.0 - beta2) ** 2)  # + ½(1−β₂)²D²/(h+δ)
    direction = diff  # u = (ḡ + δbm)/(h+δ) with the new h
    torch._foreach_copy_(direction, momenta)
    if weight_decay:
        torch._foreach_add_(direction, means, alpha=weight_decay * bias_correction)
        torch._foreach_copy_(scratch, hessians)
        torch._foreach_add_(scratch, weight_decay)
        torch._foreach_div_(direction, scratch)
    else:
        torch._foreach_div_(direction, hessians)
    radius = clip_radius * bias_correction
    counts = None
    if radius != float("inf"):
        if count_clipped:
            counts = [(u.abs() > radius).sum() for u in direction]
        torch._foreach_clamp_min_(direction, -radius)
        torch._foreach_clamp_max_(direction, radius)
    torch._foreach_add_(means, direction, alpha=-lr / bias_correction)
    return counts
