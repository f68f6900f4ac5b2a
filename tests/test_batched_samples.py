"""Batched posterior samples: S samples of the LoRA weights in one folded forward equal S sequential forwards.

Oracle: the sequential path (:func:`perturbed_named_params` per sample, one forward each) with the same
generator; checked for both cloze paths (shared-prefix KV cache, one sequence per pair) and the letter
protocol, in chunks of ``samples_per_forward`` against one fold of all S, and through IVON's predict on a
trained run.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_letter_tokenizer, tiny_llama, tiny_tokenizer
from varlora._batched_lora import batched_lora, fold_batch, supports
from varlora.config import LoraArgs
from varlora.evaluate import batched_sample_logits, predict_logits
from varlora.models import attach_lora, lora_parameters
from varlora.optim.sampling import perturbed_named_params, stacked_named_samples
from varlora.predictor import _PromptTask
from varlora.scoring import make_scorer
from varlora.tasks import Example
from varlora.tasks.templates import TEMPLATES

S = 4


def _model():
    model = attach_lora(tiny_llama(seed=0), LoraArgs(r=4, alpha=8, dropout=0.1), seed=0)
    gen = torch.Generator().manual_seed(1)
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params.values():  # B is zero at init: make every LoRA layer matter
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    stds = {n: 0.2 * torch.rand(p.shape, generator=gen) for n, p in params.items()}
    return model.eval(), params, stds


def _examples() -> list[Example]:
    words = ["red", "blue", "green", "pink", "black"]
    return [Example(f"q{i}", f"Which colour is {words[i % 5]}?" + " really" * (i % 3),
                    tuple(words[(i + j) % 5] for j in range(4 if i % 4 else 3)), 0) for i in range(7)]


def test_stacked_samples_equal_the_sequential_samples_bit_for_bit():
    _, params, stds = _model()
    stacked = stacked_named_samples(params, stds, tau=0.7, generator=torch.Generator().manual_seed(5), n_samples=S)
    gen = torch.Generator().manual_seed(5)
    for s in range(S):
        with perturbed_named_params(params, stds, tau=0.7, generator=gen):
            for n, p in params.items():
                assert torch.equal(stacked[n][s], p), (n, s)
    zero = stacked_named_samples(params, stds, tau=0.0, generator=torch.Generator(), n_samples=2)
    assert all(torch.equal(zero[n][1], p) for n, p in params.items())
    with pytest.raises(ValueError, match="n_samples"):
        stacked_named_samples(params, stds, tau=1.0, generator=torch.Generator(), n_samples=0)


@pytest.mark.parametrize(("mode", "share_prefix"), [("cloze", True), ("cloze", False), ("letter", True)])
def test_folded_forward_equals_sequential_samples(mode, share_prefix):
    model, params, stds = _model()
    tokenizer = tiny_letter_tokenizer() if mode == "letter" else tiny_tokenizer()
    scorer = make_scorer(mode, tokenizer, _PromptTask("t", TEMPLATES["multiple_choice"], 4), max_length=64,
                         share_prefix=share_prefix)
    examples = _examples()
    before = {n: p.clone() for n, p in params.items()}
    at_mean = predict_logits(model, scorer, examples, batch_size=3)
    gen = torch.Generator().manual_seed(3)
    sequential = []
    for _ in range(S):
        with perturbed_named_params(params, stds, tau=1.0, generator=gen):
            sequential.append(predict_logits(model, scorer, examples, batch_size=3))
    sequential = torch.stack(sequential)  # (S, N, K)
    samples = stacked_named_samples(params, stds, tau=1.0, generator=torch.Generator().manual_seed(3),
                                    n_samples=S)
    with batched_lora(model, samples) as n:
        batched = predict_logits(model, scorer, examples, batch_size=3, n_samples=n)
    assert batched.shape == sequential.shape == (S, 7, 4)
    torch.testing.assert_close(batched, sequential, rtol=0, atol=1e-5)
    assert not torch.equal(sequential[0], sequential[1])  # the samples differ
    # the layers are restored and the weights untouched
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    assert torch.equal(predict_logits(model, scorer, examples, batch_size=3), at_mean)


@pytest.mark.parametrize("per_forward", [1, 3])
def test_samples_in_chunks_equal_all_samples_in_one_forward(per_forward):
    """The memory cap changes how many samples share a forward, not the logits (3 leaves a chunk of 1)."""
    model, params, stds = _model()
    scorer = make_scorer("cloze", tiny_tokenizer(), _PromptTask("t", TEMPLATES["multiple_choice"], 4), max_length=64)
    examples = _examples()
    samples = stacked_named_samples(params, stds, tau=1.0, generator=torch.Generator().manual_seed(3), n_samples=S)
    whole = batched_sample_logits(model, scorer, examples, 3, samples)
    chunked = batched_sample_logits(model, scorer, examples, 3, samples, samples_per_forward=per_forward)
    assert chunked.shape == whole.shape == (S, 7, 4)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)  # float32 matmuls of other row counts
    assert not torch.equal(whole[0], whole[1])
    with pytest.raises(ValueError, match="samples_per_forward"):
        batched_sample_logits(model, scorer, examples, 3, samples, samples_per_forward=0)


def test_batched_lora_refuses_what_it_cannot_sample():
    model, params, _ = _model()
    partial = {n: p[None] for n, p in list(params.items())[:2]}
    assert supports(model, set(params)) and not supports(model, set(partial))
    with pytest.raises(ValueError, match="exactly the A and B weights"):
        with batched_lora(model, partial):
            pass
    batch = {"a": torch.arange(6).view(3, 2), "b": torch.arange(3)}
    folded = fold_batch(batch, 2)
    assert folded["a"].tolist() == [[0, 1], [2, 3], [4, 5]] * 2 and folded["b"].tolist() == [0, 1, 2] * 2


def test_ivon_predicts_the_same_batched_and_sequential(tmp_path):
    from dataclasses import replace

    from conftest import build_assets
    from test_methods import _config, _quiet
    from varlora.train import load_run, train_run

    assets = build_assets(tmp_path / "assets", n_train=16, n_val=6)
    config = _config(assets, "ivon", train={"steps": 2, "eval_every": 0}, data={"train_limit": 8},
                     eval={"taus": [0.0, 0.5, 1.0]})
    train_run(config, tmp_path / "run", log=_quiet)
    session, method = load_run(tmp_path / "run")
    assert not session.config.eval.batched_samples  # the default
    sequential = method.predict(session.val_examples, session.scorer)
    for per_forward in (0, 2):  # all 3 samples in one forward; in chunks of 2 (the last one shorter)
        session.config.eval = replace(session.config.eval, batched_samples=True, samples_per_forward=per_forward)
        batched = method.predict(session.val_examples, session.scorer)
        assert [p.label for p in batched] == [p.label for p in sequential] == ["ivon@mean", "ivon[tau=0.5]", "ivon"]
        for b, s in zip(batched, sequential, strict=True):
            assert b.n_samples == s.n_samples and b.forward_passes == s.forward_passes
            torch.testing.assert_close(b.probs, s.probs, rtol=0, atol=1e-5)
            if s.sample_probs is not None:
                torch.testing.assert_close(b.sample_probs, s.sample_probs, rtol=0, atol=1e-5)
