r"""Test-time sampling from a mean-field Gaussian posterior, shared by :meth:`varlora.IVON.sampled_params`
(``train=False``) and the saved posterior (:class:`varlora.posterior.Posterior`).

A sample is :math:`\theta = m + \sqrt\tau\,\sigma\odot\epsilon` with :math:`\epsilon \sim \mathcal N(0, I)`
and :math:`\tau \in [0, 1]` (:math:`\tau = 1` the posterior, :math:`\tau = 0` its mean). The noise layout is
fixed: one ``torch.randn(shape, dtype=float32, generator=generator)`` per parameter, in the order given
(sorted names for :func:`perturbed_named_params`), on the generator's device. So the same generator state
gives the same sample on any device and for any :math:`\tau` (common random numbers: samples at several
:math:`\tau` from one seed share :math:`\epsilon`; :math:`\tau = 0` still consumes the draws).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor

__all__ = ["check_tau", "perturbed_named_params", "perturbed_params", "stacked_named_samples"]


def check_tau(tau: float) -> float:
    """``tau`` as a float; ``ValueError`` naming it unless it is a real number in [0, 1]."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid tau: {tau!r} (expected a real number in [0, 1])") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid tau: {tau!r} (must be in [0, 1])")
    return value


@contextmanager
def perturbed_params(
    params: Sequence[Tensor],
    stds: Sequence[Tensor],
    *,
    tau: float,
    generator: torch.Generator | None = None,
    noise: Sequence[Tensor] | None = None,
    means: Sequence[Tensor] | None = None,
) -> Iterator[None]:
    r"""Context in which each ``params[k]`` holds :math:`m_k + \sqrt\tau\,\sigma_k\odot\epsilon_k`.

    Args:
        params: the parameters, perturbed in place in this order; restored exactly on exit, also when the
            body raises.
        stds: :math:`\sigma_k`, shaped like the parameters (any device and floating dtype).
        tau: :math:`\tau \in [0, 1]`; ``ValueError`` otherwise.
        generator: the source of :math:`\epsilon_k` (float32 draws on its device, in ``params`` order).
        noise: explicit :math:`\epsilon_k` instead of ``generator`` (one tensor per parameter).
        means: :math:`m_k` at full precision (e.g. fp32 master copies of bf16 parameters); default: the
            parameters' own values.

    The perturbation :math:`(\sqrt\tau\,\sigma_k)\odot\epsilon_k` is computed in :math:`\sigma_k`'s dtype on
    its device, moved to the parameter's device, added to :math:`m_k` (with type promotion) and rounded once
    to the parameter's dtype. With :math:`\tau = 0` the parameters are left exactly as they are.
    """
    tau = check_tau(tau)
    if len(stds) != len(params):
        raise ValueError(f"{len(stds)} std tensors for {len(params)} parameters")
    if (noise is None) == (generator is None):
        raise ValueError("pass exactly one of generator and noise")
    if noise is not None and len(noise) != len(params):
        raise ValueError(f"noise has {len(noise)} tensors for {len(params)} parameters")
    for p, s in zip(params, stds, strict=True):
        if s.shape != p.shape:
            raise ValueError(f"std of shape {tuple(s.shape)} for a parameter of shape {tuple(p.shape)}")
    scale = math.sqrt(tau)
    with torch.no_grad():
        backups = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for k, (p, std) in enumerate(zip(params, stds, strict=True)):
                if noise is not None:
                    eps = noise[k]
                    if eps.shape != p.shape:
                        raise ValueError(f"noise of shape {tuple(eps.shape)} for a parameter of shape "
                                         f"{tuple(p.shape)}")
                else:
                    eps = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=generator.device)
                if tau == 0.0:
                    continue
                delta = (scale * std) * eps.to(device=std.device, dtype=std.dtype)  # √τ σ⊙ε
                mean = p if means is None else means[k]
                p.copy_(torch.add(mean, delta.to(p.device)))  # θ = m + √τ σ⊙ε, rounded once
        yield
    finally:
        with torch.no_grad():
            for p, backup in zip(params, backups, strict=True):
                p.copy_(backup)


def perturbed_named_params(
    params: Mapping[str, Tensor], stds: Mapping[str, Tensor], *, tau: float, generator: torch.Generator
) -> AbstractContextManager[None]:
    """:func:`perturbed_params` over the parameters in sorted-name order (``stds`` keyed by the same names):
    the saved posterior's sampler."""
    missing = sorted(set(params) - set(stds))
    if missing:
        raise ValueError(f"no std for the parameters {missing}")
    names = sorted(params)
    return perturbed_params([params[n] for n in names], [stds[n] for n in names], tau=tau, generator=generator)


def stacked_named_samples(
    params: Mapping[str, Tensor], stds: Mapping[str, Tensor], *, tau: float, generator: torch.Generator,
    n_samples: int,
) -> dict[str, Tensor]:
    r"""``n_samples`` samples :math:`\theta_s = m + \sqrt\tau\,\sigma\odot\epsilon_s` at once: name →
    (S, \*shape) tensor in the parameter's dtype and device.

    The noise is drawn exactly as ``n_samples`` successive :func:`perturbed_named_params` blocks draw it from
    ``generator`` (sample by sample, each in sorted-name order) and rounded the same way, so sample ``s`` equals
    the parameters inside the ``s``-th block bit for bit. The parameters themselves are not modified.
    """
    tau = check_tau(tau)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    missing = sorted(set(params) - set(stds))
    if missing:
        raise ValueError(f"no std for the parameters {missing}")
    names = sorted(params)
    for n in names:
        if stds[n].shape != params[n].shape:
            raise ValueError(f"std of shape {tuple(stds[n].shape)} for a parameter of shape {tuple(params[n].shape)}")
    scale = math.sqrt(tau)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(n_samples):
            for n in names:
                p, std = params[n], stds[n]
                eps = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=generator.device)
                if tau == 0.0:
                    out[n].append(p.detach().clone())
                    continue
                delta = (scale * std) * eps.to(device=std.device, dtype=std.dtype)  # √τ σ⊙ε
                out[n].append(torch.add(p.detach(), delta.to(p.device)).to(p.dtype))  # rounded once
    return {n: torch.stack(v) for n, v in out.items()}
