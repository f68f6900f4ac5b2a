"""The record of a finished run: the small files a report reads, kept beside the report so that it can be committed.

A run folder (:mod:`varlora.train`) holds checkpoints and adapters, megabytes per run, in an ignored ``runs/``
folder that a new machine does not have. A report needs only a few kilobytes of it: the config, the summary
(metrics and cost), the training curve, and the saved probabilities of every evaluation. An experiment copies
those into ``<results>/runs/<task>/<variant>/seed<seed>/`` as each run finishes (:func:`record_run`); the report
is built from the records, and a rerun of the experiment skips every recorded run, so that a long study
continues from its committed results on any machine. A record holds::

    config.json  summary.json  metrics.jsonl
    eval/<task>.json  eval/<task>.probs.safetensors
    posterior_scale.json        σ / |m| of the saved posterior (:func:`varlora.report.posterior_scale`), or null

A record is written whole or not at all (:func:`varlora._io.atomic_dir`); a run folder without ``summary.json``
(unfinished) is never recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from varlora import _io
from varlora.config import ConfigError, RunConfig
from varlora.run_paths import RunPaths

__all__ = ["record_run", "is_recorded", "check_config", "recorded_posterior_scale", "RECORDS_FOLDER"]

#: the records' folder inside a report folder
RECORDS_FOLDER = "runs"
POSTERIOR_SCALE = "posterior_scale.json"
_TOP_FILES = ("config.json", "summary.json", "metrics.jsonl")
_EVAL_SUFFIXES = (".json", ".probs.safetensors")


def is_recorded(record: str | Path) -> bool:
    """Whether ``record`` holds a complete record (its summary is written last, inside the atomic copy)."""
    return (Path(record) / "summary.json").is_file()


def record_run(run_dir: str | Path, record: str | Path) -> None:
    """Copy the report's files of the finished run ``run_dir`` into ``record`` (replaced whole, atomically)."""
    from varlora.report import posterior_scale

    paths = RunPaths(Path(run_dir))
    summary_path = paths.root / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{paths.root} is not a finished run (no summary.json): nothing to record")
    method = json.loads(summary_path.read_text())["method"]
    with _io.atomic_dir(record) as tmp:
        for name in _TOP_FILES:
            if (paths.root / name).is_file():
                shutil.copyfile(paths.root / name, tmp / name)
        (tmp / "eval").mkdir()
        for file in sorted((paths.root / "eval").iterdir()):
            if file.is_file() and file.name.endswith(_EVAL_SUFFIXES):
                shutil.copyfile(file, tmp / "eval" / file.name)
        (tmp / POSTERIOR_SCALE).write_text(json.dumps(posterior_scale(paths.root, method)) + "\n")


def check_config(record: str | Path, config: RunConfig) -> None:
    """Refuse a run whose record was made with another config, naming the first field that differs (the same
    rule as a run folder's, :meth:`~varlora.config.RunConfig.difference`)."""
    saved = Path(record) / "config.json"
    if is_recorded(record) and saved.is_file():
        diff = RunConfig.load(saved).difference(config)
        if diff:
            raise ConfigError(f"{record} records a run with another config ({diff}); delete the record to run "
                              "it again, or use the same options")


def recorded_posterior_scale(record: str | Path) -> dict[str, Any] | None:
    """The σ / |m| summary stored with a record (None where the method saves no mean-field posterior)."""
    path = Path(record) / POSTERIOR_SCALE
    return json.loads(path.read_text()) if path.is_file() else None
