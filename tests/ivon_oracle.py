r"""IVON written out one tensor at a time from Algorithm 1 of Shen et al. (2024): the oracle that
:class:`varlora.IVON` (one ``torch._foreach_*`` implementation) must equal in float64.

No optimizer machinery: a parameter is a dict of tensors (``m``, ``h``, ``g_bar``) and an int ``t``, and a step
takes the standard-normal draws :math:`\epsilon_s` of its samples and a function giving the gradients at a sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def new_state(mean: Tensor, hess_init: float) -> dict:
    return {"m": mean.clone(), "h": torch.full_like(mean, hess_init), "g_bar": torch.zeros_like(mean), "t": 0}


def sigma(state: dict, ess: float, weight_decay: float) -> Tensor:
    return 1.0 / torch.sqrt(ess * (state["h"] + weight_decay))


def step(
    states: Sequence[dict],
    options: Sequence[dict],
    eps: Sequence[Sequence[Tensor]],
    grads_at: Callable[[list[Tensor], int], list[Tensor | None]],
) -> None:
    """One step of every parameter: θ_s = m + σ⊙ε_s for each sample s (``eps[s][k]`` of parameter k), the
    gradients ``grads_at(θ_s, s)`` (None: parameter k got none in sample s, counted as zero; none in any sample:
    the parameter is skipped), then the updates of ḡ, h and m. ``options[k]``: the hyper-parameters of parameter
    k's group (lr, ess, hess_init, beta1, beta2, weight_decay, clip_radius, hess_approx, rescale_lr, debias)."""
    sigmas = [sigma(st, o["ess"], o["weight_decay"]) for st, o in zip(states, options, strict=True)]
    samples = []
    for s, e in enumerate(eps):
        thetas = [st["m"] + sg * ek for st, sg, ek in zip(states, sigmas, e, strict=True)]
        samples.append((thetas, grads_at(thetas, s)))
    for k, (state, o) in enumerate(zip(states, options, strict=True)):
        grads, hess_terms = [], []
        for thetas, g in samples:
            if g[k] is None:
                continue
            grads.append(g[k])
            offset = thetas[k] - state["m"]
            hess_terms.append(g[k] * offset / sigmas[k] ** 2 if o["hess_approx"] == "price" else o["ess"] * g[k] ** 2)
        if not grads:
            continue
        n = len(eps)
        g_hat, h_hat = sum(grads) / n, sum(hess_terms) / n
        h, delta, beta1, beta2 = state["h"], o["weight_decay"], o["beta1"], o["beta2"]
        state["t"] += 1
        state["g_bar"] = beta1 * state["g_bar"] + (1 - beta1) * g_hat
        state["h"] = beta2 * h + (1 - beta2) * h_hat + 0.5 * (1 - beta2) ** 2 * (h - h_hat) ** 2 / (h + delta)
        b = 1 - beta1 ** state["t"] if o["debias"] else 1.0
        alpha = o["lr"] * (o["hess_init"] + delta) if o["rescale_lr"] else o["lr"]
        direction = (state["g_bar"] / b + delta * state["m"]) / (state["h"] + delta)
        if math.isfinite(o["clip_radius"]):
            direction = direction.clamp(-o["clip_radius"], o["clip_radius"])
        state["m"] = state["m"] - alpha * direction
