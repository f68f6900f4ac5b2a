"""``ivon``: variational LoRA with the IVON optimizer (Shen et al. 2024; Cong et al. 2024).

Training learns q(θ) = N(m, diag(σ²)), σ² = 1 / (λ (h + δ)), over the LoRA weights (see
:class:`varlora.IVON`); the final posterior is saved as ``final/posterior.safetensors``. Prediction, one row
per τ in ``eval.taus``: τ = 0 is IVON@mean (one forward at m); τ > 0 averages the probabilities of
``eval.n_samples`` samples θₛ = m + √τ σ ⊙ εₛ (with ``eval.batched_samples``, ``eval.samples_per_forward`` of
them, by default all, in each folded forward: :mod:`varlora._batched_lora`). The noise of every τ comes from a
fresh generator on the weights' device seeded with ``eval.seed`` (common random numbers: the τ curve is smooth,
and a re-evaluation reproduces the metrics). With calibration questions (``data.calibration``) the post-hoc fit
chooses τ* in ``ivon.tau_grid`` by their NLL, and a further row ``ivon[tau*]`` predicts at it.

The posterior's scale comes from ``ivon.ess`` and ``ivon.hess_init``, by default ``auto``:
:func:`posterior_scale_rule` derives both from the number of training questions and the base model's width.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from varlora import _io, distributed
from varlora._batched_lora import supports
from varlora.config import ConfigError, check, option
from varlora.evaluate import batched_sampled_prediction, deterministic_prediction, sampled_prediction
from varlora.methods.base import Method, Prediction, StepResult, register
from varlora.methods.training import backward_batch, linear_scheduler, optimizer_state_bytes, restore, snapshot
from varlora.optim import IVON, OWN_STATE_KEY, validate_ivon_hyperparameters
from varlora.optim._dtensor import full
from varlora.optim.sampling import stacked_named_samples
from varlora.posterior import POSTERIOR_FILE, Posterior, scale_over_means
from varlora.sharding import is_sharded

__all__ = ["IVONArgs", "IVONMethod", "TAU_STAR_LABEL", "posterior_scale_rule", "tau_label"]

_STATS = ("clip_fraction", "hess_mean", "sigma_mean", "grad_norm")
#: Defaults of the posterior-scale rule (:func:`posterior_scale_rule`), fitted by ``varlora experiment
#: tune-rule-cpu`` (ARC-Easy held-out training questions, 256 trained on for 5 epochs): ess 5e4 and h0 0.02 at
#: N = 256 on a width of 576. sigma_scale is the tune-ivon-cpu winner's (ess 1e5, h0 0.01 on 64 questions).
AUTO_ESS_PER_EXAMPLE = 5e4 / 256
AUTO_SIGMA_SCALE = (576 / (1e5 * 0.01)) ** 0.5
#: The row at the τ chosen on the calibration questions, and the file of ``final/`` that keeps that τ.
TAU_STAR_LABEL = "ivon[tau*]"
TAU_STAR_FILE = "tau_star.json"


@dataclass
class IVONArgs:
    """IVON (Shen et al. 2024): posterior N(m, 1/(ess (h + weight_decay))); see varlora.IVON for the update.

    The valid ranges are the optimizer's own (:func:`varlora.optim.validate_ivon_hyperparameters`). The
    defaults differ from the reference implementation's (:data:`varlora.optim.IVON_DEFAULTS`) on purpose: they
    are the values tuned for SmolLM2-135M / 100 steps (``varlora experiment tune-cpu``); the paper's for
    Llama-2-7B / 10,000 steps are in the ``paper`` preset.
    """

    lr: float = option("peak learning rate alpha", default=0.03)
    ess: float | Literal["auto"] = option(
        "effective sample size lambda (sets the posterior scale); auto: ess_per_example x training questions",
        default="auto")
    hess_init: float | Literal["auto"] = option(
        "initial Hessian estimate h0 (initial std 1/sqrt(ess*h0)); auto: the h0 that makes the initial std "
        "sigma_scale / sqrt(model width), sigma_scale times LoRA A's initialisation bound", default="auto")
    ess_per_example: float = option("ess = ess_per_example x training questions where ess is auto",
                                    default=AUTO_ESS_PER_EXAMPLE)
    sigma_scale: float = option("initial std / LoRA A's initialisation bound 1/sqrt(width) where hess_init is auto",
                                default=AUTO_SIGMA_SCALE)
    beta1: float = option("momentum decay", default=0.9)
    beta2: float = option("Hessian decay", default=0.99)
    weight_decay: float = option("prior precision delta", default=0.0)
    clip_radius: float = option("element-wise clip of the preconditioned update (rho)", default=1e-2)
    mc_samples: int = option("posterior samples per training step", default=1)
    tau_grid: list[float] = option("test-time variance scales compared on the calibration questions "
                                   "(data.calibration); the best NLL is the row ivon[tau*]",
                                   default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    rescale_lr: bool = option("multiply lr by (h0 + delta) as the reference does", default=False)

    def __post_init__(self) -> None:
        check(self.ess_per_example > 0, "ivon.ess_per_example", self.ess_per_example, "must be > 0")
        check(self.sigma_scale > 0, "ivon.sigma_scale", self.sigma_scale, "must be > 0")
        check(len(self.tau_grid) > 0 and all(0.0 <= t <= 1.0 for t in self.tau_grid), "ivon.tau_grid", self.tau_grid,
              "must be a non-empty list of values in [0, 1]")
        for name in ("lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "clip_radius", "mc_samples",
                     "rescale_lr"):
            value = getattr(self, name)
            if value == "auto":
                continue
            try:
                validate_ivon_hyperparameters(**{name: value})
            except ValueError as err:
                requirement = str(err).split("(", 1)[-1]
                check(False, f"ivon.{name}", value, requirement[:-1] if requirement.endswith(")") else requirement)


def posterior_scale_rule(args: IVONArgs, n_train: int, width: int) -> tuple[float, float]:
    r"""(ess, hess_init) of a run: each given one as it is, an ``auto`` one by the rule

    .. math::
        \lambda = \gamma N, \qquad \sigma_0 = \frac{1}{\sqrt{\lambda (h_0 + \delta)}} = \frac{\kappa}{\sqrt d}
        \quad\Longrightarrow\quad h_0 = \frac{d}{\lambda \kappa^2} - \delta

    with :math:`N` the training questions, :math:`d` the base model's width (peft initialises LoRA A uniformly in
    :math:`\pm 1/\sqrt d`, so :math:`\kappa = \sigma_0 \sqrt d` is the initial std relative to A's scale),
    :math:`\gamma` = ``ess_per_example`` and :math:`\kappa` = ``sigma_scale``. The LoRA rank does not enter:
    A's initialisation does not depend on it. :math:`\kappa = 0.759` is the ``tune-ivon-cpu`` winner's (ess 1e5,
    h0 0.01 at N = 64, d = 576). :math:`\gamma = 195.3` is the ``tune-rule-cpu`` fit at N = 256: the held-out NLL
    of the sampled predictive is flat for :math:`\gamma` from 98 to 391 and rises on both sides (1.24 at 24,
    1.09 at 1562.5), and :math:`\gamma = 195.3` lies midway in :math:`\log\gamma`. With it, ess at N = 64 is
    1.25e4, inside that N's flat range (``tune-ivon-cpu``: ess 1e4 with the same :math:`\sigma_0` within 0.01
    of ess 1e5). The paper's Llama-2-7B setting (ess 1e6, h0 1e-3, d = 4096) has :math:`\kappa = 2.0` and
    :math:`\gamma` = 200-900.
    """
    ess = args.ess_per_example * max(n_train, 1) if args.ess == "auto" else float(args.ess)
    if args.hess_init != "auto":
        return ess, float(args.hess_init)
    hess_init = width / (ess * args.sigma_scale**2) - args.weight_decay
    if hess_init <= 0:
        raise ConfigError(f"invalid ivon.hess_init=auto: the rule gives h0 = {hess_init:.3g} <= 0 (weight_decay="
                          f"{args.weight_decay} is above d / (ess sigma_scale^2)); give ivon.hess_init")
    return ess, hess_init


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
    tau_star: float | None = None  # τ chosen on the calibration questions, if the run has them

    def setup(self) -> None:
        v = self.args
        width = self.session.model.get_input_embeddings().embedding_dim
        self.ess, self.hess_init = posterior_scale_rule(v, len(self.session.train_examples), width)
        # data parallel: each rank its own noise, the ranks are IVON's MC samples (sync=True); sharded (FSDP2):
        # one sample shared by all ranks, each perturbing its shard with its slice of the same draw (sync=False)
        sharded = is_sharded(self.session.model)
        generator = torch.Generator().manual_seed(self.config.train.seed
                                                  + 1_000_003 * (0 if sharded else distributed.rank()))
        self.optimizer = IVON(list(self.session.params.values()), lr=v.lr, ess=self.ess, hess_init=self.hess_init,
                              beta1=v.beta1, beta2=v.beta2, weight_decay=v.weight_decay, mc_samples=v.mc_samples,
                              clip_radius=v.clip_radius, rescale_lr=v.rescale_lr, generator=generator,
                              sync=distributed.active() and not sharded)
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
        """Read the posterior off the trained optimizer; with calibration questions (``data.calibration``), choose
        τ* in ``ivon.tau_grid`` by the NLL of the predictive there (the Bayesian counterpart of a temperature)."""
        self.posterior = Posterior.from_optimizer(self.session.params, self.optimizer).to(self._device())
        scale = scale_over_means(self.posterior.std, {n: full(p.detach()) for n, p in self.session.params.items()})
        fit = {"ess": self.ess, "hess_init": self.hess_init, "sigma_mean": scale["sigma"],
               "sigma_over_abs_mean_a": None if math.isnan(scale["ratio_a"]) else scale["ratio_a"]}
        log(f"ivon posterior: ess {self.ess:.4g}, h0 {self.hess_init:.4g}, mean sigma {fit['sigma_mean']:.4g}, "
            f"sigma / |m| on LoRA A {fit['sigma_over_abs_mean_a']}")
        examples = self.session.calibration_examples
        if examples:
            nll = {tau: self._row(tau, tau_label(tau), examples, self.session.scorer) for tau in self.args.tau_grid}
            nll = {tau: -float(row.probs.gather(1, row.labels[:, None]).log().mean()) for tau, row in nll.items()}
            self.tau_star = min(nll, key=lambda tau: (nll[tau], tau))
            log(f"ivon: tau* = {self.tau_star:g} on {len(examples)} calibration questions (NLL by tau: "
                + ", ".join(f"{t:g}: {v:.4f}" for t, v in nll.items()) + ")")
            fit |= {"tau_star": self.tau_star, "calibration_nll_by_tau": {str(t): v for t, v in nll.items()}}
        return fit

    def save(self, folder: Path) -> None:
        super().save(folder)
        self.posterior.save(folder)
        if self.tau_star is not None:
            _io.write_json(Path(folder) / TAU_STAR_FILE, {"tau_star": self.tau_star})

    def load(self, folder: Path) -> None:
        super().load(folder)
        self.posterior = Posterior.load(folder).to(self._device())
        self.posterior.check_matches(self.session.params)
        path = Path(folder) / TAU_STAR_FILE
        if path.is_file():
            try:
                self.tau_star = float(json.loads(path.read_text())["tau_star"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: cannot read tau* ({err})") from err

    def _device(self) -> torch.device:
        return next(iter(self.session.params.values())).device

    @classmethod
    def saved_std(cls, final: Path) -> dict[str, torch.Tensor] | None:
        """σ of the saved posterior, ``1 / sqrt(ess · (h + δ))`` per weight (:class:`~varlora.posterior.Posterior`)."""
        return Posterior.load(final).std if (Path(final) / POSTERIOR_FILE).is_file() else None

    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        """One row per τ of ``eval.taus``, and ``ivon[tau*]`` at the τ chosen on the calibration questions."""
        rows = [self._row(tau, tau_label(tau), examples, scorer) for tau in self.config.eval.taus]
        if self.tau_star is not None:
            same = next((r for r, tau in zip(rows, self.config.eval.taus, strict=True) if tau == self.tau_star), None)
            rows.append(replace(same, label=TAU_STAR_LABEL, probs=same.probs.clone(),
                                sample_probs=None if same.sample_probs is None else same.sample_probs.clone(),
                                logits=None if same.logits is None else same.logits.clone())
                        if same is not None else
                        self._row(self.tau_star, TAU_STAR_LABEL, examples, scorer))
        return rows

    def _row(self, tau: float, label: str, examples: Sequence, scorer: Any) -> Prediction:
        """The predictive at variance scale τ: one forward at the mean (τ = 0), else ``eval.n_samples`` samples
        drawn with a generator seeded with ``eval.seed`` on the weights' device."""
        if tau == 0.0:
            return deterministic_prediction(self, label, examples, scorer, tau=0.0)
        generator = torch.Generator(self._device()).manual_seed(self.config.eval.seed)
        if (self.config.eval.batched_samples and not is_sharded(self.session.model)
                and supports(self.session.model, set(self.session.params))):  # folded samples need whole weights
            samples = stacked_named_samples(self.session.params, self.posterior.std, tau=tau,
                                            generator=generator, n_samples=self.config.eval.n_samples)
            return batched_sampled_prediction(self, label, examples, scorer, samples,
                                              self.config.eval.samples_per_forward or None, tau=tau)

        def sample(_: int):
            return self.posterior.sampled(self.session.params, tau, generator)

        return sampled_prediction(self, label, examples, scorer, sample, self.config.eval.n_samples, tau=tau)

    def extra_bytes(self) -> dict[str, int]:
        optimizer = getattr(self, "optimizer", None)
        posterior = 0 if self.posterior is None else sum(t.numel() * t.element_size()
                                                         for t in self.posterior.std.values())
        return {"extra_param_bytes": posterior,
                "optimizer_state_bytes": 0 if optimizer is None else optimizer_state_bytes(optimizer)}
