"""The string-keyed task registry: release data sets (local files, hub fallback) and user JSONL data."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

from varlora.tasks._base import SPLITS, Example, Split, Task, resolve_data_dir
from varlora.tasks.formats import (
    Parser,
    parse_arc,
    parse_boolq,
    parse_generic,
    parse_mmlu,
    parse_winogrande,
    read_jsonl,
)
from varlora.tasks.hub import (
    HubSplit,
    RowConverter,
    arc_row,
    boolq_row,
    fetch_rows,
    obqa_row,
    same_row,
    winogrande_row,
)
from varlora.tasks.templates import TEMPLATES, PromptTemplate

__all__ = [
    "BOOLQ_LOCAL_TRAIN_ROWS",
    "JSONL_PREFIX",
    "MMLU_SUBJECTS",
    "JsonlTask",
    "LocalSplit",
    "ReleaseTask",
    "get_task",
    "jsonl_task",
    "list_tasks",
    "register_task",
]

BOOLQ_LOCAL_TRAIN_ROWS = 2000
MMLU_SUBJECTS = (
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_physics",
    "computer_security",
    "high_school_physics",
)
JSONL_PREFIX = "jsonl:"


@dataclass(frozen=True)
class LocalSplit:
    """A file under the data folder; ``rows = (start, stop)`` keeps records [start, stop) (stop None: all)."""

    path: str
    rows: tuple[int, int | None] | None = None


@dataclass(frozen=True, eq=False, repr=False)
class ReleaseTask(Task):
    """A published data set read from its release files under the data folder, else from the hub."""

    name: str
    num_choices: int
    template: PromptTemplate
    parser: Parser
    local: Mapping[Split, LocalSplit]
    hub: Mapping[Split, HubSplit] = field(default_factory=dict)
    note: str = ""

    def _local_path(self, split: Split, data_dir: str | os.PathLike[str] | None) -> Path | None:
        root = resolve_data_dir(data_dir)
        return None if root is None else root / self.local[split].path

    def source(self, split: Split, data_dir: str | os.PathLike[str] | None = None) -> str:
        path = self._local_path(split, data_dir)
        note = f"; {self.note}" if self.note else ""
        if path is None or not path.is_file():
            hub = self.hub[split].describe() if split in self.hub else "unavailable (no local file nor hub)"
            return f"{self.name} {split}: {hub}{note}"
        rows = self.local[split].rows
        if rows is not None:
            span = f"records [{rows[0]}, {'end' if rows[1] is None else rows[1]})"
            note = f", {span} (a fixed split of this file, not the release's {split}){note}"
        return f"{self.name} {split}: {path}{note}"

    def _load(self, split: Split, data_dir: str | os.PathLike[str] | None) -> list[Example]:
        path = self._local_path(split, data_dir)
        if path is not None and path.is_file():
            records = read_jsonl(path, f"{path.parent.name}/{path.stem}")
            if (rows := self.local[split].rows) is not None:
                records = itertools.islice(records, *rows)
        else:
            missing = "no local data folder" if path is None else f"{path} not found"
            if split not in self.hub:
                raise FileNotFoundError(f"{self.name} {split}: {missing}, and the task has no hub source")
            try:
                records = fetch_rows(self.hub[split])
            except Exception as e:  # network, auth, missing dataset: all mean "not available"
                raise FileNotFoundError(
                    f"{self.name} {split}: {missing}, and loading {self.hub[split].describe()} failed: {e}"
                ) from e
        return [where.locate(ex) for where, record in records if (ex := self.parser(record, where)) is not None]


@dataclass(frozen=True, eq=False, repr=False)
class JsonlTask(Task):
    """User data in the generic format (:func:`varlora.tasks.formats.parse_generic`), a file per split."""

    name: str
    files: Mapping[Split, Path]
    template: PromptTemplate = TEMPLATES["multiple_choice"]

    @cached_property
    def num_choices(self) -> int:
        return max(len(ex.choices) for split in self.files for ex in self._load(split, None))

    def source(self, split: Split, data_dir: str | os.PathLike[str] | None = None) -> str:
        return f"{self.name} {split}: {self._path(split)}"

    def _path(self, split: Split) -> Path:
        if split not in self.files:
            raise ValueError(f"{self.name} has no {split} file (give one as {JSONL_PREFIX}{split}=PATH)")
        return self.files[split]

    def _load(self, split: Split, data_dir: str | os.PathLike[str] | None) -> list[Example]:
        """``data_dir`` is not used: the files are explicit paths."""
        path = self._path(split)
        return [where.locate(parse_generic(record, where)) for where, record in read_jsonl(path, path.stem)]


def jsonl_task(
    train: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
) -> JsonlTask:
    """A task over your own JSONL files (either split may be omitted); relative paths are resolved now."""
    files = {
        s: Path(p).expanduser().resolve() for s, p in (("train", train), ("validation", validation)) if p
    }
    if not files:
        raise ValueError("jsonl_task needs a train or a validation file")
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"{split} file {path} not found")
    default = ",".join(f"{s}={p}" for s, p in files.items())
    return JsonlTask(name or f"{JSONL_PREFIX}{default}", files)


def _task_from_spec(spec: str) -> JsonlTask:
    """A JSONL task from ``jsonl:TRAIN[,VALIDATION]`` (file paths), ``jsonl:train=PATH,validation=PATH``
    (either key alone too, e.g. evaluation-only data) or ``jsonl:FOLDER`` (its train.jsonl and/or
    validation.jsonl). Paths may not contain ``,``."""
    body = spec.removeprefix(JSONL_PREFIX)
    usage = "expected jsonl:TRAIN[,VALIDATION], jsonl:train=PATH,validation=PATH or jsonl:FOLDER"
    if not body:
        raise ValueError(f"bad task spec {spec!r}: {usage}")
    if "=" in body:
        files: dict[str, str] = {}
        for part in body.split(","):
            split, _, path = part.partition("=")
            if split not in SPLITS or not path or split in files:
                raise ValueError(f"bad task spec {spec!r}: {usage}")
            files[split] = path
        return jsonl_task(**files, name=spec)
    folder = Path(body).expanduser()
    if folder.is_dir():
        found = {s: str(folder / f"{s}.jsonl") for s in SPLITS if (folder / f"{s}.jsonl").is_file()}
        if not found:
            raise ValueError(
                f"bad task spec {spec!r}: {folder} holds neither train.jsonl nor validation.jsonl"
            )
        return jsonl_task(**found, name=spec)
    paths = body.split(",")
    if len(paths) > 2 or not all(paths):
        raise ValueError(f"bad task spec {spec!r}: {usage}")
    return jsonl_task(*paths, name=spec)


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add ``task`` under ``task.name``; re-registering a name needs ``overwrite=True``."""
    if task.name in _REGISTRY and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """A registered task by name, or a JSONL task from a ``jsonl:`` spec (see :func:`_task_from_spec`)."""
    if name.startswith(JSONL_PREFIX):
        return _task_from_spec(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(list_tasks())}, or {JSONL_PREFIX}...")
    return _REGISTRY[name]


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def _hub(
    path: str, name: str | None, convert: RowConverter, train: str = "train", validation: str = "validation"
) -> dict[Split, HubSplit]:
    return {
        "train": HubSplit(path, name, train, convert),
        "validation": HubSplit(path, name, validation, convert),
    }


def _register_release_tasks() -> None:
    four = partial(parse_arc, num_choices=4)
    mc, note = TEMPLATES["multiple_choice"], "questions with exactly 4 choices"
    for key, release in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        local = {
            "train": LocalSplit(f"arc/{release}-Train.jsonl"),
            "validation": LocalSplit(f"arc/{release}-Dev.jsonl"),
        }
        register_task(ReleaseTask(key, 4, mc, four, local, _hub("allenai/ai2_arc", release, arc_row), note))
    local = {"train": LocalSplit("openbookqa/train.jsonl"), "validation": LocalSplit("openbookqa/dev.jsonl")}
    register_task(ReleaseTask("obqa", 4, mc, four, local, _hub("allenai/openbookqa", "main", obqa_row), note))
    for size in ("xs", "s", "m", "l"):
        local = {
            "train": LocalSplit(f"winogrande/train_{size}.jsonl"),
            "validation": LocalSplit("winogrande/dev.jsonl"),
        }
        hub = _hub("allenai/winogrande", f"winogrande_{size}", winogrande_row)
        register_task(
            ReleaseTask(f"winogrande_{size}", 2, TEMPLATES["winogrande"], parse_winogrande, local, hub)
        )
    local = {
        "train": LocalSplit("boolq/val.jsonl", rows=(0, BOOLQ_LOCAL_TRAIN_ROWS)),
        "validation": LocalSplit("boolq/val.jsonl", rows=(BOOLQ_LOCAL_TRAIN_ROWS, None)),
    }
    register_task(
        ReleaseTask("boolq", 2, TEMPLATES["boolq"], parse_boolq, local, _hub("google/boolq", None, boolq_row))
    )
    note = "MMLU: train = the 5-question dev split, validation = the test split"
    for subject in MMLU_SUBJECTS:
        local = {
            "train": LocalSplit(f"mmlu/{subject}-dev.jsonl"),
            "validation": LocalSplit(f"mmlu/{subject}-test.jsonl"),
        }
        hub = _hub("cais/mmlu", subject, same_row, train="dev", validation="test")
        register_task(ReleaseTask(f"mmlu_{subject}", 4, mc, parse_mmlu, local, hub, note))


_register_release_tasks()
