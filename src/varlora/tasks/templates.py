"""Prompt templates: every string the model sees, in one place.

Letter protocol (the published prompts of Laplace-LoRA / IVON-LoRA / BLoB): the model reads the prompt and
is scored by its next-token logits on one answer token per choice. Answers are written as they follow the
prompt, with their leading space: " A", and " True" (what a SentencePiece tokenizer's "True" encodes to).

Cloze protocol (lm-eval-harness style): each choice is a (context, continuation) pair scored by the
log-likelihood of the continuation. WinoGrande uses "partial evaluation": the option fills the blank inside
the context and the rest of the sentence is the (shared) continuation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from varlora.tasks._base import Example

__all__ = [
    "BOOLQ_CLOZE",
    "BOOLQ_CLOZE_ANSWERS",
    "BOOLQ_LETTER",
    "BOOLQ_LETTER_ANSWERS",
    "LETTERS",
    "MC_CLOZE",
    "MC_LETTER",
    "MC_LETTER_CHOICE",
    "TEMPLATES",
    "WINOGRANDE_BLANK",
    "PromptTemplate",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_LETTER = (
    "Select one of the choices that answers the following question: {question} Choices: {choices} Answer:"
)
MC_LETTER_CHOICE = "{letter}. {text}."
MC_CLOZE = "Question: {question}\nAnswer:"
BOOLQ_LETTER = "Answer the question with only True or False: {question} Context: {passage}"
BOOLQ_LETTER_ANSWERS = (" True", " False")
BOOLQ_CLOZE = "{passage}\nQuestion: {question}?\nAnswer:"
BOOLQ_CLOZE_ANSWERS = (" yes", " no")
WINOGRANDE_BLANK = "_"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt style: ``letter(ex) -> (prompt, answers)`` and ``cloze(ex) -> [(context, continuation)]``."""

    name: str
    letter: Callable[[Example], tuple[str, tuple[str, ...]]]
    cloze: Callable[[Example], list[tuple[str, str]]]


def _letter_answers(n: int) -> tuple[str, ...]:
    if n > len(LETTERS):
        raise ValueError(f"the letter protocol supports at most {len(LETTERS)} choices, got {n}")
    return tuple(f" {letter}" for letter in LETTERS[:n])


def _mc_letter(ex: Example) -> tuple[str, tuple[str, ...]]:
    answers = _letter_answers(len(ex.choices))
    pairs = zip(answers, ex.choices, strict=True)
    listed = " ".join(MC_LETTER_CHOICE.format(letter=a.strip(), text=t) for a, t in pairs)
    return MC_LETTER.format(question=ex.question, choices=listed), answers


def _mc_cloze(ex: Example) -> list[tuple[str, str]]:
    context = MC_CLOZE.format(question=ex.question)
    return [(context, f" {choice}") for choice in ex.choices]


def _winogrande_cloze(ex: Example) -> list[tuple[str, str]]:
    # lm-eval-harness: context = sentence[:blank] + option, continuation = " " + sentence[blank + 1:].strip()
    blank = ex.question.index(WINOGRANDE_BLANK)
    continuation = " " + ex.question[blank + 1 :].strip()
    return [(ex.question[:blank] + option, continuation) for option in ex.choices]


def _boolq_letter(ex: Example) -> tuple[str, tuple[str, ...]]:
    return BOOLQ_LETTER.format(question=ex.question, passage=ex.passage or ""), BOOLQ_LETTER_ANSWERS


def _boolq_cloze(ex: Example) -> list[tuple[str, str]]:
    context = BOOLQ_CLOZE.format(question=ex.question, passage=ex.passage or "")
    return [(context, answer) for answer in BOOLQ_CLOZE_ANSWERS]


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("multiple_choice", _mc_letter, _mc_cloze),
        PromptTemplate("winogrande", _mc_letter, _winogrande_cloze),
        PromptTemplate("boolq", _boolq_letter, _boolq_cloze),
    )
}
