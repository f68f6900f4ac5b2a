"""Evaluation: batching order does not change results; sampled methods average probabilities."""

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from varlora.config import EvalArgs, LoraArgs
from varlora.evaluate import deterministic_prediction, finish, predict_logits, sampled_prediction
from varlora.methods.ivon import tau_label
from varlora.models import attach_lora, lora_parameters
from varlora.posterior import Posterior
from varlora.scoring import make_scorer
from varlora.tasks import Example, jsonl_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    path = folder / "v.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b", "c"], "answer": 0}\n')
    task = jsonl_task(validation=str(path))
    examples = [Example(id=str(i), question="word " * (1 + (7 * i) % 11), choices=("red", "blue green", "gold"),
                        label=i % 3) for i in range(10)]
    model = attach_lora(tiny_llama(seed=1), LoraArgs(r=4, dropout=0.0), seed=0)
    with torch.no_grad():  # non-zero B so that sampling LoRA weights changes the outputs
        for p in lora_parameters(model).values():
            p.normal_(0, 0.3)
    return model, make_scorer("cloze", tiny_tokenizer(), task, max_length=64), examples


def predict_probs(model, scorer, examples, batch_size):
    return torch.softmax(predict_logits(model.eval(), scorer, examples, batch_size), -1)


def test_length_sorted_batches_return_rows_in_input_order(setup):
    model, scorer, examples = setup
    batched = predict_probs(model, scorer, examples, batch_size=4)
    one_by_one = torch.cat([predict_probs(model, scorer, [ex], batch_size=1) for ex in examples])
    assert batched.shape == (10, 3)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)


def _method(model, args: EvalArgs):
    """The two attributes the prediction helpers read from a method."""
    return SimpleNamespace(name="m", session=SimpleNamespace(model=model), config=SimpleNamespace(eval=args))


def test_sampled_prediction_is_the_mean_of_sample_probabilities(setup):
    model, scorer, examples = setup
    params = lora_parameters(model)
    posterior = Posterior(std={n: torch.full_like(p, 0.2) for n, p in params.items()},
                          hess={n: torch.ones_like(p) for n, p in params.items()}, ess=1.0, weight_decay=0.0)
    args = EvalArgs(n_samples=4, taus=[0.0, 1.0], batch_size=4, seed=3)
    method = _method(model, args)

    def sampled():
        generator = torch.Generator().manual_seed(args.seed)
        return finish(sampled_prediction(method, "s", examples, scorer,
                                         lambda _: posterior.sampled(params, 1.0, generator), 4, tau=1.0), 10)

    mean = finish(deterministic_prediction(method, "d", examples, scorer), 10)
    prediction = sampled()
    assert (prediction.n_samples, prediction.forward_passes, prediction.tau) == (4, 4, 1.0)
    assert prediction.sample_probs.shape == (4, 10, 3)
    torch.testing.assert_close(prediction.probs, prediction.sample_probs.mean(0))
    # the samples differ from each other and from the mean, and the weights are back at the mean
    assert not torch.allclose(prediction.sample_probs[0], prediction.sample_probs[1])
    torch.testing.assert_close(mean.probs, predict_probs(model, scorer, examples, 4), rtol=0, atol=0)
    torch.testing.assert_close(mean.probs, torch.softmax(mean.logits, -1), rtol=0, atol=0)
    assert prediction.metrics["mutual_info"] > 0 and "mutual_info" not in mean.metrics
    # the same seed reproduces the same samples
    assert torch.equal(sampled().probs, prediction.probs)


def test_tau_labels():
    assert [tau_label(t) for t in (0.0, 0.5, 1.0)] == ["ivon@mean", "ivon[tau=0.5]", "ivon"]
