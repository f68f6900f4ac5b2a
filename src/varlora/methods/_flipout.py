"""Gaussian noise on the LoRA A matrices of a peft model, sampled by flipout: the layer variant of BLoB and TFB.

A LoRA layer computes ``y = W x + s · B A d(x)`` (d = LoRA dropout, s = ``alpha / r``). BLoB (Wang et al. 2024)
and TFB (Shi et al.) put a mean-field Gaussian on A only: A ~ N(M, σ²) with M the LoRA A weight and B
deterministic. A forward pass with A = M + ΔA adds ``s · B ΔA d(x)``; flipout (Wen et al. 2018) draws one
ΔA = σ ⊙ ε, ε ~ N(0, I), per forward pass and decorrelates the tokens of a batch with per-token Rademacher signs
r (on the input features) and t (on the rank):

    y_extra = s · (((d(x) ⊙ r) ΔAᵀ) ⊙ t) Bᵀ                              # (B, T, out)

Each token then sees the weight perturbation diag(t) ΔA diag(r), which is again N(0, σ²) element-wise.

:class:`FlipoutLoRA` installs this as a forward hook on every ``lora_A`` ``nn.Linear`` of a peft model: the hook
receives ``d(x)`` (peft applies the dropout before calling ``lora_A``, so the noise and the mean share its mask)
and adds ``((d(x) ⊙ r) ΔAᵀ) ⊙ t`` to ``lora_A``'s output, which peft then multiplies by B and s. It works with
any peft LoRA layer whose A is a ``nn.Linear`` (plain and quantised linear layers alike) and leaves the peft
model, its parameters and its ``save_pretrained`` untouched: σ lives in this module, not in the model.

Modes: ``"sample"`` adds the noise, drawn from :attr:`FlipoutLoRA.generator` (a ``torch.Generator``; ``None``
draws from the global RNG); ``"mean"`` adds nothing (one pass at A = M, BLoB's "N = 0").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

__all__ = ["FlipoutLoRA", "BlobPosterior", "FixedFlipout", "lora_a_modules", "gaussian_kl", "Mode"]

Mode = Literal["sample", "mean"]


def lora_a_modules(model: nn.Module, adapter: str = "default") -> dict[str, nn.Linear]:
    """The ``lora_A`` linear of ``adapter`` in every peft LoRA layer of ``model``, by the layer's module name
    (sorted). Layers whose A is not a ``nn.Linear`` (LoRA on embeddings or convolutions) are not included."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            lora_a = module.lora_A[adapter]
            if isinstance(lora_a, nn.Linear):
                found[name] = lora_a
    if not found:
        raise ValueError(f"no peft LoRA linear layers with adapter {adapter!r} in the model")
    return dict(sorted(found.items()))


def _key(name: str) -> str:
    # nn.ParameterDict keys cannot contain "."; module names never contain "|".
    return name.replace(".", "|")


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL( N(mean, std²) ‖ N(0, prior_std²) ) summed over all elements, in float64:

        Σ  log(β / σ) + (σ² + μ²) / (2β²) − ½

    σ is floored at the smallest normal float64 inside the logarithm only, so that σ = 0 (a variance forced to
    zero) gives a finite value whose gradient does not reach σ."""
    mu = mean.to(torch.float64)
    sigma = std.to(torch.float64)
    log_sigma = torch.log(sigma.clamp_min(torch.finfo(torch.float64).tiny))
    kl = math.log(prior_std) - log_sigma + (sigma.square() + mu.square()) / (2.0 * prior_std**2) - 0.5
    return kl.sum()


def _rademacher(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    signs = torch.empty(shape, device=like.device, dtype=like.dtype).bernoulli_(0.5, generator=generator)
    return signs.mul_(2.0).sub_(1.0)


class FlipoutLoRA(nn.Module):
    """Flipout noise on every LoRA A of a peft model; subclasses say what σ is (:meth:`std`).

    Args:
        model: a peft model (or any module containing peft LoRA layers); it is not modified apart from the
            forward hooks on its ``lora_A`` linears (:meth:`remove` takes them off).
        adapter: the peft adapter name.

    Attributes:
        names: the LoRA layers' module names, sorted.
        mode: ``"sample"`` (add noise) or ``"mean"`` (add nothing, the default; :meth:`using` switches).
        generator: where the noise comes from (``None``: the global RNG).
    """

    def __init__(self, model: nn.Module, adapter: str = "default") -> None:
        super().__init__()
        modules = lora_a_modules(model, adapter)
        self.names: list[str] = list(modules)
        self.mode: Mode = "mean"
        self.generator: torch.Generator | None = None
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in modules.items()
        ]
        # a plain dict, so that the model's modules are not registered as submodules of this one
        self._modules_by_name: dict[str, nn.Linear] = modules

    def lora_a(self, name: str) -> nn.Linear:
        """The hooked ``lora_A`` linear of layer ``name``."""
        return self._modules_by_name[name]

    def std(self, name: str) -> torch.Tensor:
        """σ of layer ``name``'s A, shaped like its weight (r, in)."""
        raise NotImplementedError

    def _hook(self, name: str):
        def hook(module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self.mode == "mean":
                return None
            x = args[0]                                                              # (..., in), after dropout
            sigma = self.std(name).to(output.dtype)                                  # (r, in)
            noise = torch.randn(sigma.shape, generator=self.generator, device=sigma.device, dtype=sigma.dtype)
            delta_a = sigma * noise                                                  # (r, in), one per forward
            r_in = _rademacher(x.shape, x, self.generator)                           # (..., in)
            t_out = _rademacher(output.shape, output, self.generator)                # (..., r)
            return output + ((x * r_in) @ delta_a.T) * t_out                         # (..., r)

        return hook

    def remove(self) -> None:
        """Take the hooks off the model (the model then computes plain LoRA again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def using(self, mode: Mode, generator: torch.Generator | None = None) -> Iterator[None]:
        """Within the block, forwards use ``mode`` and draw from ``generator``; both are restored after."""
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        saved = self.mode, self.generator
        self.mode, self.generator = mode, generator
        try:
            yield
        finally:
            self.mode, self.generator = saved


class BlobPosterior(FlipoutLoRA):
    """BLoB's variational posterior: σ = ρ² with one trainable ρ per element of each LoRA A (a float32
    ``nn.Parameter`` on A's device), initialised ρ ~ U(ε/√2, ε) from ``generator``.

    ``rho`` is an ``nn.ParameterDict`` keyed by module name (``.`` written as ``|``); :meth:`rho_of` reads it
    by the plain name."""

    def __init__(self, model: nn.Module, init_eps: float, generator: torch.Generator | None = None,
                 adapter: str = "default") -> None:
        super().__init__(model, adapter)
        if not init_eps > 0:
            raise ValueError(f"init_eps must be > 0, got {init_eps}")
        self.rho = nn.ParameterDict()
        for name in self.names:
            weight = self.lora_a(name).weight
            init = torch.empty(weight.shape, dtype=torch.float32).uniform_(
                init_eps / math.sqrt(2.0), init_eps, generator=generator)
            self.rho[_key(name)] = nn.Parameter(init.to(weight.device))

    def rho_of(self, name: str) -> nn.Parameter:
        return self.rho[_key(name)]

    def std(self, name: str) -> torch.Tensor:
        return self.rho_of(name).square()

    def kl(self, prior_std: float) -> torch.Tensor:
        """KL(q ‖ p) summed over every LoRA A, p = N(0, prior_std²) (float64 scalar, differentiable in the
        means and ρ)."""
        return sum(gaussian_kl(self.lora_a(name).weight, self.std(name), prior_std) for name in self.names)

    def named_rho(self) -> dict[str, nn.Parameter]:
        """ρ by plain module name, in :attr:`names` order."""
        return {name: self.rho_of(name) for name in self.names}


class FixedFlipout(FlipoutLoRA):
    """Flipout with a given, fixed σ per LoRA A (TFB's σ_q / dᵢ rows); σ is a buffer set by :meth:`set_std`
    (zero until then)."""

    def __init__(self, model: nn.Module, adapter: str = "default") -> None:
        super().__init__(model, adapter)
        self.sigma = nn.ParameterDict()  # requires_grad=False parameters, i.e. buffers that keep their names
        for name in self.names:
            weight = self.lora_a(name).weight
            self.sigma[_key(name)] = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32),
                                                  requires_grad=False)

    def std(self, name: str) -> torch.Tensor:
        return self.sigma[_key(name)]

    def set_std(self, stds: dict[str, torch.Tensor]) -> None:
        """Set σ of every layer (a tensor shaped like its A weight, or broadcastable to it)."""
        missing = set(self.names) - set(stds)
        if missing:
            raise KeyError(f"no std given for LoRA layers {sorted(missing)}")
        with torch.no_grad():
            for name in self.names:
                target = self.sigma[_key(name)]
                target.copy_(stds[name].to(target.device, target.dtype).expand_as(target))
