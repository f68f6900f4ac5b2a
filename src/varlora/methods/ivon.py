"""``ivon``: variational LoRA with the IVON optimizer (Shen et al. 2024; Cong et al. 2024).

Training learns q(θ) = N(m, diag(σ²)), σ² = 1 / (λ (h + δ)), over the LoRA weights (see
:class:`varlora.IVON`); the final posterior is saved as ``final/posterior.safetensors``. Prediction, one row
per τ in ``eval.taus``: τ = 0 is IVON@mean (one forward at m); τ > 0 averages the probabilities of
``eval.n_samples`` samples θₛ = m + √τ σ ⊙ εₛ (with ``eval.batched_samples``, all in one folded forward:
:mod:`varlora._batched_lora`). The noise of every τ comes from a fresh generator seeded with
``eval.seed`` (common random numbers: the τ curve is smooth, and a re-evaluation reproduces the metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from varlora import distributed
from varlora._batched_lora import supports
from varlora.config import check, option
from varlora.evaluate import batched_sampled_prediction, deterministic_prediction, sampled_prediction
from varlora.methods.base import Method, Prediction, StepResult, register
from varlora.methods.training import backward_batch, linear_scheduler, optimizer_state_bytes, restore, snapshot
from varlora.optim import IVON, OWN_STATE_KEY, validate_ivon_hyperparameters
from varlora.optim.sampling import stacked_named_samples
from varlora.posterior import POSTERIOR_FILE, Posterior

__all__ = ["IVONArgs", "IVONMethod", "tau_label"]

_STATS = ("clip_fraction", "hess_mean", "sigma_mean", "grad_norm")


@dataclass
class IVONArgs:
    """IVON (Shen et al. 2024): posterior N(m, 1/(ess (h + weight_decay))); see varlora.IVON for the update.

    The valid ranges are the optimizer's own (:func:`varlora.optim.validate_ivon_hyperparameters`). The
    defaults differ from the reference implementation's (:data:`varlora.optim.IVON_DEFAULTS`) on purpose: they
    are the values tuned for SmolLM2-135M / 100 steps (``varlora experiment tune-cpu``); the paper's for
    Llama-2-7B / 10,000 steps are in the ``paper`` preset.
    """

    lr: float = option("peak learning rate alpha", default=0.03)
    ess: float = option("effective sample size lambda (sets the posterior scale)", default=1e5)
    hess_init: float = option("initial Hessian estimate h0; initial std is 1/sqrt(ess*h0)", default=0.1)
    beta1: float = option("momentum decay", default=0.9)
    beta2: float = option("Hessian decay", default=0.99)
    weight_decay: float = option("prior precision delta", default=0.0)
    clip_radius: float = option("element-wise clip of the preconditioned update (rho)", default=1e-2)
    mc_samples: int = option("posterior samples per training step", default=1)
    rescale_lr: bool = option("multiply lr by (h0 + delta) as the reference does", default=False)

    def __post_init__(self) -> None:
        for name in ("lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "clip_radius", "mc_samples",
                     "rescale_lr"):
            value = getattr(self, name)
            try:
                validate_ivon_hyperparameters(**{name: value})
            except ValueError as err:
                requirement = str(err).split("(", 1)[-1]
                check(False, f"ivon.{name}", value, requirement[:-1] if requirement.endswith(")") else requirement)


def tau_label(tau: float) -> str:
    """Row label of IVON at variance scale τ: ``ivon@mean`` (0), ``ivon`` (1) or ``ivon[tau=0.5]``."""
    if tau == 0.0:
        return "ivon@mean"
    return "ivon" if tau == 1.0 else f"ivon[tau={tau:g}]"


@register
class IVONMethod(Method):
    """LoRA trained with IVON; predicts at the posterior mean and with posterior samples for each τ."""

    name = "ivon"
    label = "ivon@mean"
    color = "C0"
    args_class = IVONArgs
    trains = True
    supports_distributed = True
    uses_tau = True

    posterior: Posterior | None = None

    def setup(self) -> None:
        v = self.args
        # each rank its own noise: under torch.distributed the ranks are IVON's MC samples (sync=True)
        generator = torch.Generator().manual_seed(self.config.train.seed + 1_000_003 * distributed.rank())
        self.optimizer = IVON(list(self.session.params.values()), lr=v.lr, ess=v.ess, hess_init=v.hess_init,
                              beta1=v.beta1, beta2=v.beta2, weight_decay=v.weight_decay, mc_samples=v.mc_samples,
                              clip_radius=v.clip_radius, rescale_lr=v.rescale_lr, generator=generator,
                              sync=distributed.active())
        self.scheduler = linear_scheduler(self.session, self.optimizer)

    def train_step(self, step: int) -> StepResult:
        """Each of the ``mc_samples`` samples θₛ runs the whole batch inside ``sampled_params`` (the optimizer
        clips the sample's gradient norm before it consumes it), then one ``step``."""
        examples = self.session.batch(step)
        lr = self.optimizer.param_groups[0]["lr"]
        total = 0.0
        for _ in range(self.optimizer.mc_samples):
            with self.optimizer.sampled_params(train=True, max_grad_norm=self.config.train.max_grad_norm):
                total += backward_batch(self.session, examples)
        self.optimizer.step()
        self.scheduler.step()
        stats = self.optimizer.last_step_stats
        row = {"lr": lr} | {k: float(stats[k]) for k in _STATS if stats.get(k) is not None}
        return StepResult(distributed.mean_over_ranks(total / self.optimizer.mc_samples), row)

    def state_dict(self) -> dict:
        return {"params": snapshot(self.session.params), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        restore(self.session.params, state["params"])
        self._optimizer_state = state["optimizer"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def rank_state(self) -> dict[str, Any] | None:
        return {OWN_STATE_KEY: self.optimizer.state_dict().get(OWN_STATE_KEY)}

    def load_rank_state(self, state: dict[str, Any] | None) -> None:
        if state is not None and state.get(OWN_STATE_KEY) is not None:  # this rank's noise generators
            self.optimizer.load_state_dict({**self._optimizer_state, OWN_STATE_KEY: state[OWN_STATE_KEY]})

    def fit_posthoc(self, log) -> dict[str, Any]:
        """Read the posterior off the trained optimizer."""
        self.posterior = Posterior.from_optimizer(self.session.params, self.optimizer).to(self._device())
        return {"sigma_mean": float(torch.cat([s.flatten() for s in self.posterior.std.values()]).mean())}

    def save(self, folder: Path) -> None:
        super().save(folder)
        self.posterior.save(folder)

    def load(self, folder: Path) -> None:
        super().load(folder)
        self.posterior = Posterior.load(folder).to(self._device())
        self.posterior.check_matches(self.session.params)

    def _device(self) -> torch.device:
        return next(iter(self.session.params.values())).device

    @classmethod
    def saved_std(cls, final: Path) -> dict[str, torch.Tensor] | None:
        """σ of the saved posterior, ``1 / sqrt(ess · (h + δ))`` per weight (:class:`~varlora.posterior.Posterior`)."""
        return Posterior.load(final).std if (Path(final) / POSTERIOR_FILE).is_file() else None

    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        rows = []
        for tau in self.config.eval.taus:
            if tau == 0.0:
                rows.append(deterministic_prediction(self, tau_label(0.0), examples, scorer, tau=0.0))
                continue
            generator = torch.Generator(self._device()).manual_seed(self.config.eval.seed)  # where the weights are
            if self.config.eval.batched_samples and supports(self.session.model, set(self.session.params)):
                samples = stacked_named_samples(self.session.params, self.posterior.std, tau=tau,
                                                generator=generator, n_samples=self.config.eval.n_samples)
                rows.append(batched_sampled_prediction(self, tau_label(tau), examples, scorer, samples, tau=tau))
                continue

            def sample(_: int, tau: float = tau, generator: torch.Generator = generator):
                return self.posterior.sampled(self.session.params, tau, generator)

            rows.append(sampled_prediction(self, tau_label(tau), examples, scorer, sample,
                                           self.config.eval.n_samples, tau=tau))
        return rows

    def extra_bytes(self) -> dict[str, int]:
        optimizer = getattr(self, "optimizer", None)
        posterior = 0 if self.posterior is None else sum(t.numel() * t.element_size()
                                                         for t in self.posterior.std.values())
        return {"extra_param_bytes": posterior,
                "optimizer_state_bytes": 0 if optimizer is None else optimizer_state_bytes(optimizer)}
