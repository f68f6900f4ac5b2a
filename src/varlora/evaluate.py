"""Predictive probabilities of a LoRA model and their calibration metrics, for every method.

A method (:mod:`varlora.methods`) makes :class:`~varlora.methods.base.Prediction` rows from two building
blocks here: :func:`deterministic_prediction` (one forward at the current weights) and
:func:`sampled_prediction` (S forwards, each inside a context that sets one sample of the weights or of the
dropout masks; the *probabilities* are averaged, p̄ = (1/S) Σₛ softmax(f(x; θₛ)), never the logits).
:func:`finish` adds the metrics: accuracy %, ECE % (``n_bins``), NLL, Brier, mean predictive entropy, and
for sampled rows the mean mutual information.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from varlora import distributed
from varlora._batched_lora import batched_lora, fold_batch
from varlora.metrics import compute_metrics, mutual_information, predictive_entropy
from varlora.prediction import Prediction
from varlora.sharding import is_sharded
from varlora.tasks import Example

if TYPE_CHECKING:
    from varlora.methods.base import Method

__all__ = ["Prediction", "predict_logits", "deterministic_prediction", "sampled_prediction",
           "batched_sample_logits", "batched_sampled_prediction", "finish", "labels_of"]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, scorer, examples: Sequence[Example], batch_size: int,
                   n_samples: int | None = None) -> torch.Tensor:
    """Choice logits (N, K) float64 at the model's current weights, in the mode the model is in.

    Examples are batched in order of text length (less padding), and the rows returned in input order.
    Under :mod:`varlora.distributed` each rank scores every N-th example of that order and every rank gets
    all the rows. With ``n_samples = S`` each batch is folded S times (inside :func:`varlora._batched_lora.
    batched_lora`, one posterior sample per block of rows) and the logits are (S, N, K). A model sharded by FSDP2
    all-gathers its weights in every forward, so there every rank runs as many batches as the busiest: the
    others score a one-example batch more, whose logits are dropped.
    """
    everything = sorted(range(len(examples)), key=lambda i: _text_length(examples[i]))
    order = everything[distributed.rank() :: distributed.world_size()]
    starts = list(range(0, len(order), batch_size))
    if is_sharded(model) and everything:
        busiest = -(-len(everything[:: distributed.world_size()]) // batch_size)  # rank 0's share is the largest
        for _ in range(busiest - len(starts)):
            scorer.choice_logits(model, scorer.collate([examples[everything[0]]]))  # the collective forwards only
    chunks = []
    for start in starts:
        batch = scorer.collate([examples[i] for i in order[start : start + batch_size]])
        if n_samples is None:
            chunks.append(scorer.choice_logits(model, batch).double().cpu())  # (B, K)
            continue
        folded = scorer.choice_logits(model, fold_batch(batch, n_samples)).double().cpu()  # (S·B, K)
        chunks.append(folded.view(n_samples, -1, folded.shape[-1]).transpose(0, 1))  # (B, S, K)
    parts = distributed.all_gather_objects((order, torch.cat(chunks) if chunks else None))
    rows = torch.tensor([i for indices, _ in parts for i in indices])
    logits = torch.empty(len(examples), *next(p.shape[1:] for _, p in parts if p is not None), dtype=torch.float64)
    logits[rows] = torch.cat([p for _, p in parts if p is not None])
    return logits if n_samples is None else logits.transpose(0, 1).contiguous()


def _text_length(example: Example) -> int:
    return len(example.question) + len(example.passage or "") + max(len(c) for c in example.choices)


def labels_of(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([ex.label for ex in examples])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put ``model`` in eval mode inside the block and restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def deterministic_prediction(method: Method, label: str, examples: Sequence[Example], scorer: Any,
                             **fields: Any) -> Prediction:
    """One eval-mode forward at the model's current weights; keeps the logits."""
    model = method.session.model
    with eval_mode(model):
        logits = predict_logits(model, scorer, examples, method.config.eval.batch_size)
    return Prediction(label=label, method=method.name, probs=torch.softmax(logits, -1), labels=labels_of(examples),
                      logits=logits, **{"n_samples": 1, "forward_passes": 1, **fields})


def sampled_prediction(method: Method, label: str, examples: Sequence[Example], scorer: Any,
                       sample: Callable[[int], contextlib.AbstractContextManager], n_samples: int,
                       **fields: Any) -> Prediction:
    """Average the probabilities of ``n_samples`` forwards; forward ``s`` runs inside ``sample(s)``, which sets
    that sample's weights (or dropout masks) and restores them on exit. The model starts in eval mode (a
    sampler may switch modules to train mode inside its context)."""
    model = method.session.model
    stacked = []
    with eval_mode(model):
        for s in range(n_samples):
            with sample(s):
                stacked.append(torch.softmax(predict_logits(model, scorer, examples, method.config.eval.batch_size),
                                             -1))
    sample_probs = torch.stack(stacked)  # (S, N, K)
    return Prediction(label=label, method=method.name, probs=sample_probs.mean(0), labels=labels_of(examples),
                      sample_probs=sample_probs, **{"n_samples": n_samples, "forward_passes": n_samples, **fields})


@torch.no_grad()
def batched_sample_logits(model: torch.nn.Module, scorer, examples: Sequence[Example], batch_size: int,
                          samples: Mapping[str, torch.Tensor], samples_per_forward: int | None = None) -> torch.Tensor:
    """Choice logits (S, N, K) float64 of the S samples of the LoRA weights ``samples`` (name → (S, \\*shape)),
    folded ``samples_per_forward`` at a time (None: all S) into each forward (:mod:`varlora._batched_lora`).

    ``samples_per_forward`` is the memory cap of the batched path: a forward holds ``samples_per_forward ×
    batch_size`` rows, so its activations (the logits over the vocabulary foremost) grow with it, while the
    result does not depend on it beyond float rounding.
    """
    S = next(iter(samples.values())).shape[0]
    if samples_per_forward is not None and samples_per_forward < 1:
        raise ValueError(f"samples_per_forward must be >= 1 (or None for all), got {samples_per_forward}")
    step = min(samples_per_forward or S, S)
    chunks = []
    for start in range(0, S, step):
        with batched_lora(model, {n: t[start : start + step] for n, t in samples.items()}) as n:
            chunks.append(predict_logits(model, scorer, examples, batch_size, n_samples=n))  # (n, N, K)
    return torch.cat(chunks)


def batched_sampled_prediction(method: Method, label: str, examples: Sequence[Example], scorer: Any,
                               samples: Mapping[str, torch.Tensor], samples_per_forward: int | None = None,
                               **fields: Any) -> Prediction:
    """:func:`sampled_prediction` with the S samples of the LoRA weights given at once (name → (S, \\*shape),
    e.g. :func:`varlora.optim.sampling.stacked_named_samples`), run ``samples_per_forward`` at a time (None: all
    S) in one folded forward each (:func:`batched_sample_logits`); equal to the sequential path up to float
    rounding."""
    model = method.session.model
    with eval_mode(model):
        logits = batched_sample_logits(model, scorer, examples, method.config.eval.batch_size, samples,
                                       samples_per_forward)
    sample_probs = torch.softmax(logits, -1)  # (S, N, K)
    S = sample_probs.shape[0]
    return Prediction(label=label, method=method.name, probs=sample_probs.mean(0), labels=labels_of(examples),
                      sample_probs=sample_probs, **{"n_samples": S, "forward_passes": S, **fields})


def finish(prediction: Prediction, n_bins: int) -> Prediction:
    """Fill ``prediction.metrics`` from its probabilities (and per-sample probabilities when it has them)."""
    metrics = compute_metrics(prediction.probs, prediction.labels, n_bins=n_bins)
    metrics["entropy"] = float(predictive_entropy(prediction.probs).mean())
    if prediction.sample_probs is not None:
        metrics["mutual_info"] = float(mutual_information(prediction.sample_probs).mean())
    prediction.metrics = metrics
    return prediction
