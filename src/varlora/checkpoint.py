"""The resumable state of a training run: ``checkpoint.pt``, written atomically every ``train.save_every`` steps.

It holds the step, the training seconds so far, the method's :meth:`~varlora.methods.base.Method.state_dict`
(weights, optimizer and scheduler states) and the RNG states (torch, Python, NumPy, CUDA), so that a run
killed at any moment continues from its last checkpoint bit for bit. Under torchrun rank 0 writes, and
``ranks`` keeps each rank's RNG states and its :meth:`~varlora.methods.base.Method.rank_state` (IVON's noise
generators); a resume must use the same number of processes.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from typing import Any

import numpy as np
import torch

from varlora import _io, distributed
from varlora.config import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


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


def save_checkpoint(session, method, step: int, train_seconds: float) -> None:
    """Write ``checkpoint.pt`` (rank 0; every rank contributes its RNG and rank state)."""
    ranks = distributed.all_gather_objects({"rng": rng_state(), "method": method.rank_state()})
    if not distributed.is_main():
        return
    _io.torch_save({
        "step": step,
        "train_seconds": train_seconds,
        "method_name": method.name,
        "method": method.state_dict(),
        "rng": ranks[0]["rng"],  # this rank's (rank 0's)
        **({"ranks": ranks} if distributed.active() else {}),
    }, session.paths.checkpoint)


def load_checkpoint(session, method) -> tuple[int, float]:
    """Restore ``checkpoint.pt`` into ``method`` and the RNGs; return (step, training seconds)."""
    path = session.paths.checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is unreadable (truncated or corrupted?): {err}; delete it to restart the run") \
            from err
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
