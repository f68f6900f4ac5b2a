"""``laplace``: Laplace-LoRA (Yang et al., ICLR 2024), a post-hoc Kronecker-factored Laplace posterior on the
MAP adapter's LoRA weights, with the linearised (GLM) predictive.

Training is the ``adamw`` method's. After it, :meth:`Laplace.fit_posthoc` sums the K-FAC factors of the exact
GGN of the softmax likelihood over the K choice scores on the run's training examples (one backward pass per
class; every token position a LoRA layer sees counts as a sample of its weight-shared Linear, the "expand"
K-FAC), then sets the scalar prior precision δ to the maximiser of the Laplace marginal likelihood. The
predictive is f ~ N(f*, J Σ Jᵀ) over the K choice logits, by probit or Monte Carlo. The math lives in
:mod:`varlora.methods._kfac`; see its docstring for the equations. The factors are summed and decomposed in
float32 (float64 for a float64 model) on the model's device when they fit there, and the posterior stays on it.

``subset_of_weights``: ``all`` (every LoRA A and B, the paper's setting) or ``last_layer`` (the LoRA layers of
``lm_head`` if it is adapted, else those of the last transformer block; the paper's last-layer variant is the
``lm_head`` LoRA, which the harness adapts only when asked to).

Differences from the reference (laplace-torch 0.3 as Laplace-LoRA calls it), all documented here:
δ is maximised exactly (grid + golden section on ln δ; the objective is unimodal) instead of 100 Adam steps;
the predictive draws ``link_samples`` = 100,000 logit samples as the reference does (seeded by ``eval.seed``),
or uses laplace-torch's probit. Its row averages all draws, and keeps the first ``eval.n_samples`` as its
per-sample probabilities (the mutual information is estimated from those), so that ``probs`` is not their mean:
the one method whose samples cost nothing, and ten draws of logits this wide would make the average noisy.

Prior precision. ``prior_optimization: marglik`` (the default; the reference's ``testing_set='val'`` mode) or
``validation``: the point of a 50-point grid δ ∈ [10⁻³, 10⁴] whose predictive has the lowest NLL on
``prior_holdout`` held-out training questions (the reference's default ``testing_set='train_val'`` mode,
laplace-torch's ``optimize_prior_precision(method='CV', link_approx='mc')`` on 20% of the training split). With few
training questions the marginal likelihood leaves almost every direction at the prior (64 ARC-Easy questions:
γ ≈ 450 of 460,800 weights, δ ≈ 2), and under cloze scoring the prior's predictive variance ‖J_k‖²/δ is largest
for the shortest choices, so the MC predictive reorders the choices (results/laplace-investigation/).

Caveat (measured on the tiny test model): the multi-class probit softmax(κ ⊙ f*) is not invariant to adding a
constant to all K logits, while the softmax is. Cloze scores are mean log-likelihoods (all about −5 on a small
model), so there a choice with a larger variance gets a *less* negative κ f and gains probability; the MC
predictive has no such bias. laplace-torch's probit behaves identically (tests/test_kfac.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from varlora import _io
from varlora.config import check, option
from varlora.evaluate import eval_mode, labels_of
from varlora.methods._kfac import (
    KronLaplace,
    fit_kron_laplace,
    glm_moments,
    glm_probs,
    lora_layers,
    validation_prior_precision,
)
from varlora.methods.adamw import AdamW
from varlora.methods.base import Prediction, register

__all__ = ["Laplace", "LaplaceArgs", "LAPLACE_FILE"]

LAPLACE_FILE = "laplace.safetensors"
PRIOR_GRID = torch.logspace(-3, 4, 50, dtype=torch.float64)  # δ of prior_optimization='validation' (the reference's)
_FORMAT = "varlora-kron-laplace-1"


@dataclass
class LaplaceArgs:
    """Laplace-LoRA (Yang et al. 2024): post-hoc K-FAC Laplace on the MAP LoRA weights, GLM predictive."""

    subset_of_weights: str = option("'all' LoRA A and B weights, or 'last_layer' (lm_head's LoRA if adapted, "
                                     "else the last transformer block's)", default="all")
    hessian_structure: str = option("curvature structure ('kron': K-FAC of the exact GGN)", default="kron")
    prior_precision: float = option("prior precision δ (the initial value when prior_optimization is "
                                    "'marglik', the value used when 'none')", default=1.0)
    prior_optimization: str = option("'marglik': δ maximising the Laplace marginal likelihood; 'validation': δ "
                                     "of the grid 10^-3 .. 10^4 (50 points, the reference's CV) with the lowest "
                                     "NLL of the predictive on prior_holdout held-out training questions; 'none': "
                                     "keep prior_precision", default="marglik")
    prior_holdout: int = option("held-out training questions (never trained on nor evaluated; the calibration "
                                "examples where data.calibration is set) of prior_optimization='validation'",
                                default=100)
    link_approx: str = option("predictive over the GLM logits: 'mc' (link_samples draws; invariant to a "
                              "common offset of the K logits, as the softmax is) or 'probit' (laplace-torch's "
                              "multi-class probit, which is not: cloze scores sit far below 0)", default="mc")
    link_samples: int = option("logit draws of the 'mc' predictive (the reference draws 100,000; they cost no "
                               "forward pass); the first eval.n_samples are kept as the per-sample probabilities "
                               "(mutual information, saved predictions)", default=100_000)
    fit_limit: int = option("training examples the curvature is summed over (0 = all; a seeded subset)",
                            default=0)
    fit_batch_size: int = option("examples per curvature batch (one forward and K backward passes each)",
                                 default=4)

    def __post_init__(self) -> None:
        check(self.subset_of_weights in ("all", "last_layer"), "laplace.subset_of_weights",
              self.subset_of_weights, "must be 'all' or 'last_layer'")
        check(self.hessian_structure == "kron", "laplace.hessian_structure", self.hessian_structure,
              "must be 'kron'")
        check(self.prior_precision > 0, "laplace.prior_precision", self.prior_precision, "must be > 0")
        check(self.prior_optimization in ("marglik", "validation", "none"), "laplace.prior_optimization",
              self.prior_optimization, "must be 'marglik', 'validation' or 'none'")
        check(self.prior_holdout >= 1, "laplace.prior_holdout", self.prior_holdout, "must be >= 1")
        check(self.link_approx in ("probit", "mc"), "laplace.link_approx", self.link_approx,
              "must be 'probit' or 'mc'")
        check(self.link_samples >= 1, "laplace.link_samples", self.link_samples, "must be >= 1")
        check(self.fit_limit >= 0, "laplace.fit_limit", self.fit_limit, "must be >= 0 (0 = all)")
        check(self.fit_batch_size >= 1, "laplace.fit_batch_size", self.fit_batch_size, "must be >= 1")


@register
class Laplace(AdamW):
    """The MAP adapter with a Kronecker-factored Laplace posterior over its LoRA weights."""

    name = "laplace"
    label = "laplace"
    color = "C6"
    args_class = LaplaceArgs
    sections = ("adamw",)
    posthoc_of = "adamw"
    supports_distributed = False
    role = ""

    posterior: KronLaplace | None = None

    def _layers(self) -> dict[str, torch.nn.Linear]:
        return lora_layers(self.session.model, self.args.subset_of_weights)

    def _model_fn(self, scorer: Any):
        model = self.session.model
        return lambda batch: scorer.choice_logits(model, batch)

    def fit_examples(self) -> list:
        """The training examples the curvature is summed over: all, or ``fit_limit`` of them (seeded)."""
        examples = list(self.session.train_examples)
        limit = self.args.fit_limit
        if limit and limit < len(examples):
            pick = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.config.train.seed))
            examples = [examples[i] for i in sorted(pick[:limit].tolist())]
        return examples

    def fit_posthoc(self, log) -> dict[str, Any]:
        args, scorer = self.args, self.session.scorer
        examples = self.fit_examples()
        if not examples:
            raise ValueError("laplace: no training examples to fit the curvature on")
        layers = self._layers()
        batches = (scorer.collate(examples[i : i + args.fit_batch_size])
                   for i in range(0, len(examples), args.fit_batch_size))
        start = time.perf_counter()
        with eval_mode(self.session.model):
            la = fit_kron_laplace(self._model_fn(scorer), layers, batches, args.prior_precision, optimize=False)
        curvature_seconds = time.perf_counter() - start
        if args.prior_optimization == "marglik":
            la.optimize_prior_precision()
        elif args.prior_optimization == "validation":
            held = self.session.heldout_train_examples(args.prior_holdout, "laplace.prior_holdout")
            batches = (scorer.collate(held[i : i + self.config.eval.batch_size])
                       for i in range(0, len(held), self.config.eval.batch_size))
            la = la.to(self._device())  # the predictive's Jacobians meet the posterior there
            with eval_mode(self.session.model):
                _, nll = validation_prior_precision(
                    self._model_fn(scorer), layers, la, batches, PRIOR_GRID.tolist(),
                    args.link_approx, min(args.link_samples, 10_000), self.config.eval.seed)
            log(f"laplace: validation NLL over δ ∈ [{PRIOR_GRID[0]:.3g}, {PRIOR_GRID[-1]:.3g}] on {len(held)} "
                f"held-out questions: {float(nll.min()):.4f} at δ = {la.prior_precision:.4g} "
                f"(the largest δ gives {float(nll[-1]):.4f})")
        fit_seconds = time.perf_counter() - start
        self.posterior = la.to(self._device())  # a no-op unless the factors were too large for the device
        out = {
            "prior_precision": la.prior_precision,
            "log_marglik": float(la.log_marglik()),
            "effective_params": la.effective_params(),
            "n_params": la.n_params,
            "fit_examples": la.n_data,
            "subset_of_weights": args.subset_of_weights,
            "posterior_bytes": la.nbytes(),
            "curvature_seconds": curvature_seconds,
            "fit_seconds": fit_seconds,
        }
        log(f"laplace: K-FAC over {len(layers)} LoRA layers ({la.n_params} weights, {args.subset_of_weights}) on "
            f"{la.n_data} training examples in {curvature_seconds:.1f} s; prior precision {la.prior_precision:.4g} "
            f"(log marginal likelihood {out['log_marglik']:.2f}, effective parameters "
            f"{out['effective_params']:.1f}); fit {fit_seconds:.1f} s")
        return out

    def save(self, folder: Path) -> None:
        super().save(folder)
        if self.posterior is None:
            raise RuntimeError("laplace: save() before fit_posthoc(): no posterior to save")
        meta = self.posterior.metadata() | {"format": _FORMAT, "subset_of_weights": self.args.subset_of_weights}
        with _io.atomic_path(Path(folder) / LAPLACE_FILE) as tmp:
            save_file(self.posterior.state_tensors(), tmp, metadata=meta)

    def load(self, folder: Path) -> None:
        super().load(folder)
        path = Path(folder) / LAPLACE_FILE
        try:
            tensors, meta = _io.read_safetensors(path)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT!r}")
            posterior = KronLaplace.from_state(tensors, meta)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: cannot read the Laplace posterior ({err})") from err
        missing = set(posterior.eig) - set(self._layers())
        if meta.get("subset_of_weights") != self.args.subset_of_weights or missing:
            raise ValueError(f"{path}: posterior of subset {meta.get('subset_of_weights')!r} over layers that do "
                             f"not match this run's laplace.subset_of_weights={self.args.subset_of_weights!r}")
        self.posterior = posterior.to(self._device())  # uploaded once, not per evaluation batch

    def _device(self) -> torch.device:
        return next(iter(self._layers().values())).weight.device

    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        if self.posterior is None:
            raise RuntimeError("laplace: predict() before fit_posthoc() or load()")
        la, layers, cfg = self.posterior, self._layers(), self.config.eval
        fn = self._model_fn(scorer)
        order = sorted(range(len(examples)), key=lambda i: _text_length(examples[i]))
        means, variances = [], []
        with eval_mode(self.session.model):
            for start in range(0, len(order), cfg.batch_size):
                batch = scorer.collate([examples[i] for i in order[start : start + cfg.batch_size]])
                mean, var = glm_moments(fn, layers, la, batch)
                means.append(mean)
                variances.append(var)
        rows = torch.tensor(order)
        mean = torch.empty(len(examples), means[0].shape[1], dtype=torch.float64)
        var = torch.empty(len(examples), *variances[0].shape[1:], dtype=torch.float64)
        mean[rows], var[rows] = torch.cat(means), torch.cat(variances)
        link = self.args.link_approx
        n = max(self.args.link_samples, cfg.n_samples) if link == "mc" else 1
        probs, sample_probs = glm_probs(mean, var, link, n, torch.Generator().manual_seed(cfg.seed),
                                        keep=cfg.n_samples)
        K = mean.shape[1]
        return [Prediction(label=self.label, method=self.name, probs=probs, labels=labels_of(examples),
                           sample_probs=sample_probs, logits=mean, n_samples=n,
                           forward_passes=1 + K)]  # one forward and K backward passes (the Jacobian's rows)

    def extra_bytes(self) -> dict[str, int]:
        out = super().extra_bytes()
        out["extra_param_bytes"] = self.posterior.nbytes() if self.posterior is not None else 0
        return out


def _text_length(example: Any) -> int:
    return len(example.question) + len(example.passage or "") + max(len(c) for c in example.choices)
