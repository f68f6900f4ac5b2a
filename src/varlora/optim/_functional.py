r"""The math of IVON as pure functions on lists of tensors, apart from the optimizer's bookkeeping.

Each function has a readable single-tensor path (one tensor at a time, the equations written out) and a
``torch._foreach_*`` path; both issue the same element-wise operations in the same order, and
``tests/test_ivon.py`` checks that they agree bit for bit in float64. With ``fused``, fp32 CPU tensors go to the
compiled one-pass kernels of :mod:`varlora.optim._cpu_kernels` instead (``tests/test_ivon_fused.py`` checks
them against the torch paths). Every function works in place, takes the
scalars of one parameter group and allocates no parameter-sized temporary on the foreach path (except for
bf16/fp16 parameters when sampling); :class:`varlora.optim.IVON` buckets the tensors by group, device and dtype.

Lists that tile one contiguous buffer in order (the optimizer keeps its state and workspace that way) are
processed by the foreach path as chunks of that flat buffer: the math that involves neither the parameters nor
their gradients (the "state kernels") costs a few kernel launches per chunk instead of one per parameter, and
the several passes of a kernel stay in cache. Only the operations that read or write the parameters and their
gradients iterate over the tensors, with ``torch._foreach_*``.

Symbols as in :class:`~varlora.optim.IVON`: :math:`m` mean, :math:`h` Hessian estimate, :math:`\bar g`
momentum, :math:`\lambda` ``ess``, :math:`\delta` ``weight_decay``,
:math:`\sigma = 1/\sqrt{\lambda(h+\delta)}`, and :math:`\eta = \epsilon/\sqrt{h+\delta} = \sqrt\lambda\,
\sigma\odot\epsilon`, the scaled noise kept between sampling and the update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from varlora.optim import _cpu_kernels, _threads

__all__ = ["CHUNK", "NOISE_STREAMS", "accumulate_", "fill_normal_", "flat_view", "hessian_sums", "perturb_",
           "update_"]

#: Number of independent substreams a CPU noise draw is split into (fixed, so values never depend on threads).
NOISE_STREAMS = 8
#: Elements per chunk of the flat state buffers (1 MiB of fp32: a kernel's arrays stay in L2/L3 cache).
CHUNK = 1 << 18
# Below this many elements a CPU draw runs in the calling thread (same values, no thread overhead).
_PARALLEL_MIN_NUMEL = 1 << 17
_SEED_BOUND = 1 << 62

def fill_normal_(tensors: Sequence[Tensor], generator: torch.Generator, fused: bool = False) -> None:
    r"""Fill ``tensors`` in place with independent :math:`\mathcal N(0, 1)` draws taken from ``generator``.

    On CUDA (and any non-CPU device) each tensor is filled from ``generator`` directly. PyTorch draws CPU
    normals on one thread (about 2.4 ns a value, close to the cost of a whole AdamW step), so on CPU one draw
    takes :data:`NOISE_STREAMS` seeds from ``generator``, splits the concatenated elements into that many
    equal contiguous ranges and fills each range from its own seeded generator, up to
    ``torch.get_num_threads()`` ranges at a time. The values depend only on the state of ``generator`` and on
    the tensor sizes, not on the number of threads. (``normal_`` pairs its values in blocks, so the same
    elements split into other tensors give other values: the optimizer passes its flat buffers.)

    With ``fused`` (contiguous fp32 CPU tensors only) the ranges are filled by the compiled vectorised
    generator of :mod:`~varlora.optim._cpu_kernels` (xoshiro128+ and Box-Muller, several times faster), seeded
    from the same seeds: other values, the same distribution, the same guarantees.

    All tensors must be contiguous, on ``generator``'s device, with a floating dtype.
    """
    if not tensors:
        return
    if generator.device.type != "cpu":
        for t in tensors:
            t.normal_(generator=generator)
        return
    seeds = torch.randint(0, _SEED_BOUND, (NOISE_STREAMS,), generator=generator).tolist()
    flats = [t.view(-1) for t in tensors]
    total = sum(f.numel() for f in flats)
    # stream k fills the elements [bounds[k], bounds[k + 1]) of the concatenation of the tensors
    bounds = [total * k // NOISE_STREAMS for k in range(NOISE_STREAMS + 1)]
    chunks: list[list[Tensor]] = [[] for _ in range(NOISE_STREAMS)]
    start = 0
    for flat in flats:
        stop = start + flat.numel()
        for k in range(NOISE_STREAMS):
            lo, hi = max(start, bounds[k]), min(stop, bounds[k + 1])
            if lo < hi:
                chunks[k].append(flat[lo - start : hi - start])
        start = stop

    workers = min(NOISE_STREAMS, torch.get_num_threads()) if total >= _PARALLEL_MIN_NUMEL else 1

    def fill(worker: int) -> None:
        for k in range(worker, NOISE_STREAMS, workers):
            if fused:  # one seed per piece of the range (usually one: the optimizer passes a flat buffer)
                for j, chunk in enumerate(chunks[k]):
                    _cpu_kernels.fill_normal(chunk, (seeds[k] + j * 0x9E3779B97F4A7C15) % (1 << 64))
                continue
            gen = torch.Generator().manual_seed(seeds[k])
            for chunk in chunks[k]:
                chunk.normal_(generator=gen)

    _threads.run(fill, workers)


def flat_view(tensors: list[Tensor]) -> Tensor | None:
    """The 1-D tensor that ``tensors`` tile (contiguous, consecutive, in one storage), or None."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.view(-1) if first.is_contiguous() else None
    itemsize = first.element_size()
    expected = first.data_ptr()
    total = 0
    for t in tensors:
        if t.data_ptr() != expected or t.dtype != first.dtype or not t.is_contiguous():
            return None
        expected += t.numel() * itemsize
        total += t.numel()
    if (first.storage_offset() + total) * itemsize > first.untyped_storage().nbytes():
        return None  # consecutive in memory but not in one storage
    return first.as_strided((total,), (1,))


def _state_lists(foreach: bool, *lists: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """Per-element tuples for the state kernels: with ``foreach``, when every list tiles one buffer in the
    same way, consecutive chunks of the flat buffers (:data:`CHUNK` elements, so that a kernel's several
    passes stay in cache); otherwise one tuple per parameter."""
    if foreach and lists[0]:
        flats = [flat_view(ts) for ts in lists]
        if all(f is not None for f in flats):  # tensors at one position share a shape: the tilings agree
            return list(zip(*(f.split(CHUNK) for f in flats), strict=True))  # type: ignore[union-attr]
    return list(zip(*lists, strict=True))


# ---------------------------------------------------------------------------------------- state kernels
# Element-wise math on tensors of one shape that do not involve the parameters or their gradients. The
# single-tensor path runs them once per parameter; the foreach path runs them once on the flat buffers.


def _noise_kernel_(eps: Tensor, h: Tensor, root: Tensor, weight_decay: float) -> None:
    """eps: ε → η = ε/√(h+δ); root: scratch."""
    if weight_decay:
        torch.add(h, weight_decay, out=root).rsqrt_()
    else:
        torch.rsqrt(h, out=root)  # 1/√(h+δ) = √λ σ
    eps.mul_(root)  # η = ε/√(h+δ) = √λ σ⊙ε


def _hessian_kernel_(
    h: Tensor,
    mom: Tensor,
    g: Tensor,
    e: Tensor,
    *,
    num_samples: int,
    hess_scale: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    price: bool,
) -> None:
    """Update ḡ (mom) and h from g = Σ g_s and e = Σ g_s⊙η_s (price) or Σ g_s⊙g_s; g, e: scratch after."""
    if num_samples > 1:
        g.div_(num_samples)  # ĝ
    mom.lerp_(g, 1.0 - beta1)  # ḡ ← β₁ḡ + (1−β₁)ĝ
    if weight_decay:
        torch.add(h, weight_decay, out=g)  # g ← h + δ
    if price:
        torch.addcmul(h, e, g if weight_decay else h, value=-hess_scale, out=e)  # e ← D = h − ĥ
    else:
        torch.add(h, e, alpha=-hess_scale, out=e)  # e ← D = h − ĥ
    if not weight_decay:
        g.copy_(h)  # g ← h + δ, before h changes
    h.add_(e, alpha=-(1.0 - beta2))  # h ← β₂h + (1−β₂)ĥ
    h.addcdiv_(e.mul_(e), g, value=0.5 * (1.0 - beta2) ** 2)  # + ½(1−β₂)² D²/(h+δ)


def _direction_kernel_(
    u: Tensor, out: Tensor, mom: Tensor, h: Tensor, *, weight_decay: float, radius: float, count: bool
) -> Tensor | None:
    """out ← clip(u/(h+δ), ±radius) with u = ḡ + δbm (δ > 0, filled by the caller), or ḡ/h (δ = 0, u is
    then scratch). Returns the number of clipped entries (None without clipping or without ``count``); u is
    scratch after."""
    if weight_decay:
        u.div_(torch.add(h, weight_decay, out=out))
    else:
        torch.div(mom, h, out=u)
    if not math.isfinite(radius):
        out.copy_(u)
        return None
    torch.clamp(u, -radius, radius, out=out)
    return _count_nonzero_(u.sub_(out)) if count else None  # nonzero where the clip acted


def _count_nonzero_(x: Tensor) -> Tensor:
    """Number of nonzero entries of ``x`` (0-dim int64, no sync); overwrites ``x``.

    ``torch.count_nonzero`` runs at ~3 ns an element on CPU floats; ``sign().abs().sum()`` in chunks of
    2**24 elements (where float32 sums of zeros and ones are exact) is several times faster.
    """
    x = x.reshape(-1).sign_().abs_()
    total = torch.zeros((), dtype=torch.int64, device=x.device)
    for chunk in x.split(1 << 24):
        total += chunk.sum().to(torch.int64)
    return total


# ------------------------------------------------------------------------------------------ public API


def perturb_(
    params: list[Tensor],
    means: list[Tensor],
    backups: list[Tensor],
    noises: list[Tensor],
    hessians: list[Tensor],
    *,
    ess: float,
    weight_decay: float,
    scale: float,
    foreach: bool,
    fused: bool = False,
) -> None:
    r"""Move the parameters to a sample :math:`\theta = m + s\,\sigma\odot\epsilon`, in place.

    Args:
        params: the parameters; they hold :math:`\theta` on return (rounded to their dtype).
        means: :math:`m` at full precision: the very tensors of ``params`` for fp32/fp64 parameters, their
            master copies for low-precision ones.
        backups: scratch; on return they hold the parameters' previous values (to restore them exactly).
        noises: :math:`\epsilon \sim \mathcal N(0, I)` on entry, :math:`\eta = \epsilon/\sqrt{h+\delta}` on
            return (so :math:`\theta = m + s\,\eta/\sqrt\lambda`).
        hessians: :math:`h`.
        ess, weight_decay: :math:`\lambda`, :math:`\delta`.
        scale: :math:`s = \sqrt\tau` (1 for training).
        foreach: use the ``torch._foreach_*`` path.
        fused: use the compiled one-pass kernel (fp32 CPU tensors, ``params`` being ``means``).
    """
    value = scale / math.sqrt(ess)
    if fused:
        _cpu_kernels.perturb(params, backups, noises, hessians, weight_decay=weight_decay, value=value)
        return
    for eps, h, root in _state_lists(foreach, noises, hessians, backups):
        _noise_kernel_(eps, h, root, weight_decay)
    in_place = all(p is m for p, m in zip(params, means, strict=True))
    if foreach:
        torch._foreach_copy_(backups, params)
        if in_place:
            torch._foreach_add_(params, noises, alpha=value)
        else:
            torch._foreach_copy_(params, torch._foreach_add(means, noises, alpha=value))
        return
    for p, m, backup, eta in zip(params, means, backups, noises, strict=True):
        backup.copy_(p)
        if in_place:
            p.add_(eta, alpha=value)  # θ = m + s·σ⊙ε
        else:
            p.copy_(torch.add(m, eta, alpha=value))


def accumulate_(
    grad_sums: list[Tensor],
    hess_sums: list[Tensor],
    grads: list[Tensor],
    noises: list[Tensor],
    *,
    hess_approx: str,
    first: bool,
    foreach: bool,
    fused: bool = False,
) -> None:
    r"""Add one MC sample's gradient :math:`g` to the running sums of the step, in place.

    ``grad_sums`` accumulates :math:`\sum_s g_s`; ``hess_sums`` accumulates :math:`\sum_s g_s\odot\eta_s`
    (``"price"``, with :math:`\eta` from :func:`perturb_`) or :math:`\sum_s g_s\odot g_s` (``"gradsq"``).
    With ``first`` the sums are started rather than added to: their previous content is ignored, and
    ``hess_sums`` may be the very tensors of ``noises`` (the noise is not needed afterwards).
    ``grads`` may have a lower-precision dtype than the sums. ``fused`` runs the compiled one-pass kernel
    (fp32 CPU tensors).
    """
    if hess_approx not in ("price", "gradsq"):
        raise ValueError(f"Invalid hess_approx: {hess_approx!r}")
    price = hess_approx == "price"
    if fused:
        _cpu_kernels.accumulate(grad_sums, hess_sums, grads, noises, first=first, price=price)
        return
    if foreach:
        if first:
            torch._foreach_copy_(grad_sums, grads)
            if not (price and all(s is n for s, n in zip(hess_sums, noises, strict=True))):
                torch._foreach_copy_(hess_sums, noises if price else grads)
            torch._foreach_mul_(hess_sums, grads)
        else:
            torch._foreach_add_(grad_sums, grads)
            torch._foreach_addcmul_(hess_sums, noises if price else grads, grads)
        return
    for gsum, hsum, g, eta in zip(grad_sums, hess_sums, grads, noises, strict=True):
        other = eta if price else g
        if first:
            gsum.copy_(g)
            if hsum is not other:
                hsum.copy_(other)
            hsum.mul_(g)  # g⊙η  or  g⊙g
        else:
            gsum.add_(g)
            hsum.addcmul_(other, g)


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
    hess_approx: str,
    foreach: bool,
    fused: bool = False,
    count_clipped: bool = True,
) -> Tensor | None:
    r"""One IVON update of :math:`\bar g`, :math:`h` and :math:`m`, in place.

    With :math:`n` = ``num_samples``, :math:`\hat g = \frac1n\sum_s g_s` and
    :math:`\hat h = \frac{\sqrt\lambda}{n}(h+\delta)\odot\sum_s g_s\odot\eta_s` (Price:
    :math:`= \frac1n\sum_s g_s\odot\epsilon_s/\sigma`) or :math:`\frac{\lambda}{n}\sum_s g_s\odot g_s`
    (``"gradsq"``), :math:`b` = ``bias_correction`` (:math:`1-\beta_1^t`, or 1), :math:`\alpha` = ``lr``
    (already rescaled by the caller) and :math:`D = h - \hat h`:

    .. math::
        \bar g &\leftarrow \beta_1\bar g + (1-\beta_1)\hat g \\
        h &\leftarrow h - (1-\beta_2) D + \tfrac12(1-\beta_2)^2\, D^2/(h+\delta)
           \qquad(= \beta_2 h + (1-\beta_2)\hat h + \dots) \\
        m &\leftarrow m - \alpha\,\mathrm{clip}\big((\bar g/b + \delta m)/(h+\delta),\ \pm\rho\big)
           = m - \tfrac{\alpha}{b}\,\mathrm{clip}\big((\bar g + \delta b\,m)/(h+\delta),\ \pm\rho b\big)

    the last form being the one computed. ``grad_sums`` and ``hess_sums`` serve as scratch space and hold
    garbage on return. Both paths issue the same element-wise operations in the same order; ``fused`` runs
    them, element by element, in the compiled one-pass kernel (fp32 CPU tensors; same result to rounding).

    Returns:
        The number of coordinates whose update was clipped (a 0-dim int64 tensor, not synchronised), or
        ``None`` when ``clip_radius`` is infinite or ``count_clipped`` is False (then the torch paths skip the
        counting pass; the fused kernel counts for free).
    """
    if hess_approx not in ("price", "gradsq"):
        raise ValueError(f"Invalid hess_approx: {hess_approx!r}")
    price = hess_approx == "price"
    hess_scale = (math.sqrt(ess) if price else ess) / num_samples
    radius = clip_radius * bias_correction
    if fused:
        count = _cpu_kernels.update(means, grad_sums, hess_sums, momenta, hessians, num_samples=num_samples,
                                    hess_scale=hess_scale, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                                    radius=radius, bias_correction=bias_correction, lr=lr, price=price)
        return torch.tensor(count) if math.isfinite(radius) and count_clipped else None
    state = _state_lists(foreach, hessians, momenta, grad_sums, hess_sums)
    hessian_options = dict(
        num_samples=num_samples,
        hess_scale=hess_scale,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        price=price,
    )
    counts = []
    if weight_decay:
        for h, mom, g, e in state:
            _hessian_kernel_(h, mom, g, e, **hessian_options)
        # grad_sums ← ḡ + δ b m, which involves the parameters
        if foreach:
            torch._foreach_copy_(grad_sums, momenta)
            torch._foreach_add_(grad_sums, means, alpha=weight_decay * bias_correction)
        else:
            for u, mom, m in zip(grad_sums, momenta, means, strict=True):
                torch.add(mom, m, alpha=weight_decay * bias_correction, out=u)
        for h, mom, u, out in state:
            counts.append(_direction_kernel_(u, out, mom, h, weight_decay=weight_decay, radius=radius,
                                             count=count_clipped))
    else:  # both kernels chunk by chunk
        for h, mom, g, e in state:
            _hessian_kernel_(h, mom, g, e, **hessian_options)
            counts.append(_direction_kernel_(g, e, mom, h, weight_decay=0.0, radius=radius, count=count_clipped))
    clipped = None if not counts or counts[0] is None else torch.stack(counts).sum()
    if foreach:  # m ← m − α/b·clip((ḡ + δbm)/(h+δ), ±ρb)
        torch._foreach_add_(means, hess_sums, alpha=-lr / bias_correction)
    else:
        for m, step in zip(means, hess_sums, strict=True):
            m.add_(step, alpha=-lr / bias_correction)
    return clipped


def hessian_sums(hessians: list[Tensor], *, ess: float, weight_decay: float) -> Tensor:
    r""":math:`(\sum h,\ \sum \sigma)` with :math:`\sigma = 1/\sqrt{\lambda(h+\delta)}` over ``hessians``, as a
    float64 tensor of 2 on their device (no host sync): one pass over the flat buffer they tile (in
    :data:`CHUNK`-element pieces, so the temporary stays small), or over each tensor."""
    flat = flat_view(hessians)
    pieces = flat.split(CHUNK) if flat is not None else [h.reshape(-1) for h in hessians]
    out = torch.zeros(2, dtype=torch.float64, device=hessians[0].device)
    for h in pieces:
        out[0] += h.sum(dtype=torch.float64)
        out[1] += torch.add(h, weight_decay).mul_(ess).rsqrt_().sum(dtype=torch.float64)
    return out
