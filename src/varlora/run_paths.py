"""The layout of a run folder (see :mod:`varlora.train`), importable without the training stack."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunPaths", "task_file_stem"]


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def legacy_checkpoint(self) -> Path:
        """The pickled checkpoint of versions before safetensors checkpoints (still resumed, see
        :mod:`varlora.checkpoint`)."""
        return self.root / "checkpoint.pt"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def eval_json(self, task: str) -> Path:
        return self.root / "eval" / f"{task_file_stem(task)}.json"

    def eval_probs(self, task: str) -> Path:
        return self.root / "eval" / f"{task_file_stem(task)}.probs.safetensors"


def task_file_stem(task: str) -> str:
    """A file name for a task: registry names as they are; others (``jsonl:train=/a/b.jsonl,...``) reduced to
    safe characters plus a short hash of the full spec, so that two specs never share a file."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", task):
        return task
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", task)[-48:].strip("_.")
    return f"{readable}-{hashlib.sha1(task.encode()).hexdigest()[:8]}"
