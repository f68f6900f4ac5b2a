"""The resumable state of a training run: ``checkpoint.safetensors``, written atomically every
``train.save_every`` steps.

It holds the step, the training seconds so far, the method's :meth:`~varlora.methods.base.Method.state_dict`
(weights, optimizer and scheduler states) and the RNG states (torch, Python, NumPy, CUDA), so that a run
killed at any moment continues from its last checkpoint bit for bit. Under torchrun rank 0 writes, and
``ranks`` keeps each rank's RNG states and its :meth:`~varlora.methods.base.Method.rank_state` (IVON's noise
generators); a resume must use the same number of processes.

No pickle: the tensors are stored as safetensors and everything else as JSON (:mod:`varlora._state_file`), so a
checkpoint from an untrusted source cannot run code when it is loaded. A ``checkpoint.pt`` of an older version
(a ``torch.save`` pickle) still resumes: it is read with ``torch.load(weights_only=True)``, allowing exactly the
NumPy globals its RNG state needs (:data:`LEGACY_GLOBALS`); a pickle that needs any other is refused, naming the
file. The next checkpoint is written in the new format and the old file removed.

Files that cannot be trusted are reported by name, never as a traceback of the reader: a checkpoint carries a
SHA-256 of its content (an old ``checkpoint.pt`` is a zip archive whose records carry CRC-32s), checked before it
is read; the files of ``final/`` are checked against the SHA-256 digests that :func:`file_digests` recorded when
they were saved (:func:`verify_digests`). A write that fails (a full disk, a file size limit) raises
:class:`SaveError` naming the file, and leaves the previous file as it was (the writes are atomic,
:mod:`varlora._io`).
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from varlora import _io, _state_file, distributed, sharding
from varlora.config import ConfigError
from varlora.run_paths import RunPaths

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "find_checkpoint", "rng_state", "set_rng_state",
           "SaveError", "saving", "file_digests", "file_sha256", "verify_digests", "LEGACY_GLOBALS"]

#: The only globals a ``checkpoint.pt`` written by varlora before safetensors checkpoints needs beyond what
#: ``torch.load(weights_only=True)`` allows: those of the NumPy RNG state (an array of uint32).
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # NumPy 2, NumPy 1
LEGACY_GLOBALS = [_multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


class SaveError(OSError):
    """A file of a run could not be written (disk full, file size limit, ...); the message names the file."""


@contextlib.contextmanager
def saving(path: str | Path, kept: str) -> Iterator[None]:
    """Turn a failed write of ``path`` inside the block into a one-line :class:`SaveError`; ``kept`` says what
    is still intact (e.g. "the previous checkpoint is kept")."""
    try:
        yield
    except SaveError:
        raise
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SaveError(f"cannot write {path} ({reason}); {kept}") from err


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_checkpoint(paths: RunPaths) -> Path | None:
    """The checkpoint of a run folder: ``checkpoint.safetensors``, else an older version's ``checkpoint.pt``,
    else None."""
    return next((p for p in (paths.checkpoint, paths.legacy_checkpoint) if p.is_file()), None)


def save_checkpoint(session, method, step: int, train_seconds: float) -> None:
    """Write ``checkpoint.safetensors`` (rank 0; every rank contributes its RNG and rank state), then remove an
    older version's ``checkpoint.pt`` that the run resumed from. The state of a model sharded by FSDP2 is gathered
    whole first, by every rank, so the file holds full tensors, as without sharding."""
    sharded = sharding.is_sharded(session.model)
    method_state = sharding.full_tensors(method.state_dict()) if sharded else None
    ranks = distributed.all_gather_objects({"rng": rng_state(), "method": method.rank_state()})
    if not distributed.is_main():
        return
    data = _state_file.dumps({  # serialised first, so that a failing write is a plain OSError
        "step": step,
        "train_seconds": train_seconds,
        "method_name": method.name,
        "method": method_state if sharded else method.state_dict(),
        "rng": ranks[0]["rng"],  # this rank's (rank 0's)
        **({"ranks": ranks} if distributed.active() else {}),
    })
    path = session.paths.checkpoint
    with saving(path, "the previous checkpoint is kept: free some space and rerun the same command to continue"):
        with _io.atomic_path(path) as tmp:
            tmp.write_bytes(data)
    session.paths.legacy_checkpoint.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The content of a checkpoint file (either format), tensors on the CPU.

    Raises ValueError naming the file when it is truncated or corrupted, or when it is an old pickle that needs
    a global outside :data:`LEGACY_GLOBALS` (which is not unpickled: it could run code).
    """
    path = Path(path)
    remedy = "delete it to restart the run"
    if path.suffix != ".pt":
        try:
            return _state_file.load(path)
        except ValueError as err:
            raise ValueError(f"{path} is unreadable (truncated or corrupted: {err}); {remedy}") from err
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # every record's CRC-32
        if damaged is not None:
            raise ValueError(f"record {damaged} fails its CRC-32 check")
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"{path} is unreadable (truncated or corrupted: {err}); {remedy}") from err
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in LEGACY_GLOBALS}
        needs = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        raise ValueError(f"{path} is not a checkpoint written by varlora: it is a pickle that needs "
                         f"{', '.join(needs) or 'a type outside the allowed ones'}, which varlora's checkpoints never "
                         f"hold, so it was not loaded (unpickling it could run code); {remedy}") from err
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise ValueError(f"{path} is unreadable (truncated or corrupted: {err}); {remedy}") from err


def load_checkpoint(session, method) -> tuple[int, float]:
    """Restore the run's checkpoint (:func:`find_checkpoint`) into ``method`` and the RNGs; return (step,
    training seconds)."""
    path = find_checkpoint(session.paths)
    if path is None:
        raise FileNotFoundError(f"{session.paths.root} holds no checkpoint")
    state = read_checkpoint(path)
    if state.get("method_name") != method.name:
        raise ConfigError(f"{path} was written by method {state.get('method_name')!r}, not {method.name!r}")
    saved_world = len(state.get("ranks", [None]))
    if saved_world != distributed.world_size():
        raise ConfigError(f"{path} was written by {saved_world} process(es); resume it with "
                          f"as many (this run has {distributed.world_size()})")
    method.load_state_dict(state["method"])
    own = state["ranks"][distributed.rank()] if "ranks" in state else {"rng": state["rng"]}
    if "ranks" in state:
        method.load_rank_state(own.get("method"))
    set_rng_state(own["rng"])
    return state["step"], state["train_seconds"]


def file_digests(folder: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (sub-folders included), by path relative to it; ``skip`` names
    files to leave out."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


def verify_digests(folder: str | Path, digests: dict[str, str], remedy: str = "") -> None:
    """Raise naming the first file under ``folder`` that is missing (FileNotFoundError) or whose content is not
    the one recorded in ``digests`` (ValueError: truncated or corrupted). ``remedy`` ends the message."""
    folder = Path(folder)
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing{remedy}")
        if file_sha256(path) != digest:
            raise ValueError(f"{path} is truncated or corrupted (its SHA-256 is not the one recorded when it was "
                             f"saved){remedy}")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
