"""``tfb``: Training-Free Bayesianization of a MAP LoRA adapter (Shi et al., "Training-Free Bayesianization for
Low-Rank Adapters of Large Language Models").

Training is AdamW's (the same adapter as the ``adamw`` method; an experiment may reuse that run). After it,
:meth:`TFB.fit_posthoc`:

1. rewrites every LoRA layer with the SVD of B (:func:`~varlora.methods._tfb_math.svd_reparameterise`):
   B′ = U diag(d), A′ = Vᵀ A, so B′A′ = BA, and gives A′ the std σ_q / dᵢ on row i, i.e. noise σ_q U Z on BA
   (before peft's scale alpha / r);
2. finds σ_q by bisection on [``sigma_lo``, ``sigma_hi``] (:func:`~varlora.methods._tfb_math.search_sigma`):
   the largest σ_q whose anchor-set predictive (``search_samples`` flipout samples, probabilities averaged)
   stays within a tolerance of the MAP's (σ = 0) — criterion ``nll``: |NLL(σ) − NLL(0)| / NLL(0) ≤
   ``nll_tolerance``; ``flip``: the fraction of anchor examples whose predicted class changes ≤
   ``flip_tolerance``. The anchor set is ``n_anchor`` held-out *training* examples
   (:meth:`Session.heldout_train_examples`), never evaluation data; the NLL uses their true labels (as BAG
   does) or the MAP's predictions (``anchor_labels: pseudo``, as bayesian-peft does). Every σ of the search
   draws the same noise (a generator reseeded with ``train.seed``), so the change is a smooth function of σ.

The reference code (bayesian-peft ``tfblora.py``) divides the relative NLL change by the anchor-set size and
returns the last σ that exceeded the tolerance; here the change is the plain relative change and the answer
the largest σ within it.

Prediction: one row, ``tfb``, averaging the probabilities of ``eval.n_samples`` flipout samples (noise from a
generator seeded with ``eval.seed``). Files: the rotated adapter (peft format), ``final/tfb.safetensors``
(σ of every A′ by LoRA module name) and ``final/tfb.json`` (σ_q and the search).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from varlora import _io
from varlora.config import check, option
from varlora.evaluate import eval_mode, labels_of, predict_logits, sampled_prediction
from varlora.methods._flipout import FixedFlipout, lora_a_modules
from varlora.methods._tfb_math import row_std, search_sigma, svd_reparameterise
from varlora.methods.adamw import AdamW
from varlora.methods.base import Prediction, register

__all__ = ["TFBArgs", "TFB", "TFB_FILE", "TFB_JSON", "rotate_adapter"]

TFB_FILE = "tfb.safetensors"
TFB_JSON = "tfb.json"


@dataclass
class TFBArgs:
    """TFB (Shi et al.): σ_q of isotropic noise on the SVD-rotated MAP adapter, the largest that keeps the
    anchor-set predictive within a tolerance. The reference's values: σ in [0.001, 0.015], 5 halvings,
    10 samples, NLL tolerance 0.003 (flip tolerance 0.0025–0.01), 500 anchors."""

    n_anchor: int = option("held-out training examples in the anchor set", default=500)
    criterion: Literal["nll", "flip"] = option("anchor-set change: 'nll' (relative NLL change) or 'flip' "
                                               "(fraction of changed predictions)", default="nll")
    nll_tolerance: float = option("largest relative NLL change allowed (criterion nll)", default=0.003)
    flip_tolerance: float = option("largest fraction of flipped predictions allowed (criterion flip)",
                                   default=0.01)
    anchor_labels: Literal["true", "pseudo"] = option("labels of the anchor NLL: the true ones, or the MAP's "
                                                      "predictions", default="true")
    sigma_lo: float = option("lower end of the search interval of sigma_q", default=0.001)
    sigma_hi: float = option("upper end of the search interval of sigma_q (tried first)", default=0.015)
    search_steps: int = option("halvings of the search interval", default=5)
    search_samples: int = option("flipout samples per anchor example at each sigma of the search", default=10)

    def __post_init__(self) -> None:
        check(self.n_anchor >= 1, "tfb.n_anchor", self.n_anchor, "must be >= 1")
        check(self.criterion in ("nll", "flip"), "tfb.criterion", self.criterion, "must be 'nll' or 'flip'")
        check(self.nll_tolerance >= 0, "tfb.nll_tolerance", self.nll_tolerance, "must be >= 0")
        check(0 <= self.flip_tolerance <= 1, "tfb.flip_tolerance", self.flip_tolerance, "must be in [0, 1]")
        check(self.anchor_labels in ("true", "pseudo"), "tfb.anchor_labels", self.anchor_labels,
              "must be 'true' or 'pseudo'")
        check(0 <= self.sigma_lo < self.sigma_hi, "tfb.sigma_lo", self.sigma_lo,
              f"must be in [0, sigma_hi={self.sigma_hi})")
        check(self.search_steps >= 0, "tfb.search_steps", self.search_steps, "must be >= 0")
        check(self.search_samples >= 1, "tfb.search_samples", self.search_samples, "must be >= 1")


def rotate_adapter(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Rewrite every peft LoRA linear layer of ``model`` in place as B′ = U diag(d), A′ = Vᵀ A; return d by
    module name."""
    singular = {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, lora_a in lora_a_modules(model, adapter).items():
            lora_b = modules[name].lora_B[adapter]
            a_rot, b_rot, d = svd_reparameterise(lora_a.weight, lora_b.weight)
            lora_a.weight.copy_(a_rot)
            lora_b.weight.copy_(b_rot)
            singular[name] = d
    return singular


@register
class TFB(AdamW):
    """The MAP adapter, SVD-rotated, with flipout noise of std σ_q / dᵢ on A′; σ_q found on an anchor set."""

    name = "tfb"
    label = "tfb"
    color = "C8"
    args_class = TFBArgs
    sections = ("adamw",)
    posthoc_of = "adamw"
    supports_distributed = False
    role = ""

    sigma_q: float = 0.0
    flipout: FixedFlipout | None = None

    def _ensure_flipout(self) -> FixedFlipout:
        if self.flipout is None:
            self.flipout = FixedFlipout(self.session.model)
        return self.flipout

    @property
    def _device(self) -> torch.device:
        return next(iter(self.session.params.values())).device

    def _probs(self, examples: Sequence, samples: int, generator: torch.Generator | None) -> torch.Tensor:
        """Averaged probabilities (N, K) float64 of ``samples`` flipout forwards (one mean forward if None)."""
        model, flip, bs = self.session.model, self._ensure_flipout(), self.config.eval.batch_size
        with eval_mode(model):
            if generator is None:
                with flip.using("mean"):
                    return torch.softmax(predict_logits(model, self.session.scorer, examples, bs), -1)
            with flip.using("sample", generator):
                return torch.stack([torch.softmax(predict_logits(model, self.session.scorer, examples, bs), -1)
                                    for _ in range(samples)]).mean(0)

    def fit_posthoc(self, log) -> dict[str, Any]:
        args = self.args
        anchors = self.session.heldout_train_examples(args.n_anchor, "tfb.n_anchor")
        singular = rotate_adapter(self.session.model)
        flip = self._ensure_flipout()
        n_in = {name: flip.lora_a(name).in_features for name in flip.names}

        def set_sigma(sigma: float) -> None:
            flip.set_std({name: row_std(singular[name], sigma, n_in[name]) for name in flip.names})

        base = self._probs(anchors, 1, None)                                          # (N, K) at σ = 0
        predicted = base.argmax(-1)
        labels = labels_of(anchors) if args.anchor_labels == "true" else predicted
        nll0 = float(-torch.log(base.gather(1, labels[:, None]).clamp_min(1e-300)).mean())

        def change(sigma: float) -> float:
            set_sigma(sigma)
            generator = torch.Generator(device=self._device).manual_seed(self.config.train.seed)
            probs = self._probs(anchors, args.search_samples, generator)
            if args.criterion == "flip":
                return float((probs.argmax(-1) != predicted).double().mean())
            nll = float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-300)).mean())
            return abs(nll - nll0) / nll0

        tolerance = args.nll_tolerance if args.criterion == "nll" else args.flip_tolerance
        result = search_sigma(change, args.sigma_lo, args.sigma_hi, args.search_steps, tolerance)
        self.sigma_q = result.sigma
        set_sigma(self.sigma_q)
        self._fit = {"sigma_q": self.sigma_q, "criterion": args.criterion, "tolerance": tolerance,
                     "anchor_labels": args.anchor_labels, "anchor_nll": nll0,
                     "search": [{"sigma": s, "change": c} for s, c in result.trace]}
        log(f"tfb: sigma_q = {self.sigma_q:.5g} ({args.criterion} change within {tolerance} on {len(anchors)} "
            f"held-out training examples; {len(result.trace)} sigmas tried, anchor NLL at the MAP {nll0:.4f})")
        return {**self._fit, "anchor_split": "train (held out from training)", "anchor_examples": len(anchors),
                "anchor_ids": [ex.id for ex in anchors]}

    def save(self, folder: Path) -> None:
        super().save(folder)
        flip = self._ensure_flipout()
        tensors = {name: flip.std(name).detach().float().cpu().contiguous() for name in flip.names}
        with _io.atomic_path(Path(folder) / TFB_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"sigma_q": repr(self.sigma_q)})
        _io.write_json(Path(folder) / TFB_JSON, getattr(self, "_fit", {"sigma_q": self.sigma_q}))

    def load(self, folder: Path) -> None:
        super().load(folder)
        flip = self._ensure_flipout()
        path, meta = Path(folder) / TFB_FILE, Path(folder) / TFB_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run has not finished its TFB fit")
        try:
            saved, _ = _io.read_safetensors(path)
            self._fit = json.loads(meta.read_text())
            self.sigma_q = float(self._fit["sigma_q"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{folder}: cannot read the TFB posterior ({err})") from err
        missing = sorted(set(flip.names) - set(saved))
        if missing:
            raise ValueError(f"{path} lacks the std of LoRA layer {missing[0]!r} (saved for another model?)")
        flip.set_std(saved)

    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        flip = self._ensure_flipout()
        noise = torch.Generator(device=self._device).manual_seed(self.config.eval.seed)
        return [sampled_prediction(self, self.label, examples, scorer, lambda _: flip.using("sample", noise),
                                   self.config.eval.n_samples)]

    def predict_at_mean(self, examples: Sequence, scorer: Any) -> Prediction:
        with self._ensure_flipout().using("mean"):
            return super().predict_at_mean(examples, scorer)

    def extra_bytes(self) -> dict[str, int]:
        # σ of every A′, kept at A′'s shape (r distinct values per layer)
        sigma = sum(m.weight.numel() * 4 for m in lora_a_modules(self.session.model).values())
        return {**super().extra_bytes(), "extra_param_bytes": sigma}
