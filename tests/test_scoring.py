"""Scoring against brute-force oracles: one unpadded full-sequence forward per choice, in float64."""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA, SHARED_MODEL, requires_shared, tiny_letter_tokenizer, tiny_llama
from varlora.scoring import (
    AnswerTokenError,
    ClozeScorer,
    LetterScorer,
    UnscorableDataError,
    UnscorableError,
    make_scorer,
)
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


# ---- tokenising once per run (Scorer.prepare) ----

DATA = Path(__file__).parent / "data"
LONG = Example("long", "Which of these is a mammal? " * 20, ("a whale", "a shark", "a trout", "a frog"), 0)
# The batches tests/data/scoring_batches_tiny.safetensors holds, written by Scorer.collate as it was before
# prepare() existed (it tokenised every example at every call; varlora d2e7fc9): name -> (mode, add_bos, task,
# examples, max_length, extra scorer options). Left cuts after a BOS, passage shortening, shared and per-pair
# cloze contexts are all in it.
GOLDEN_CASES = {
    "letter-mc": ("letter", False, MC_TASK, MC + [LONG], 512, {}),
    "letter-mc-bos-40": ("letter", True, MC_TASK, MC + [LONG], 40, {}),
    "letter-boolq-60": ("letter", False, BOOLQ_TASK, BOOLQ, 60, {}),
    "letter-wino": ("letter", False, WINO_TASK, WINO, 512, {}),
    "cloze-mc": ("cloze", False, MC_TASK, MC + [LONG], 512, {}),
    "cloze-mc-bos-40": ("cloze", True, MC_TASK, MC + [LONG], 40, {}),
    "cloze-mc-pairs": ("cloze", False, MC_TASK, MC, 512, {"share_prefix": False}),
    "cloze-boolq-60": ("cloze", False, BOOLQ_TASK, BOOLQ, 60, {}),
    "cloze-wino": ("cloze", False, WINO_TASK, WINO, 512, {}),
}


def _golden(path: Path, case: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    return {k.split("/", 1)[1]: v.long() if v.dtype == torch.int32 else v
            for k, v in saved.items() if k.startswith(f"{case}/")}


def _assert_same_batch(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_prepared_batches_and_scores_equal_the_per_step_tokenisation(case):
    """Tokenised once by prepare(), a batch holds exactly the tokens the per-step path gave, so its scores are
    bit-identical; an example prepare() never saw is encoded on the fly, to the same tokens."""
    mode, add_bos, task, examples, max_length, options = GOLDEN_CASES[case]
    tok = tiny_letter_tokenizer(add_bos=add_bos)
    expected = _golden(DATA / "scoring_batches_tiny.safetensors", case)
    scorer = make_scorer(mode, tok, task, max_length=max_length, **options)
    scorer.prepare(examples, "train")
    calls = []
    tok_call = type(tok).__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(a) or tok_call(self, *a, **k))
        batch = scorer.collate(examples)
    assert not calls  # collate read the prepared tokens
    _assert_same_batch(batch, expected)
    _assert_same_batch(make_scorer(mode, tok, task, max_length=max_length, **options).collate(examples), expected)
    model = tiny_llama(0)
    with torch.no_grad():
        assert torch.equal(scorer.choice_logits(model, batch), scorer.choice_logits(model, expected))


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_truncation_report_counts_the_tokens_cut(mode):
    """Each truncated example's count equals its full encoding's length (max_length large enough for all)
    less the length fitted to max_length; untruncated examples are not counted."""
    tok = tiny_letter_tokenizer(add_bos=True)
    examples, max_length = MC + [LONG], 40
    report = make_scorer(mode, tok, MC_TASK, max_length=max_length).prepare(examples, "train")
    full, fitted = make_scorer(mode, tok, MC_TASK, max_length=10_000), make_scorer(mode, tok, MC_TASK, max_length)

    def prompt_lengths(scorer, ex):
        encoded = scorer.encode(ex)
        return [len(encoded[0])] if mode == "letter" else [len(ctx) for ctx, _ in encoded]

    expected = tuple(cut for ex in examples
                     if (cut := max(a - b for a, b in zip(prompt_lengths(full, ex), prompt_lengths(fitted, ex),
                                                          strict=True))) > 0)
    assert report.n_examples == 4 and report.max_length == 40 and len(expected) >= 1 and min(expected) > 0
    assert report.tokens_cut == expected
    record = report.to_dict()
    assert record == {"examples": 4, "max_length": 40, "truncated": len(expected),
                      "tokens_cut": {"total": sum(expected), "mean": statistics.fmean(expected),
                                     "median": statistics.median(expected), "max": max(expected)}}
    assert json.loads(json.dumps(record)) == record
    assert report.describe().startswith(f"train: {len(expected)} of 4 examples truncated to max_length 40, by ")
    untouched = make_scorer(mode, tok, MC_TASK, max_length=512).prepare(MC, "validation")
    assert untouched.tokens_cut == () and untouched.describe() == "validation: 3 examples, none truncated " \
        "(max_length 512)"


def _stripping_tokenizer():
    """The tiny letter tokenizer with a Strip normaliser: a continuation of only spaces encodes to no tokens."""
    from tokenizers import normalizers

    tok = tiny_letter_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Strip()
    return tok


def test_unscorable_rows_of_a_jsonl_file_are_all_listed_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {"question": "Which is a mammal?", "choices": ["a whale", "a shark"], "answer": 0},
        {"question": "Pick the empty one", "choices": ["something", ""], "answer": 1},
        {"question": "Which is red?", "choices": ["red", "blue"], "answer": "A"},
        {"question": "Too long?", "choices": ["word " * 30, "b"], "answer": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = jsonl_task(train=path)
    examples = task.load("train")
    assert [(ex.source, ex.line) for ex in examples] == [(str(path), i) for i in range(1, 5)]
    scorer = make_scorer("cloze", _stripping_tokenizer(), task, max_length=20)
    with pytest.raises(UnscorableDataError) as info:
        scorer.prepare(examples, "train")
    err = info.value
    assert [(e.example.line, type(e)) for e in err.errors] == [(2, UnscorableError), (4, UnscorableError)]
    lines = str(err).splitlines()
    assert lines[0] == "2 of the 4 rows of train cannot be scored (cloze scoring, max_length 20); fix or remove them:"
    assert lines[1] == (f"  {path}, line 2 (example 'train-2'): the continuation of choice 1 (' ') encodes to no "
                        "tokens, so it has no likelihood to score")
    assert re.fullmatch(rf"  {re.escape(str(path))}, line 4 \(example 'train-4'\): the continuation of choice 0 "
                        r"\(' word word word word'\.\.\.' word word word word'\) is \d+ tokens long and leaves no "
                        r"room for its context within max_length = 20", lines[2]), lines[2]
    assert len(lines) == 3


def test_unscorable_rows_beyond_twenty_are_counted(tmp_path, tokenizer):
    """The plain tiny tokenizer splits " A" in two: no row can use the letter protocol; 20 are listed."""
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": ["x", "y"], "answer": 0}) + "\n"
                            for i in range(25)))
    task = jsonl_task(validation=path)
    with pytest.raises(UnscorableDataError) as info:
        make_scorer("letter", tokenizer, task).prepare(task.load("validation"), "validation")
    lines = str(info.value).splitlines()
    assert len(info.value.errors) == 25 and all(isinstance(e, AnswerTokenError) for e in info.value.errors)
    assert len(lines) == 22 and lines[-1] == "  ... and 5 more"
    assert lines[1].startswith(f"  {path}, line 1 (example 'validation-1'): answer ' A' is not exactly one token")


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


@pytest.mark.real
@requires_shared
@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_real_prepared_batches_equal_the_per_step_tokenisation(smollm, mode):
    """tests/data/scoring_batches_smollm.safetensors: the per-step path's batches (varlora d2e7fc9) of the first
    validation examples of three tasks with SmolLM2's tokenizer at max_length 128 (BoolQ passages shortened)."""
    _, tok = smollm
    for task_name, n in (("boolq", 6), ("arc_easy", 6), ("winogrande_s", 4)):
        task = get_task(task_name)
        examples = task.load("validation", SHARED_DATA, limit=n)
        scorer = make_scorer(mode, tok, task, max_length=128)
        report = scorer.prepare(examples, "validation")
        assert (len(report.tokens_cut) > 0) == (task_name == "boolq")
        _assert_same_batch(scorer.collate(examples),
                           _golden(DATA / "scoring_batches_smollm.safetensors", f"{task_name}-{mode}-128"))


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
