r"""The calibration layer: temperature scaling of any method's predictive, fitted on the run's calibration questions.

Post-hoc calibration as a layer that composes with every method rather than a method of its own (Guo et al. 2017
apply it to one network's logits; here it applies to whatever predictive a method makes). For a prediction row
with averaged probabilities :math:`\bar p(x)` (one forward, or the mean of S samples), the calibrated row is

.. math::
    p_T(y \mid x) = \frac{\bar p(y \mid x)^{1/T}}{\sum_k \bar p(k \mid x)^{1/T}}
                 = \mathrm{softmax}\big(\log \bar p(x) / T\big)_y,

which for a deterministic row is temperature scaling of its logits. One :math:`T` per row label is fitted by
exact NLL minimisation (:func:`varlora.methods.temperature.fit_temperature`) on the ``data.calibration``
questions that training left out (:attr:`varlora.session.Session.calibration_examples`), the same for every
method of a task and seed, and then applied unchanged to every evaluation set, out-of-distribution ones
included. The fit is part of the post-hoc stage (saved in ``final/stage.json`` as ``calibration_layer``, its time in
the fit's seconds); calibrated rows are labelled ``<label>+ts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from varlora.methods.temperature import fit_temperature, nll_at_temperature
from varlora.prediction import Prediction

__all__ = ["SUFFIX", "fit_layer", "apply_layer"]

#: Appended to a row's label for its calibrated copy.
SUFFIX = "+ts"


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    """log p̄ as the logits of the layer (a probability of 0 stays at −inf: that choice stays impossible)."""
    return torch.log(probs.double())


def fit_layer(predictions: Sequence[Prediction], bounds: tuple[float, float] = (0.01, 100.0)) -> dict[str, Any]:
    """One temperature per row, fitted on the rows' predictions of the calibration questions: label →
    ``{"T", "nll_before", "nll_after", "n"}`` (T the temperature). Rows already calibrated are skipped."""
    fitted = {}
    for p in predictions:
        if p.label.endswith(SUFFIX):
            continue
        logits = _log_probs(p.probs)
        temperature = fit_temperature(logits, p.labels, *bounds)
        fitted[p.label] = {"T": temperature, "nll_before": nll_at_temperature(logits, p.labels, 1.0),
                           "nll_after": nll_at_temperature(logits, p.labels, temperature), "n": len(p.labels)}
    return fitted


def apply_layer(predictions: Sequence[Prediction], fitted: dict[str, Any]) -> list[Prediction]:
    """The calibrated copy of every row that has a fitted temperature (same method, τ and cost; no per-sample
    probabilities: the layer acts on the averaged predictive)."""
    out = []
    for p in predictions:
        if p.label not in fitted:
            continue
        logits = _log_probs(p.probs) / fitted[p.label]["T"]
        out.append(Prediction(label=p.label + SUFFIX, method=p.method, probs=torch.softmax(logits, -1),
                              labels=p.labels, logits=logits, tau=p.tau, n_samples=p.n_samples,
                              forward_passes=p.forward_passes))
    return out
