"""One process-wide thread pool for the CPU work that PyTorch's intra-op pool does not take: the noise draws
of :func:`varlora.optim._functional.fill_normal_` and the fused kernels of :mod:`varlora.optim._cpu_kernels`
(ctypes releases the GIL while a kernel runs). Callers size their work by ``torch.get_num_threads()``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["run"]

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _reset() -> None:
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):  # a forked child inherits the pool object but not its threads
    os.register_at_fork(after_in_child=_reset)


def _get() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(8, os.cpu_count() or 1), thread_name_prefix="varlora")
        return _pool


def run(fn: Callable[[int], T], workers: int) -> list[T]:
    """``[fn(0), ..., fn(workers - 1)]``, run on the pool (in the calling thread when ``workers`` is 1)."""
    if workers <= 1:
        return [fn(0)]
    return list(_get().map(fn, range(workers)))
