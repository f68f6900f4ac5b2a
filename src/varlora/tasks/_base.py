"""Core types of the task registry: the example record, the task interface, errors and data-dir resolution."""

from __future__ import annotations

import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from varlora.tasks.templates import PromptTemplate

__all__ = [
    "DATA_DIR_ENV",
    "IGNORE_SHARED_ENV",
    "SPLITS",
    "DataFormatError",
    "Example",
    "Split",
    "Task",
    "resolve_data_dir",
    "shared_dir",
    "subsample",
]

Split = Literal["train", "validation"]
SPLITS: tuple[Split, ...] = ("train", "validation")
DATA_DIR_ENV = "VARLORA_DATA_DIR"
IGNORE_SHARED_ENV = "VARLORA_IGNORE_SHARED"


def shared_dir() -> Path | None:
    """``../shared`` (relative to the working directory) when it exists, else ``None``.

    Only the command line and the demo look there (:func:`resolve_data_dir` does not): the library takes
    explicit paths or environment variables.

    ``None`` also when ``$VARLORA_IGNORE_SHARED`` is set to anything but ``""`` or ``"0"``: a machine without
    the shared folder, simulated (to test that the demo needs only PyPI).
    """
    if os.environ.get(IGNORE_SHARED_ENV, "") not in ("", "0"):
        return None
    path = Path.cwd() / ".." / "shared"
    return path.resolve() if path.is_dir() else None


class DataFormatError(ValueError):
    """A malformed data record: names the file (or hub split), the 1-based line (or row) and the field."""

    def __init__(self, source: str, line: int, field: str | None, reason: str) -> None:
        self.source, self.line, self.field, self.reason = source, line, field, reason
        where = f"{source}, line {line}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Example:
    """One multiple-choice question; ``label`` indexes ``choices``; ``passage`` is a reading-task context.

    ``source`` and ``line`` say where the row was read (file or hub split, 1-based line or row), so that a row
    found unusable later (e.g. by the scorer) can be named; they are not part of the example's identity
    (equality and hash ignore them).
    """

    id: str
    question: str
    choices: tuple[str, ...]
    label: int
    passage: str | None = None
    source: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"example {self.id!r} has no choices")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(
                f"example {self.id!r}: label {self.label} out of range for {len(self.choices)} choices"
            )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data folder, first match wins.

    1. ``data_dir`` when given;
    2. the ``VARLORA_DATA_DIR`` environment variable when set (non-empty; the ``varlora`` command sets it to
       ``../shared/data`` when that folder exists and the variable is unset, see :func:`shared_dir`);
    3. ``None``: no local data; tasks then load from the Hugging Face hub.

    An explicit folder (1 or 2) that does not exist is an error rather than a silent fall-through.
    """
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            origin = "data_dir" if data_dir is not None else DATA_DIR_ENV
            raise FileNotFoundError(f"{origin} points to {str(path)!r}, which is not a folder")
        return path
    return None


def subsample(examples: list[Example], limit: int | None, seed: int | None) -> list[Example]:
    """At most ``limit`` examples: the first ones when ``seed`` is None, else a seeded uniform random subset.

    The subset keeps file order, and depends only on (len(examples), limit, seed).
    """
    if limit is None or limit >= len(examples):
        return examples
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if seed is None:
        return examples[:limit]
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


class Task(ABC):
    """A multiple-choice data set: where its splits come from and how its examples become prompts.

    Subclasses provide ``name``, ``template`` and ``num_choices`` (the largest number of choices of an
    example: scores are padded to it) and implement ``source`` and ``_load``.
    """

    name: str
    template: PromptTemplate
    num_choices: int

    @abstractmethod
    def source(self, split: Split, data_dir: str | os.PathLike[str] | None = None) -> str:
        """A one-line description of where ``split`` is read from, for run logs and result files."""

    @abstractmethod
    def _load(self, split: Split, data_dir: str | os.PathLike[str] | None) -> list[Example]:
        """All examples of ``split``, in file order."""

    def load(
        self,
        split: Split,
        data_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        seed: int | None = None,
    ) -> list[Example]:
        """The examples of ``split``; ``limit`` and ``seed`` pick a fixed subset (:func:`subsample`)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return subsample(self._load(split, data_dir), limit, seed)

    def letter_prompt(self, example: Example) -> tuple[str, tuple[str, ...]]:
        """The letter-protocol prompt and the answer strings, one per choice, as they follow the prompt."""
        return self.template.letter(example)

    def cloze_pairs(self, example: Example) -> list[tuple[str, str]]:
        """(context, continuation) per choice; a choice's cloze score is log p(continuation | context)."""
        return self.template.cloze(example)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
