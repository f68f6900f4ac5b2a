"""Scoring against brute-force oracles: one unpadded full-sequence forward per choice, in float64."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA, SHARED_MODEL, requires_shared, tiny_letter_tokenizer, tiny_llama
from varlora.scoring import AnswerTokenError, ClozeScorer, LetterScorer, make_scorer
from varlora.tasks import TEMPLATES, Example, PromptTemplate, Task, get_task, jsonl_task


@dataclass(frozen=True, eq=False, repr=False)
class ListTask(Task):
    """A task over in-memory examples (both splits the same)."""

    name: str
    examples: list[Example]
    num_choices: int
    template: PromptTemplate = field(default_factory=lambda: TEMPLATES["multiple_choice"])

    def source(self, split, data_dir=None):
        return f"{self.name}: memory"

    def _load(self, split, data_dir):
        return self.examples


MC = [
    Example("q0", "Which of these is a mammal?", ("a whale", "a shark", "a trout", "a frog"), 0),
    Example("q1", "The trophy is too large. What is large?", ("the trophy", "the suitcase", "C", "no"), 1),
    Example("q2", "Hi?", ("True", "False and then some more words here", "yes", "Answer"), 2),
]
WINO = [
    Example(
        "w0", "The trophy does not fit into the suitcase because the _ is too large.", ("trophy", "case"), 0
    ),
    Example("w1", "Sarah was a better surgeon than Maria so _ got the easier cases.", ("Sarah", "Maria"), 1),
]
BOOLQ = [
    Example(
        "b0", "is the sky blue", ("True", "False"), 0, passage="The sky is blue because of scattering. " * 8
    ),
    Example("b1", "is a whale a fish", ("True", "False"), 1, passage="A whale is a mammal."),
]
MC_TASK = ListTask("mc", MC, 4)
WINO_TASK = ListTask("wino", WINO, 2, TEMPLATES["winogrande"])
BOOLQ_TASK = ListTask("boolq", BOOLQ, 2, TEMPLATES["boolq"])


@pytest.fixture
def exact_float64(monkeypatch):
    """HF's LlamaRMSNorm computes in float32 whatever the input dtype; that caps a float64 model's gradients
    at ~1e-7 relative precision (summation order then matters). Make it compute in the input dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def _lora(model, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def _naive_cloze(model, scorer: ClozeScorer, examples: list[Example]) -> torch.Tensor:
    """Each (context, continuation) alone, unpadded, full logits: sum_t log p(c_t | x, c_<t) (/ n)."""
    rows = []
    for ex in examples:
        scores = []
        for ctx, cont in scorer.encode(ex):
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]  # (T, V)
            logp = logits[len(ctx) - 1 : -1].log_softmax(-1).gather(1, torch.tensor(cont)[:, None]).sum()
            scores.append(logp / len(cont) if scorer.length_normalize else logp)
        scores += [torch.tensor(float("-inf"), dtype=logp.dtype)] * (scorer.num_choices - len(scores))
        rows.append(torch.stack(scores))
    return torch.stack(rows)


def _naive_letter(model, scorer: LetterScorer, examples: list[Example]) -> torch.Tensor:
    """Each prompt alone: last-position logits indexed by the answer token ids."""
    rows = []
    for ex in examples:
        ids, answers = scorer.encode(ex)
        z = model(input_ids=torch.tensor([ids])).logits[0, -1]
        rows.append(z[torch.tensor(answers)])
    return torch.stack(rows)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_against_oracle(model, scorer, examples, naive, atol=1e-10):
    """Batched logits and their gradients equal the oracle's."""
    batch = scorer.collate(examples)
    s = scorer.choice_logits(model, batch)
    F.cross_entropy(s, batch["labels"]).backward()
    grads = _grads(model)
    model.zero_grad()
    ref = naive(model, scorer, examples)
    F.cross_entropy(ref, batch["labels"]).backward()
    torch.testing.assert_close(s, ref, atol=atol, rtol=0)
    ref_grads = _grads(model)
    model.zero_grad()
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=atol, rtol=0, msg=name)
    return batch, s


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_cloze_matches_per_choice_oracle(letter_tokenizer, exact_float64, share_prefix, length_normalize):
    model = tiny_llama(0, dtype=torch.float64)
    scorer = make_scorer(
        "cloze", letter_tokenizer, MC_TASK, length_normalize=length_normalize, share_prefix=share_prefix
    )
    batch, s = _check_against_oracle(model, scorer, MC, _naive_cloze)
    assert s.dtype == torch.float64 and s.shape == (3, 4)
    assert batch["context_ids"].shape[0] == (3 if share_prefix else 12)
    assert (batch["context_mask"][:, 0] == 0).any()  # contexts of different lengths: left padding exercised
    assert (batch["continuation_mask"][:, -1] == 0).any()  # continuations of different lengths: right padding


def test_cloze_per_pair_path_for_winogrande_partial_evaluation(letter_tokenizer, exact_float64):
    model = tiny_llama(1, dtype=torch.float64)
    scorer = make_scorer("cloze", letter_tokenizer, WINO_TASK)
    pairs = WINO_TASK.cloze_pairs(WINO[0])
    assert pairs[0] == ("The trophy does not fit into the suitcase because the trophy", " is too large.")
    batch, _ = _check_against_oracle(model, scorer, WINO, _naive_cloze)
    assert batch["context_ids"].shape[0] == 4  # contexts differ per choice: one sequence per pair


def test_cloze_through_lora_gives_lora_gradients(letter_tokenizer, exact_float64):
    model = _lora(tiny_llama(2, dtype=torch.float64))
    scorer = make_scorer("cloze", letter_tokenizer, MC_TASK)
    _check_against_oracle(model, scorer, MC, _naive_cloze)
    batch = scorer.collate(MC)
    F.cross_entropy(scorer.choice_logits(model, batch), batch["labels"]).backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_cloze_with_gradient_checkpointing_falls_back_to_pairs(letter_tokenizer):
    model = tiny_llama(3, dtype=torch.float64)
    scorer = make_scorer("cloze", letter_tokenizer, MC_TASK)
    expected = scorer.choice_logits(model, scorer.collate(MC))
    model.gradient_checkpointing_enable()
    model.train()
    got = scorer.choice_logits(model, scorer.collate(MC))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("task, examples", [(MC_TASK, MC), (BOOLQ_TASK, BOOLQ), (WINO_TASK, WINO)])
def test_letter_matches_last_position_oracle(letter_tokenizer, exact_float64, task, examples):
    model = _lora(tiny_llama(4, dtype=torch.float64))
    scorer = make_scorer("letter", letter_tokenizer, task)
    batch, s = _check_against_oracle(model, scorer, examples, _naive_letter)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding exercised
    assert s.shape == (len(examples), task.num_choices)


def test_letter_answer_ids_are_the_tokens_after_the_prompt(letter_tokenizer):
    ids, answers = LetterScorer(letter_tokenizer, MC_TASK).encode(MC[0])
    assert answers == letter_tokenizer.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    assert letter_tokenizer.decode(ids).endswith("C. a trout. D. a frog. Answer:")
    _, answers = LetterScorer(letter_tokenizer, BOOLQ_TASK).encode(BOOLQ[1])
    assert answers == letter_tokenizer.convert_tokens_to_ids(["ĠTrue", "ĠFalse"])


def test_letter_rejects_multi_token_answers(tokenizer):
    # the plain tiny tokenizer splits " A" into "Ġ", "A"
    with pytest.raises(AnswerTokenError, match=r"answer ' A' is not exactly one token"):
        LetterScorer(tokenizer, MC_TASK).collate(MC[:1])


def test_letter_truncates_from_the_left_keeping_bos_and_answer_cue():
    tok = tiny_letter_tokenizer(add_bos=True)
    long = Example(
        "long", "Which of these is a mammal? " * 20, ("a whale", "a shark", "a trout", "a frog"), 0
    )
    ids, answers = LetterScorer(tok, MC_TASK, max_length=40).encode(long)
    assert len(ids) == 40 and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]).endswith("Choices: A. a whale. B. a shark. C. a trout. D. a frog. Answer:")
    assert answers == tok.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    short_ids, _ = LetterScorer(tok, MC_TASK, max_length=512).encode(MC[0])
    assert short_ids[0] == tok.bos_token_id and short_ids.count(tok.bos_token_id) == 1


def test_boolq_passage_is_shortened_not_the_question_or_cue(letter_tokenizer):
    ex = BOOLQ[0]
    ids, _ = LetterScorer(letter_tokenizer, BOOLQ_TASK, max_length=60).encode(ex)
    assert len(ids) <= 60
    text = letter_tokenizer.decode(ids)
    assert text.startswith("Answer the question with only True or False: is the sky blue Context: The sky is")
    pairs = ClozeScorer(letter_tokenizer, BOOLQ_TASK, max_length=60).encode(ex)
    for ctx, cont in pairs:
        assert len(ctx) + len(cont) <= 60
        text = letter_tokenizer.decode(ctx)
        assert text.startswith("The sky is blue") and text.endswith("\nQuestion: is the sky blue?\nAnswer:")
    assert [letter_tokenizer.decode(cont) for _, cont in pairs] == [" yes", " no"]


def test_cloze_continuation_too_long_is_an_error(letter_tokenizer):
    ex = Example("x", "Q?", ("word " * 30, "b"), 0)
    with pytest.raises(ValueError, match="leaves no room for its context"):
        ClozeScorer(letter_tokenizer, ListTask("t", [ex], 2), max_length=20).encode(ex)


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_ragged_choices_get_minus_inf_and_train(letter_tokenizer, tmp_path, mode):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"question": "Which is a mammal?", "choices": ["a whale", "a shark", "a frog"], "answer": "A"}\n'
        '{"question": "Is it true?", "choices": ["True", "False"], "answer": 1}\n'
    )
    task = jsonl_task(train=path)
    examples = task.load("train")
    model = tiny_llama(5)
    scorer = make_scorer(mode, letter_tokenizer, task)
    batch = scorer.collate(examples)
    s = scorer.choice_logits(model, batch)
    assert s.shape == (2, 3) and s.dtype == torch.float32
    assert torch.isneginf(s[1, 2]) and torch.isfinite(s[0]).all() and torch.isfinite(s[1, :2]).all()
    loss = F.cross_entropy(s, batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )


def test_scorer_argument_errors(letter_tokenizer):
    with pytest.raises(ValueError, match="mode must be"):
        make_scorer("logits", letter_tokenizer, MC_TASK)
    with pytest.raises(ValueError, match="max_length"):
        make_scorer("cloze", letter_tokenizer, MC_TASK, max_length=1)
    with pytest.raises(ValueError, match="empty"):
        make_scorer("cloze", letter_tokenizer, MC_TASK).collate([])
    with pytest.raises(ValueError, match="more than wino's num_choices = 2"):
        make_scorer("letter", letter_tokenizer, WINO_TASK).collate(MC[:1])


# ---- real model and data (../shared) ----


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    kwargs = {"gguf_file": SHARED_MODEL.name}
    tok = AutoTokenizer.from_pretrained(SHARED_MODEL.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(SHARED_MODEL.parent, dtype=torch.float32, **kwargs).eval()
    return model, tok


@pytest.mark.real
@requires_shared
def test_real_letter_answers_are_single_tokens(smollm):
    _, tok = smollm
    arc, boolq = get_task("arc_easy"), get_task("boolq")
    _, answers = LetterScorer(tok, arc).encode(arc.load("validation", SHARED_DATA, limit=1)[0])
    assert answers == tok.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    ids, answers = LetterScorer(tok, boolq).encode(boolq.load("validation", SHARED_DATA, limit=1)[0])
    assert answers == tok.convert_tokens_to_ids(["ĠTrue", "ĠFalse"]) and len(ids) <= 512


@pytest.mark.slow
@pytest.mark.real
@requires_shared
def test_real_zero_shot_cloze_arc_easy_beats_chance(smollm):
    model, tok = smollm
    task = get_task("arc_easy")
    examples = task.load("validation", SHARED_DATA, limit=100)
    scorer = make_scorer("cloze", tok, task)
    examples.sort(key=lambda ex: len(scorer.encode(ex)[0][0]))  # batches of similar lengths: less padding
    correct = 0
    with torch.no_grad():
        for i in range(0, len(examples), 25):
            batch = scorer.collate(examples[i : i + 25])
            correct += (scorer.choice_logits(model, batch).argmax(-1) == batch["labels"]).sum().item()
    assert correct / len(examples) > 0.38  # chance 0.25; measured 0.44 (DESIGN: 44% on the first 300)


def test_training_forward_reads_no_deprecated_checkpointing_flag(letter_tokenizer):
    """The scorer asks transformers for `is_activation_checkpointing`; the old name warns on every step."""
    import warnings

    model = _lora(tiny_llama()).train()
    scorer = make_scorer("cloze", letter_tokenizer, MC_TASK, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        scorer.choice_logits(model, scorer.collate(MC))
