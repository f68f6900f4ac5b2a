"""Accuracy, calibration and uncertainty metrics of predictive probabilities ``probs`` (N, K), labels (N,).

With confidence c_i = max_k p_ik and prediction ŷ_i = argmax_k p_ik (the first index on ties):

- accuracy = (1/N) Σ_i 1[ŷ_i = y_i]
- ECE (top-label, M equal-width bins) = Σ_b (n_b / N) |acc_b − conf_b|
  = (1/N) Σ_b |Σ_{i∈b} 1[ŷ_i = y_i] − Σ_{i∈b} c_i|, with bin b = 0..M−1 holding the c_i in (b/M, (b+1)/M]:
  a confidence exactly on an edge goes to the lower bin, 1.0 to the last bin (and 0 to the first). Edges
  are compared in float64, so a float32 0.3 (= 0.30000001) falls above the edge 0.3.
- MCE (maximum calibration error, Naeini et al. 2015) = max_b |acc_b − conf_b| over the non-empty bins of the
  same binning: the worst bin's gap, which the ECE's weighting by n_b / N can hide
- NLL = −(1/N) Σ_i log p_{i,y_i} (p clamped at the smallest normal float64, so it stays finite)
- Brier = (1/N) Σ_i Σ_k (p_ik − 1[y_i = k])² (summed over classes, not divided by K)
- predictive entropy H(p) = −Σ_k p_k log p_k (0 log 0 = 0)
- mutual information of S posterior samples p_s: H(mean_s p_s) − mean_s H(p_s) (the epistemic part)
- AUROC(positives, negatives) = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻) (Mann–Whitney U / (n⁺ n⁻), average ranks for ties)
- FPR@95%TPR(positives, negatives) = P(s⁻ >= t) at the largest threshold t with P(s⁺ >= t) >= 0.95

Out-of-distribution detection scores every example so that **higher = more in-distribution** and takes the
in-distribution examples as the positives: the max probability, the negative predictive entropy and the
negative mutual information. A perfect detector has AUROC 1 and FPR@95 0; chance is AUROC ½, FPR@95 ≈ 0.95.

Selective prediction (Geifman & El-Yaniv 2017, 2019) answers only the examples whose confidence reaches a
threshold: the accuracy–coverage curve has one point per distinct confidence t (coverage = P(c >= t),
accuracy over those examples), and AURC is the area under the risk–coverage curve, (1/N) Σ_{k=1..N} r_k with
r_k the error rate of the k most confident examples; examples of equal confidence are taken in a uniformly
random order and r_k is its expectation (so a constant confidence gives AURC = the error rate).

Scalars come back as Python floats; :func:`compute_metrics` and :class:`CalibrationMetrics` report accuracy
and ECE in percent (as the papers do), NLL and Brier as plain numbers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CalibrationMetrics",
    "ReliabilityBins",
    "accuracy",
    "accuracy_coverage_curve",
    "auroc",
    "aurc",
    "brier_score",
    "compute_metrics",
    "confidence_bins",
    "expected_calibration_error",
    "fpr_at_95_tpr",
    "maximum_calibration_error",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "reliability_bins",
]

_TINY = torch.finfo(torch.float64).tiny


def _check(probs: Any, labels: Any) -> tuple[Tensor, Tensor]:
    """float64 (N, K) probabilities and int64 (N,) labels on the CPU, validated."""
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().to("cpu", torch.long)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {tuple(p.shape)} and {tuple(y.shape)}")
    if p.shape[0] == 0:
        raise ValueError("metrics of zero examples are undefined")
    if ((y < 0) | (y >= p.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got min {y.min()} and max {y.max()}")
    return p, y


def _check_bins(n_bins: int) -> None:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")


def _sums_of(conf: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """Per-bin (count, Σ confidence, Σ correct) of float64 confidences and 0/1 correctness: (3, n_bins)."""
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    b = torch.bucketize(conf, inner_edges, right=False)  # edges[b-1] < conf <= edges[b]: edge -> lower bin
    return torch.stack(
        [
            torch.bincount(b, minlength=n_bins).to(torch.float64),
            torch.bincount(b, weights=conf, minlength=n_bins),
            torch.bincount(b, weights=correct, minlength=n_bins),
        ]
    )


def _bin_sums(p: Tensor, y: Tensor, n_bins: int) -> Tensor:
    conf, pred = p.max(-1)
    return _sums_of(conf, (pred == y).to(torch.float64), n_bins)


def _nll_sum(p: Tensor, y: Tensor) -> float:
    return -p.gather(1, y[:, None]).clamp_min(_TINY).log().sum().item()


def _brier_sum(p: Tensor, y: Tensor) -> float:
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return (p - onehot).pow(2).sum().item()


def accuracy(probs: Any, labels: Any) -> float:
    p, y = _check(probs, labels)
    return (p.argmax(-1) == y).to(torch.float64).mean().item()


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins, as a fraction in [0, 1]."""
    return reliability_bins(probs, labels, n_bins).ece


def maximum_calibration_error(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """MCE as a fraction: the largest |accuracy − confidence| over the non-empty bins of the ECE's binning."""
    return reliability_bins(probs, labels, n_bins).mce


def negative_log_likelihood(probs: Any, labels: Any) -> float:
    p, y = _check(probs, labels)
    return _nll_sum(p, y) / len(y)


def brier_score(probs: Any, labels: Any) -> float:
    p, y = _check(probs, labels)
    return _brier_sum(p, y) / len(y)


def predictive_entropy(probs: Any) -> Tensor:
    """H(p) in nats over the last axis: (..., K) -> (...), float64."""
    p = torch.as_tensor(probs).detach().to(torch.float64)
    return -torch.xlogy(p, p).sum(-1)


def mutual_information(sample_probs: Any) -> Tensor:
    """H(mean_s p_s) − mean_s H(p_s) for ``sample_probs`` (S, N, K) -> (N,), float64; rounding below 0 is
    clamped (the quantity is >= 0 by Jensen's inequality)."""
    p = torch.as_tensor(sample_probs).detach().to(torch.float64)
    if p.ndim != 3:
        raise ValueError(f"expected sample_probs (S, N, K), got {tuple(p.shape)}")
    return (predictive_entropy(p.mean(0)) - predictive_entropy(p).mean(0)).clamp_min(0)


def auroc(scores_pos: Any, scores_neg: Any) -> float:
    """Area under the ROC curve of separating positives (higher scores) from negatives; ties count half."""
    pos = torch.as_tensor(scores_pos).detach().to("cpu", torch.float64).flatten()
    neg = torch.as_tensor(scores_neg).detach().to("cpu", torch.float64).flatten()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"auroc needs positives and negatives, got {len(pos)} and {len(neg)}")
    scores = torch.cat([pos, neg])
    if scores.isnan().any():
        raise ValueError("auroc scores contain NaN")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)  # integer / 2 would be float32: rank sums of 400 examples lose digits
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]  # 1-based, ties share their average rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return (u / (len(pos) * len(neg))).item()


def _scores(scores: Any, name: str) -> Tensor:
    """float64 (n,) on the CPU; Python numbers go straight to float64 (0.9 stays 0.9, not float32's)."""
    s = scores.detach() if isinstance(scores, Tensor) else torch.as_tensor(scores, dtype=torch.float64)
    s = s.to("cpu", torch.float64).flatten()
    if len(s) == 0:
        raise ValueError(f"{name} is empty")
    if s.isnan().any():
        raise ValueError(f"{name} contains NaN")
    return s


def fpr_at_95_tpr(scores_pos: Any, scores_neg: Any) -> float:
    """False-positive rate at 95% true-positive rate of the detector "positive iff score >= t".

    Positives (in-distribution, in OOD detection) should score higher. t is the largest threshold that keeps
    at least 95% of the positives, i.e. the ⌈0.95 n⁺⌉-th largest positive score; the result is the fraction
    of negatives scoring >= t (a negative tied with t counts as a false positive).
    """
    pos = _scores(scores_pos, "scores_pos")
    neg = _scores(scores_neg, "scores_neg")
    k = (95 * len(pos) + 99) // 100  # ⌈0.95 n⁺⌉ in integers: no rounding at n⁺ = 20, 100, ...
    threshold = pos.sort(descending=True).values[k - 1]
    return (neg >= threshold).to(torch.float64).mean().item()


def _by_confidence(confidence: Any, correct: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct confidences in decreasing order with the examples and correct ones at each: 3 × (G,)."""
    c = _scores(confidence, "confidence")
    ok = torch.as_tensor(correct).detach().to("cpu", torch.float64).flatten()
    if len(ok) != len(c):
        raise ValueError(f"expected confidence and correct of one length, got {len(c)} and {len(ok)}")
    values, inverse, counts = torch.unique(c, return_inverse=True, return_counts=True)  # increasing
    right = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ok)
    return values.flip(0), counts.flip(0).to(torch.float64), right.flip(0)


def accuracy_coverage_curve(confidence: Any, correct: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(coverage, accuracy, threshold), each (G,) float64 for the G distinct confidences, coverage increasing:
    answering only the examples with confidence >= threshold[g] covers coverage[g] of them with accuracy
    accuracy[g]. ``confidence`` (N,) is any score (e.g. the max probability), ``correct`` (N,) 0/1 or bool."""
    values, counts, right = _by_confidence(confidence, correct)
    n = counts.cumsum(0)
    return n / n[-1], right.cumsum(0) / n, values


def aurc(confidence: Any, correct: Any) -> float:
    """Area under the risk–coverage curve, (1/N) Σ_k E[errors among the k most confident] / k, as a fraction;
    ties in confidence are ordered uniformly at random (the expected errors grow linearly through a tie)."""
    _, counts, right = _by_confidence(confidence, correct)
    ends = counts.cumsum(0)  # examples up to and including each group
    errors_at_end = (counts - right).cumsum(0)
    group = torch.repeat_interleave(torch.arange(len(counts)), counts.long())  # (N,) group of the k-th example
    k = torch.arange(1, int(ends[-1].item()) + 1, dtype=torch.float64)
    start = ends[group] - counts[group]
    errors_before = errors_at_end[group] - (counts - right)[group]
    expected_errors = errors_before + (k - start) * (counts - right)[group] / counts[group]
    return (expected_errors / k).mean().item()


class ReliabilityBins(NamedTuple):
    """Per-bin data of a reliability diagram; ``confidence``/``accuracy`` are NaN in empty bins."""

    edges: Tensor  # (n_bins + 1,)
    confidence: Tensor  # mean confidence, (n_bins,)
    accuracy: Tensor  # fraction correct, (n_bins,)
    count: Tensor  # examples, (n_bins,) int64
    ece: float  # as a fraction
    mce: float  # as a fraction


def _reliability(sums: Tensor) -> ReliabilityBins:
    count, conf, correct = sums
    n_bins = len(count)
    filled = count > 0
    return ReliabilityBins(
        edges=torch.arange(n_bins + 1, dtype=torch.float64) / n_bins,
        confidence=conf / count,
        accuracy=correct / count,
        count=count.round().to(torch.long),
        ece=((correct - conf).abs().sum() / count.sum()).item(),
        mce=((correct - conf)[filled] / count[filled]).abs().max().item() if filled.any() else math.nan,
    )


def reliability_bins(probs: Any, labels: Any, n_bins: int = 10) -> ReliabilityBins:
    """Mean confidence, accuracy and count per equal-width confidence bin (same bins as the ECE)."""
    _check_bins(n_bins)
    return _reliability(_bin_sums(*_check(probs, labels), n_bins))


def confidence_bins(confidence: Any, correct: Any, n_bins: int = 10) -> ReliabilityBins:
    """:func:`reliability_bins` from top-label confidences (N,) and correctness (N,) bool, e.g. to pool
    tasks with different numbers of choices."""
    _check_bins(n_bins)
    c = torch.as_tensor(confidence).detach().to("cpu", torch.float64).flatten()
    ok = torch.as_tensor(correct).detach().to("cpu", torch.float64).flatten()
    if len(c) != len(ok) or len(c) == 0:
        raise ValueError(f"expected confidence and correct of one non-zero length, got {len(c)}, {len(ok)}")
    return _reliability(_sums_of(c, ok, n_bins))


def _report(sums: Tensor, nll_sum: float, brier_sum: float, n_bins: int) -> dict[str, float | int]:
    count, conf, correct = sums
    n = count.sum().item()
    return {
        "acc": 100 * correct.sum().item() / n,
        "ece": 100 * (correct - conf).abs().sum().item() / n,
        "nll": nll_sum / n,
        "brier": brier_sum / n,
        "n_bins": n_bins,
        "n": round(n),
    }


def compute_metrics(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, float | int]:
    """{"acc": %, "ece": %, "nll", "brier", "n_bins", "n"} of probabilities (N, K) against labels (N,)."""
    _check_bins(n_bins)
    p, y = _check(probs, labels)
    return _report(_bin_sums(p, y, n_bins), _nll_sum(p, y), _brier_sum(p, y), n_bins)


class CalibrationMetrics:
    """Streaming :func:`compute_metrics`: ``update`` per batch, ``compute`` at the end, ``reset`` to reuse.

    The state is a few sums (per-bin counts, confidences and correct predictions; NLL and Brier totals), so
    batches may come in any order and sizes. When ``torch.distributed`` is initialised, ``compute`` sums the
    states of all processes (an all-reduce; every rank must call it) and every rank gets the global result.
    """

    def __init__(self, n_bins: int = 10) -> None:
        _check_bins(n_bins)
        self.n_bins = n_bins
        self.reset()

    def reset(self) -> None:
        # (3, n_bins): count, Σ confidence, Σ correct per bin; then Σ NLL and Σ Brier over examples
        self._bins = torch.zeros(3, self.n_bins, dtype=torch.float64)
        self._totals = torch.zeros(2, dtype=torch.float64)

    def update(self, probs: Any, labels: Any) -> None:
        p, y = _check(probs, labels)
        self._bins += _bin_sums(p, y, self.n_bins)
        self._totals += torch.tensor([_nll_sum(p, y), _brier_sum(p, y)], dtype=torch.float64)

    def _global_state(self) -> tuple[Tensor, Tensor]:
        state = torch.cat([self._bins.flatten(), self._totals])
        if dist.is_available() and dist.is_initialized():
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            state = state.to(device)
            dist.all_reduce(state, op=dist.ReduceOp.SUM)
            state = state.cpu()
        return state[: 3 * self.n_bins].view(3, self.n_bins), state[3 * self.n_bins :]

    def compute(self) -> dict[str, float | int]:
        """Same keys as :func:`compute_metrics`; does not change the state."""
        bins, (nll_sum, brier_sum) = self._global_state()
        if bins[0].sum() == 0:
            raise ValueError("CalibrationMetrics.compute() before any update")
        return _report(bins, nll_sum.item(), brier_sum.item(), self.n_bins)

    def reliability(self) -> ReliabilityBins:
        """:func:`reliability_bins` of everything seen (across processes, like ``compute``)."""
        return _reliability(self._global_state()[0])
