r"""Samples of a mean-field Gaussian posterior: the one sampler of IVON's training and evaluation samples and of
the saved posterior (:class:`varlora.posterior.Posterior`).

A sample is :math:`\theta = m + \sqrt\tau\,\sigma\odot\epsilon` with :math:`\epsilon \sim \mathcal N(0, I)` and
:math:`\tau \in [0, 1]` (:math:`\tau = 1` the posterior, as in training; :math:`\tau = 0` its mean). The noise
layout is fixed: one ``torch.randn`` per parameter, in the order given, shaped like it, in :math:`\sigma`'s dtype
(float32, float64 for float64 parameters), drawn by the generator of the parameter's device. So a generator state
gives the same sample for any :math:`\tau` (common random numbers: :math:`\tau = 0` still consumes the draws),
and a CPU model the same samples as before this module drew on the device.

Parameters sharded by FSDP2 (DTensors) are perturbed shard by shard: each rank draws the noise of the parameter's
full shape, as an unsharded run draws it, and adds its slice to its shard (σ is given as a DTensor like the
parameter, or as a full tensor that every rank cuts to its shard). The all-gather before each forward then gives
every rank the sample :math:`\theta` that one unsharded process would see, when the ranks' generators agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor

from varlora.optim import _dtensor

__all__ = ["GeneratorSource", "check_tau", "perturbed_named_params", "perturbed_params", "standard_normal",
           "stacked_named_samples"]

#: A generator, or a function giving the generator of a device (the optimizer's noise streams).
GeneratorSource = torch.Generator | Callable[[torch.device], torch.Generator]


def check_tau(tau: float) -> float:
    """``tau`` as a float; ``ValueError`` naming it unless it is a real number in [0, 1]."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid tau: {tau!r} (expected a real number in [0, 1])") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid tau: {tau!r} (must be in [0, 1])")
    return value


def standard_normal(like: Sequence[Tensor], generator: GeneratorSource, out: Sequence[Tensor] | None = None
                    ) -> list[Tensor]:
    r""":math:`\epsilon_k \sim \mathcal N(0, I)`, one ``torch.randn`` per tensor of ``like``, in order: shaped like
    it, in its dtype promoted to at least float32, on its device (written into ``out`` when given). A function
    ``generator`` gives each device's generator; a single generator on another device draws there, and the draws
    are copied over. For a DTensor of ``like`` (an FSDP2 shard) the draw has its full shape and this rank keeps
    its shard (a plain tensor shaped like the local shard)."""
    eps = list(out) if out is not None else [
        torch.empty(_dtensor.local(t).shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
        for t in like]
    for t, e in zip(like, eps, strict=True):
        gen = generator(e.device) if callable(generator) else generator
        if _dtensor.is_sharded(t):
            draw = torch.randn(t.shape, generator=gen, dtype=e.dtype, device=gen.device)  # (*full shape)
            e.copy_(_dtensor.shard_of(draw, t))
        elif gen.device == e.device:
            e.normal_(generator=gen)  # the values of torch.randn(e.shape, generator=gen)
        else:
            e.copy_(torch.randn(e.shape, generator=gen, dtype=e.dtype, device=gen.device))
    return eps


def _scaled(stds: Sequence[Tensor], tau: float) -> list[Tensor]:
    r""":math:`\sqrt\tau\,\sigma` (the very tensors for :math:`\tau = 1`)."""
    return list(stds) if tau == 1.0 else torch._foreach_mul(list(stds), math.sqrt(tau))


def _check_shapes(params: Sequence[Tensor], *others: Sequence[Tensor]) -> None:
    for p, *ts in zip(params, *others, strict=True):
        for t in ts:
            if t.shape != p.shape:
                raise ValueError(f"std or noise of shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)}")


@contextmanager
def perturbed_params(
    params: Sequence[Tensor],
    stds: Sequence[Tensor],
    *,
    tau: float,
    generator: GeneratorSource | None = None,
    noise: Sequence[Tensor] | None = None,
    means: Sequence[Tensor] | None = None,
    buffers: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
) -> Iterator[list[Tensor] | None]:
    r"""Context in which each ``params[k]`` holds :math:`m_k + \sqrt\tau\,\sigma_k\odot\epsilon_k`; it yields the
    offsets :math:`\sqrt\tau\,\sigma_k\odot\epsilon_k` (None for :math:`\tau = 0`, which leaves the parameters
    exactly as they are; the draws are still made).

    Args:
        params: the parameters, perturbed in place in this order; restored exactly on exit, also when the body
            raises.
        stds: :math:`\sigma_k`, shaped like the parameters, on their devices (the offsets are in their dtype);
            for a DTensor parameter a DTensor like it, or its full tensor (cut to this rank's shard).
        tau: :math:`\tau \in [0, 1]`; ``ValueError`` otherwise.
        generator: the source of :math:`\epsilon_k` (see :func:`standard_normal`).
        noise: explicit :math:`\epsilon_k` instead of ``generator`` (one tensor per parameter).
        means: :math:`m_k` at full precision (fp32 master copies of bf16 parameters); default: the parameters.
        buffers: (backups, offsets): tensors shaped like the parameters, in :math:`\sigma`'s dtype, to use instead of
            allocating (a training loop reuses them every step). ``stds`` may be the backup buffers themselves:
            they are read before the backups are written.

    Each parameter becomes :math:`m_k` plus its offset, rounded once to its dtype. With DTensor parameters (FSDP2)
    every rank perturbs its own shard, by its slice of the full draw, and the offsets are local shards.
    """
    tau = check_tau(tau)
    if len(stds) != len(params):
        raise ValueError(f"{len(stds)} std tensors for {len(params)} parameters")
    if (noise is None) == (generator is None):
        raise ValueError("pass exactly one of generator and noise")
    if noise is not None and len(noise) != len(params):
        raise ValueError(f"noise has {len(noise)} tensors for {len(params)} parameters")
    stds = [_dtensor.like(s, p) for s, p in zip(stds, params, strict=True)]  # a full σ of a shard: cut below
    _check_shapes(params, stds, *([noise] if noise is not None else []))
    with torch.no_grad():
        params = [_dtensor.local(p.detach()) for p in params]  # this rank's shards (the storage of the parameters)
        out = None if buffers is None else [_dtensor.local(b) for b in buffers[1]]
        if noise is None:
            offsets = standard_normal(stds, generator, out=out)
        else:
            draws = [_dtensor.shard_of(e, s) for e, s in zip(noise, stds, strict=True)]  # this rank's ε
            offsets = out or [e.to(s.device, s.dtype, copy=True) for e, s in zip(draws, stds, strict=True)]
            if out:
                torch._foreach_copy_(offsets, draws)
        stds = [_dtensor.local(s) for s in stds]
        if tau != 0.0 and params:
            torch._foreach_mul_(offsets, _scaled(stds, tau))  # (√τσ)⊙ε
            if buffers is None:
                backups = [p.clone() for p in params]
            else:
                backups = [_dtensor.local(b) for b in buffers[0]]
                torch._foreach_copy_(backups, params)
    if tau == 0.0 or not params:
        yield None
        return
    try:
        with torch.no_grad():
            means = None if means is None else [_dtensor.local(m) for m in means]
            if means is None or all(m.data_ptr() == p.data_ptr() for m, p in zip(means, params, strict=True)):
                torch._foreach_add_(params, offsets)  # θ = m + √τ σ⊙ε
            else:
                torch._foreach_copy_(params, torch._foreach_add(means, offsets))
        yield offsets
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, backups)


def perturbed_named_params(
    params: Mapping[str, Tensor], stds: Mapping[str, Tensor], *, tau: float, generator: torch.Generator
) -> AbstractContextManager[list[Tensor] | None]:
    """:func:`perturbed_params` over the parameters in sorted-name order (``stds`` keyed by the same names):
    the saved posterior's sampler."""
    missing = sorted(set(params) - set(stds))
    if missing:
        raise ValueError(f"no std for the parameters {missing}")
    names = sorted(params)
    return perturbed_params([params[n] for n in names], [stds[n].to(params[n].device) for n in names], tau=tau,
                            generator=generator)


def stacked_named_samples(
    params: Mapping[str, Tensor], stds: Mapping[str, Tensor], *, tau: float, generator: torch.Generator,
    n_samples: int,
) -> dict[str, Tensor]:
    r"""``n_samples`` samples :math:`\theta_s = m + \sqrt\tau\,\sigma\odot\epsilon_s` at once: name →
    (S, \*shape) tensor in the parameter's dtype and device.

    The noise is drawn as ``n_samples`` successive :func:`perturbed_named_params` blocks draw it from
    ``generator`` and rounded the same way, so sample ``s`` equals the parameters inside the ``s``-th block bit
    for bit. The parameters themselves are not modified.
    """
    tau = check_tau(tau)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    missing = sorted(set(params) - set(stds))
    if missing:
        raise ValueError(f"no std for the parameters {missing}")
    names = sorted(params)
    ps, ss = [params[n].detach() for n in names], [stds[n].to(params[n].device) for n in names]
    _check_shapes(ps, ss)
    samples: list[list[Tensor]] = []
    with torch.no_grad():
        for _ in range(n_samples):
            offsets = standard_normal(ss, generator)
            if tau == 0.0:
                samples.append([p.clone() for p in ps])
                continue
            torch._foreach_mul_(offsets, _scaled(ss, tau))
            samples.append([torch.add(p, d).to(p.dtype) for p, d in zip(ps, offsets, strict=True)])
    return {n: torch.stack([sample[k] for sample in samples]) for k, n in enumerate(names)}
