"""Predictive probabilities and calibration metrics of a LoRA model, at its weights or under its posterior.

Methods (Cong et al. 2024, Table 1): a deterministic model (AdamW, and IVON@mean = τ 0) is one
forward at the current weights; IVON with τ > 0 averages the *probabilities* (never the logits) of
``n_samples`` posterior samples, p̄ = (1/S) Σₛ softmax(f(x; m + √τ σ ⊙ εₛ)). The noise of every τ is
drawn from a fresh generator seeded with ``EvalArgs.seed`` (common random numbers: the τ curve is
smooth, and a re-evaluation of a saved run reproduces its metrics exactly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from varlora import distributed
from varlora.config import EvalArgs
from varlora.metrics import compute_metrics, mutual_information, predictive_entropy
from varlora.posterior import Posterior
from varlora.tasks import Example

__all__ = ["Prediction", "predict_probs", "evaluate_model", "method_name"]


@dataclass
class Prediction:
    """Averaged probabilities (N, K) of one method, the per-sample ones (S, N, K), and their metrics."""

    method: str
    tau: float
    probs: torch.Tensor
    labels: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    sample_probs: torch.Tensor | None = None


def method_name(optimizer: str, tau: float) -> str:
    """Table name of a prediction: ``adamw``, ``ivon@mean`` (τ 0), ``ivon`` (τ 1) or ``ivon[tau=0.5]``."""
    if optimizer != "ivon":
        return optimizer
    if tau == 0.0:
        return "ivon@mean"
    return "ivon" if tau == 1.0 else f"ivon[tau={tau:g}]"


@torch.no_grad()
def predict_probs(model: torch.nn.Module, scorer, examples: Sequence[Example], batch_size: int) -> torch.Tensor:
    """Softmax over the choice scores at the model's current weights, (N, K) float64, in eval mode.

    Examples are batched in order of text length (less padding), and the rows returned in input order.
    Under :mod:`varlora.distributed` each rank scores every N-th example of that order and every rank gets
    all the rows.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: _text_length(examples[i]))[distributed.rank() ::
                                                                                   distributed.world_size()]
    try:
        chunks = []
        for start in range(0, len(order), batch_size):
            batch = scorer.collate([examples[i] for i in order[start : start + batch_size]])
            logits = scorer.choice_logits(model, batch)  # (B, K)
            chunks.append(torch.softmax(logits.double(), dim=-1).cpu())
        parts = distributed.all_gather_objects((order, torch.cat(chunks) if chunks else None))
        rows = torch.tensor([i for indices, _ in parts for i in indices])
        probs = torch.empty(len(examples), *next(p.shape[1:] for _, p in parts if p is not None), dtype=torch.float64)
        probs[rows] = torch.cat([p for _, p in parts if p is not None])
        return probs
    finally:
        model.train(was_training)


def _text_length(example: Example) -> int:
    return len(example.question) + len(example.passage or "") + max(len(c) for c in example.choices)


def evaluate_model(
    model: torch.nn.Module,
    scorer,
    examples: Sequence[Example],
    args: EvalArgs,
    *,
    optimizer_name: str,
    params: Mapping[str, torch.nn.Parameter] | None = None,
    posterior: Posterior | None = None,
    taus: Sequence[float] | None = None,
) -> list[Prediction]:
    """Evaluate every method of a trained model on ``examples``.

    With a posterior, one :class:`Prediction` per τ in ``taus`` (default ``args.taus``); without one
    (AdamW), a single deterministic prediction. Metrics: accuracy %, ECE % (``args.n_bins``), NLL,
    Brier, mean predictive entropy, and for sampled methods the mean mutual information.
    """
    labels = torch.tensor([ex.label for ex in examples])
    if posterior is None:
        probs = predict_probs(model, scorer, examples, args.batch_size)
        return [_finish(Prediction(method_name(optimizer_name, 0.0), 0.0, probs, labels), args)]
    if params is None:
        raise ValueError("params are required to sample from a posterior")
    predictions = []
    for tau in (args.taus if taus is None else taus):
        if tau == 0.0:
            probs = predict_probs(model, scorer, examples, args.batch_size)
            predictions.append(_finish(Prediction(method_name(optimizer_name, 0.0), 0.0, probs, labels), args))
            continue
        generator = torch.Generator().manual_seed(args.seed)
        samples = []
        for _ in range(args.n_samples):
            with posterior.sampled(params, tau, generator):
                samples.append(predict_probs(model, scorer, examples, args.batch_size))
        stacked = torch.stack(samples)  # (S, N, K)
        prediction = Prediction(method_name(optimizer_name, tau), tau, stacked.mean(0), labels,
                                sample_probs=stacked)
        predictions.append(_finish(prediction, args))
    return predictions


def _finish(prediction: Prediction, args: EvalArgs) -> Prediction:
    metrics = compute_metrics(prediction.probs, prediction.labels, n_bins=args.n_bins)
    metrics["entropy"] = float(predictive_entropy(prediction.probs).mean())
    if prediction.sample_probs is not None:
        metrics["mutual_info"] = float(mutual_information(prediction.sample_probs).mean())
    prediction.metrics = metrics
    return prediction
