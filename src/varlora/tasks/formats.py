"""Readers of the original release formats: one parser per format; errors name the file, line and field.

A parser maps one JSON record to an :class:`Example`, or to ``None`` when the protocol filters the record out
(ARC/OBQA questions without exactly four choices). Formats:

- ``arc`` (ARC, OpenBookQA): ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``;
  the label is the position of ``answerKey`` among the choice labels ("A".."D" or "1".."4" alike).
- ``winogrande``: ``{"qID", "sentence" (one "_" blank), "option1", "option2", "answer": "1" | "2"}``.
- ``boolq``: ``{"question", "passage", "idx", "label": true | false}``; choices ("True", "False").
- ``mmlu``: ``{"question", "choices": [4 strings], "answer": 0..3}``.
- ``generic`` (bring your own data): ``{"question", "choices": [strings], "answer": int index | letter}``
  and an optional ``"id"``; the number of choices may vary between records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from varlora.tasks._base import DataFormatError, Example
from varlora.tasks.templates import LETTERS, WINOGRANDE_BLANK

__all__ = [
    "PARSERS",
    "Parser",
    "Where",
    "parse_arc",
    "parse_boolq",
    "parse_generic",
    "parse_mmlu",
    "parse_winogrande",
    "read_jsonl",
]


@dataclass(frozen=True)
class Where:
    """A record's origin: ``source`` (file or hub split), 1-based ``line``, a prefix for made-up ids."""

    source: str
    line: int
    id_prefix: str

    def error(self, field: str | None, reason: str) -> DataFormatError:
        return DataFormatError(self.source, self.line, field, reason)

    def locate(self, example: Example) -> Example:
        """``example`` stamped with this origin (:attr:`Example.source`, :attr:`Example.line`)."""
        return replace(example, source=self.source, line=self.line)


Parser = Callable[[Mapping[str, Any], Where], Example | None]


def read_jsonl(path: Path, id_prefix: str) -> Iterator[tuple[Where, dict[str, Any]]]:
    """Yield (origin, record) per non-blank line of a JSON-lines file; a bad line raises DataFormatError."""
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = Where(str(path), number, id_prefix)
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise where.error(None, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise where.error(None, f"expected a JSON object, got {type(record).__name__}")
            yield where, record


def _field(
    record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: Where, name: str = ""
) -> Any:
    """``record[key]``, checked to be an instance of ``kind`` (bool is not accepted as an int)."""
    name = name or key
    if key not in record:
        raise where.error(name, "missing")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise where.error(name, f"expected {expected}, got {type(value).__name__} {value!r:.60}")
    return value


def _strings(record: Mapping[str, Any], key: str, where: Where) -> list[str]:
    values = _field(record, key, list, where)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise where.error(f"{key}[{i}]", f"expected str, got {type(value).__name__} {value!r:.60}")
    return values


def parse_arc(record: Mapping[str, Any], where: Where, num_choices: int = 4) -> Example | None:
    """ARC / OpenBookQA; questions without exactly ``num_choices`` choices are filtered out (None)."""
    ident = _field(record, "id", str, where)
    question = _field(record, "question", dict, where)
    stem = _field(question, "stem", str, where, "question.stem")
    texts, labels = [], []
    for i, choice in enumerate(_field(question, "choices", list, where, "question.choices")):
        name = f"question.choices[{i}]"
        if not isinstance(choice, dict):
            raise where.error(
                name, f"expected an object with 'text' and 'label', got {type(choice).__name__}"
            )
        texts.append(_field(choice, "text", str, where, f"{name}.text"))
        labels.append(_field(choice, "label", str, where, f"{name}.label"))
    key = _field(record, "answerKey", str, where)
    if key not in labels:
        raise where.error("answerKey", f"{key!r} is not one of the choice labels {labels}")
    if len(texts) != num_choices:
        return None
    return Example(ident, stem, tuple(texts), labels.index(key))


def parse_winogrande(record: Mapping[str, Any], where: Where) -> Example:
    ident = _field(record, "qID", str, where)
    sentence = _field(record, "sentence", str, where)
    if (blanks := sentence.count(WINOGRANDE_BLANK)) != 1:
        raise where.error("sentence", f"must contain exactly one {WINOGRANDE_BLANK!r} blank, found {blanks}")
    options = (_field(record, "option1", str, where), _field(record, "option2", str, where))
    answer = _field(record, "answer", str, where)
    if answer not in ("1", "2"):
        raise where.error("answer", f"must be '1' or '2', got {answer!r}")
    return Example(ident, sentence, options, int(answer) - 1)


def parse_boolq(record: Mapping[str, Any], where: Where) -> Example:
    question = _field(record, "question", str, where)
    passage = _field(record, "passage", str, where)
    idx = _field(record, "idx", int, where)
    label = _field(record, "label", bool, where)
    return Example(
        f"{where.id_prefix}-{idx}", question, ("True", "False"), 0 if label else 1, passage=passage
    )


def parse_mmlu(record: Mapping[str, Any], where: Where, num_choices: int = 4) -> Example:
    question = _field(record, "question", str, where)
    choices = _strings(record, "choices", where)
    if len(choices) != num_choices:
        raise where.error("choices", f"expected {num_choices} choices, got {len(choices)}")
    answer = _field(record, "answer", int, where)
    if not 0 <= answer < num_choices:
        raise where.error("answer", f"{answer} out of range for {num_choices} choices")
    return Example(f"{where.id_prefix}-{where.line}", question, tuple(choices), answer)


def parse_generic(record: Mapping[str, Any], where: Where) -> Example:
    """The bring-your-own format; ``answer`` is a 0-based index or a letter ("A" or "a" = first choice)."""
    question = _field(record, "question", str, where)
    choices = _strings(record, "choices", where)
    if len(choices) < 2:
        raise where.error("choices", f"needs at least 2 choices, got {len(choices)}")
    answer = _field(record, "answer", (int, str), where)
    if isinstance(answer, str):
        if len(answer) != 1 or answer.upper() not in LETTERS:
            raise where.error("answer", f"expected an index or a single letter, got {answer!r}")
        index = LETTERS.index(answer.upper())
    else:
        index = answer
    if not 0 <= index < len(choices):
        raise where.error("answer", f"{answer!r} out of range for {len(choices)} choices")
    ident = (
        str(_field(record, "id", (str, int), where)) if "id" in record else f"{where.id_prefix}-{where.line}"
    )
    return Example(ident, question, tuple(choices), index)


PARSERS: dict[str, Parser] = {
    "arc": parse_arc,
    "winogrande": parse_winogrande,
    "boolq": parse_boolq,
    "mmlu": parse_mmlu,
    "generic": parse_generic,
}
