"""``temperature``: temperature scaling (Guo et al. 2017) of the MAP adapter's choice logits.

p(y | x) = softmax(s(x) / T). T is fitted after training by minimising the NLL on ``temperature.holdout``
examples of the *training* split that the adapter never trained on (:meth:`Session.heldout_train_examples`),
never on evaluation data. With β = 1/T the NLL, (1/n) Σᵢ [logsumexp(β sᵢ) − β s_{i,yᵢ}], is convex in β and
its derivative (1/n) Σᵢ (E_{p_β}[sᵢ] − s_{i,yᵢ}) is increasing, so the minimiser is found exactly by bisection
on the sign of the derivative (deterministic, no learning rate).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from varlora import _io
from varlora.config import check, option
from varlora.evaluate import eval_mode, labels_of, predict_logits
from varlora.methods.adamw import AdamW
from varlora.methods.base import Prediction, register

__all__ = ["TemperatureArgs", "TemperatureScaling", "fit_temperature", "nll_at_temperature"]

TEMPERATURE_FILE = "temperature.json"


@dataclass
class TemperatureArgs:
    """Temperature scaling of the MAP adapter (Guo et al. 2017), fitted on held-out training examples."""

    holdout: int = option("training-split examples held out from training, on which T is fitted", default=200)
    min_temperature: float = option("lower end of the search interval of T", default=0.01)
    max_temperature: float = option("upper end of the search interval of T", default=100.0)

    def __post_init__(self) -> None:
        check(self.holdout >= 1, "temperature.holdout", self.holdout, "must be >= 1")
        check(0 < self.min_temperature < self.max_temperature, "temperature.min_temperature",
              self.min_temperature, f"must be in (0, max_temperature={self.max_temperature})")


def _finite(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with masked (−inf) choices set to 0, and the mask of real choices."""
    mask = torch.isfinite(logits)
    return torch.where(mask, logits, torch.zeros_like(logits)), mask


def nll_at_temperature(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean −log softmax(s / T)_y over the rows of ``logits`` (N, K)."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return float(-logp.gather(1, labels[:, None]).mean())


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """d/dβ of the mean NLL at inverse temperature β: mean(E_p[s] − s_y)."""
    s, mask = _finite(logits.double())
    p = torch.softmax(logits.double() * beta, -1) * mask
    return float(((p * s).sum(-1) - s.gather(1, labels[:, None]).squeeze(1)).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, lo: float = 0.01, hi: float = 100.0,
                    tol: float = 1e-10) -> float:
    """The T in [lo, hi] minimising the mean NLL of softmax(logits / T), by bisection on β = 1/T."""
    beta_lo, beta_hi = 1.0 / hi, 1.0 / lo
    if _nll_slope(logits, labels, beta_lo) >= 0:
        return hi  # the NLL increases from the smallest β: the minimum is at the largest T
    if _nll_slope(logits, labels, beta_hi) <= 0:
        return lo
    while beta_hi - beta_lo > tol * beta_hi:
        mid = 0.5 * (beta_lo + beta_hi)
        if _nll_slope(logits, labels, mid) < 0:
            beta_lo = mid
        else:
            beta_hi = mid
    return 1.0 / (0.5 * (beta_lo + beta_hi))


@register
class TemperatureScaling(AdamW):
    """The MAP adapter's logits divided by one temperature fitted on held-out training examples."""

    name = "temperature"
    label = "temperature"
    color = "C5"
    args_class = TemperatureArgs
    sections = ("adamw",)
    posthoc_of = "adamw"
    supports_distributed = False
    role = ""

    temperature: float = 1.0

    def fit_posthoc(self, log) -> dict[str, Any]:
        examples = self.session.heldout_train_examples(self.args.holdout, "temperature.holdout")
        with eval_mode(self.session.model):
            logits = predict_logits(self.session.model, self.session.scorer, examples, self.config.eval.batch_size)
        labels = labels_of(examples)
        self.temperature = fit_temperature(logits, labels, self.args.min_temperature, self.args.max_temperature)
        nll_before, nll_after = nll_at_temperature(logits, labels, 1.0), nll_at_temperature(logits, labels,
                                                                                           self.temperature)
        log(f"temperature: T = {self.temperature:.4f} fitted on {len(examples)} held-out examples of the train "
            f"split (NLL there {nll_before:.4f} → {nll_after:.4f})")
        return {"temperature": self.temperature, "calibration_split": "train (held out from training)",
                "calibration_examples": len(examples), "calibration_ids": [ex.id for ex in examples]}

    def save(self, folder: Path) -> None:
        super().save(folder)
        _io.write_json(Path(folder) / TEMPERATURE_FILE, {"temperature": self.temperature})

    def load(self, folder: Path) -> None:
        super().load(folder)
        path = Path(folder) / TEMPERATURE_FILE
        try:
            self.temperature = float(json.loads(path.read_text())["temperature"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: cannot read the fitted temperature ({err})") from err

    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        [row] = super().predict(examples, scorer)
        row.logits = row.logits / self.temperature
        row.probs = torch.softmax(row.logits, -1)
        return [row]
