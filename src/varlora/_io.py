"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_path", "atomic_dir", "cache_dir", "write_json", "write_text", "torch_save", "read_jsonl",
           "read_safetensors"]

#: The environment variable naming the folder where varlora keeps files between runs.
CACHE_ENV = "VARLORA_CACHE"


def cache_dir() -> Path:
    """Where varlora keeps files between runs (the demo model): ``$VARLORA_CACHE``, default
    ``~/.cache/varlora``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "varlora"


def _create(folder: Path, prefix: str, suffix: str, make: Callable[[Path], None]) -> Path:
    """A new, uniquely named entry of ``folder`` created by ``make`` (which fails if it exists)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            make(path)
        except FileExistsError:
            continue
        return path


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The temporary file is created with the mode ``open`` gives a new file (0666 less the umask, and any default
    ACL of the folder), so the result has it too; the process umask is never touched (thread-safe).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create(path.parent, f".{path.name}.", ".tmp", _new_file)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # not on this file system or kernel
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _previous(path: Path) -> Path:
    """Where :func:`atomic_dir` parks the old folder while the new one moves in (where it cannot swap them)."""
    return path.with_name(f".{path.name}.previous")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success replace ``path`` with it.

    At no moment is there nothing to find: an existing ``path`` is swapped with the new folder in one
    ``renameat2(RENAME_EXCHANGE)`` (Linux), then deleted. Elsewhere the old folder is first renamed to
    ``.<name>.previous``, the new one renamed into place, then the old one deleted; a crash between the two
    renames leaves the old folder under that name, and the next ``atomic_dir(path)`` puts it back before
    anything else. The folder gets the mode ``mkdir`` gives (0777 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _previous(path)
    if previous.exists() and not path.exists():  # an interrupted replacement: the old folder is the valid one
        os.replace(previous, path)
    tmp = _create(path.parent, f".{path.name}.", ".tmp", lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # tmp now holds the old folder, deleted below
            pass
        else:
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
            os.replace(tmp, path)
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, read in one open.

    Raises ValueError naming the file when it is missing, truncated or corrupted (safetensors' own error is not
    an OSError, so callers would otherwise see a bare traceback).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is unreadable (truncated or corrupted?): {err}") from err


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (a run killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number}: not valid JSON ({err.msg})") from err
    return rows
