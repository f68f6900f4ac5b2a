"""The mean-field Gaussian posterior over LoRA weights, q(θ) = N(m, diag(σ²)), apart from the optimizer.

IVON (Shen et al. 2024) learns σ² = 1 / (λ (h + δ)) with λ the effective sample size ``ess``, h the
Hessian estimate and δ the prior precision ``weight_decay``. The means m are the model's LoRA
weights themselves; this module keeps σ (and h) by parameter *name*, so that the posterior is saved
next to the peft adapter (``posterior.safetensors``) and sampled again after a reload, with no
optimizer in memory.

Prediction (Cong et al. 2024, §3): IVON@mean is one forward at m; IVON averages the softmax
probabilities of S samples θₛ = m + √τ σ ⊙ εₛ, ε ~ N(0, I); τ ∈ [0, 1] scales the variance at test time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from varlora import _io
from varlora.optim import perturbed_named_params
from varlora.optim._dtensor import full

__all__ = ["Posterior", "POSTERIOR_FILE", "scale_over_means"]

POSTERIOR_FILE = "posterior.safetensors"


def scale_over_means(std: Mapping[str, torch.Tensor], means: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The scale of a mean-field posterior against its means, both keyed by the same weight names: ``sigma`` (mean
    σ over the weights), ``ratio_a`` = mean σ / mean |m| over the LoRA A matrices and ``ratio_all`` the same over
    all of them (NaN where the means sum to 0)."""
    sums = {"a": [0.0, 0.0], "all": [0.0, 0.0]}  # Σσ, Σ|m|
    for name, sigma in std.items():
        s, m = sigma.double().sum().item(), means[name].double().abs().sum().item()
        for part in ("all", "a") if ".lora_A." in name else ("all",):
            sums[part][0] += s
            sums[part][1] += m
    n_all = sum(t.numel() for t in std.values())
    return {"sigma": sums["all"][0] / n_all,
            "ratio_a": sums["a"][0] / sums["a"][1] if sums["a"][1] else float("nan"),
            "ratio_all": sums["all"][0] / sums["all"][1] if sums["all"][1] else float("nan")}


@dataclass
class Posterior:
    """Per-parameter standard deviations σ and Hessian estimates h, keyed by parameter name.

    Attributes:
        std: name → σ (float32, same shape as the parameter).
        hess: name → h, the optimizer's Hessian estimate (float32).
        ess: effective sample size λ used to form σ.
        weight_decay: prior precision δ used to form σ.
    """

    std: dict[str, torch.Tensor]
    hess: dict[str, torch.Tensor]
    ess: float
    weight_decay: float

    @classmethod
    def from_optimizer(cls, params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> Posterior:
        """Read σ and h of each named parameter from an :class:`varlora.IVON` optimizer, on the parameter's device
        (samples are drawn there; :meth:`save` copies them to the host once). Those of parameters sharded by FSDP2
        are gathered whole: a collective, which every rank calls, and every rank gets the full posterior."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        groups = {id(group_of[id(p)]) for p in params.values()}
        if len(groups) != 1:
            raise ValueError("a saved posterior needs one ess and weight_decay: use a single parameter group")
        group = group_of[id(next(iter(params.values())))]
        std, hess = {}, {}
        for name, param in params.items():
            std[name] = full(optimizer.posterior_std(param).detach()).float().contiguous()
            hess[name] = full(optimizer.state[param]["hess"].detach()).float().contiguous()
        return cls(std=std, hess=hess, ess=float(group["ess"]), weight_decay=float(group["weight_decay"]))

    def to(self, device: torch.device | str) -> Posterior:
        """This posterior with σ and h on ``device`` (the model's: samples are drawn there)."""
        return Posterior(std={n: t.to(device) for n, t in self.std.items()},
                         hess={n: t.to(device) for n, t in self.hess.items()}, ess=self.ess,
                         weight_decay=self.weight_decay)

    def save(self, folder: str | Path) -> Path:
        """Write ``posterior.safetensors`` (tensors ``std/<name>``, ``hess/<name>``; ess and δ as metadata)."""
        path = Path(folder) / POSTERIOR_FILE
        tensors = {f"{kind}/{n}": t.cpu() for kind, values in (("std", self.std), ("hess", self.hess))
                   for n, t in values.items()}
        save_file(tensors, str(path), metadata={"ess": repr(self.ess), "weight_decay": repr(self.weight_decay)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Posterior:
        path = Path(folder) / POSTERIOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no posterior at {path} (was the run trained with IVON?)")
        tensors, metadata = _io.read_safetensors(path)
        std = {k.removeprefix("std/"): v for k, v in tensors.items() if k.startswith("std/")}
        hess = {k.removeprefix("hess/"): v for k, v in tensors.items() if k.startswith("hess/")}
        if set(std) != set(hess) or not std:
            raise ValueError(f"{path}: std/ and hess/ entries do not match")
        try:
            ess, weight_decay = float(metadata["ess"]), float(metadata["weight_decay"])
        except KeyError as err:
            raise ValueError(f"{path}: metadata field {err.args[0]!r} is missing") from err
        return cls(std=std, hess=hess, ess=ess, weight_decay=weight_decay)

    def check_matches(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Raise if the posterior does not cover exactly these parameters with the same shapes."""
        if set(self.std) != set(params):
            missing, extra = sorted(set(params) - set(self.std)), sorted(set(self.std) - set(params))
            raise ValueError(f"posterior does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, param in params.items():
            if self.std[name].shape != param.shape:
                raise ValueError(f"posterior std of {name} has shape {tuple(self.std[name].shape)}, "
                                 f"parameter has {tuple(param.shape)}")

    @contextlib.contextmanager
    def sampled(
        self, params: Mapping[str, torch.nn.Parameter], tau: float, generator: torch.Generator
    ) -> Iterator[None]:
        """Set each parameter to m + √τ σ ⊙ ε inside the block; restore m exactly on exit, even on error.

        ε is drawn by ``generator`` in sorted-name order (:mod:`varlora.optim.sampling`). τ = 0 leaves the
        weights untouched.
        """
        self.check_matches(params)
        with perturbed_named_params(params, self.std, tau=tau, generator=generator):
            yield
