"""The Hugging Face hub fallback, isolated: which hub data set holds a split and how its rows map to the
release format, so that one parser (and its checks) reads local files and hub rows alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from varlora.tasks.formats import Where

__all__ = [
    "HubSplit",
    "RowConverter",
    "arc_row",
    "boolq_row",
    "fetch_rows",
    "obqa_row",
    "same_row",
    "winogrande_row",
]

RowConverter = Callable[[Mapping[str, Any], Where], dict[str, Any]]


def same_row(row: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """MMLU: the hub rows already have the release fields."""
    return dict(row)


def _choices(choices: Mapping[str, list[str]]) -> list[dict[str, str]]:
    return [{"text": t, "label": label} for t, label in zip(choices["text"], choices["label"], strict=True)]


def arc_row(row: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """allenai/ai2_arc: question is a string and choices are columns."""
    question = {"stem": row["question"], "choices": _choices(row["choices"])}
    return {"id": row["id"], "question": question, "answerKey": row["answerKey"]}


def obqa_row(row: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """allenai/openbookqa: like ARC with ``question_stem``."""
    question = {"stem": row["question_stem"], "choices": _choices(row["choices"])}
    return {"id": row["id"], "question": question, "answerKey": row["answerKey"]}


def winogrande_row(row: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """allenai/winogrande: no qID; make one from the split and row."""
    return {**row, "qID": f"{where.id_prefix}-{where.line}"}


def boolq_row(row: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """google/boolq: the label is called ``answer`` and there is no ``idx``."""
    return {
        "question": row["question"],
        "passage": row["passage"],
        "idx": where.line - 1,
        "label": row["answer"],
    }


@dataclass(frozen=True)
class HubSplit:
    """``datasets.load_dataset(path, name, split=split)``, rows converted by ``convert``."""

    path: str
    name: str | None
    split: str
    convert: RowConverter = same_row

    def describe(self) -> str:
        config = f" ({self.name})" if self.name else ""
        return f"hub {self.path}{config} split {self.split!r}"

    @property
    def id_prefix(self) -> str:
        return f"{self.path}/{self.name}:{self.split}" if self.name else f"{self.path}:{self.split}"


def fetch_rows(spec: HubSplit) -> list[tuple[Where, dict[str, Any]]]:
    """Download the split (network; raises whatever ``datasets`` raises) and convert its rows."""
    import datasets

    rows = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    source = spec.describe()
    out = []
    for line, row in enumerate(rows, start=1):
        where = Where(source, line, spec.id_prefix)
        out.append((where, spec.convert(row, where)))
    return out
