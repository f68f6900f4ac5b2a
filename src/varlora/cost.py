"""What a run costs: wall-clock seconds of each stage and the peak memory reached in it.

Peak memory is what BayesAdapt's harness reports, weights included. Each kind of measurement has a name,
saved with the numbers (``memory_kind``):

- ``cuda_max_allocated``: on a GPU, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- ``rss_peak_trimmed``: on Linux with glibc, the process's peak resident set size (``VmHWM``), reset for each
  stage by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0) right after ``gc.collect()`` and glibc's
  ``malloc_trim(0)`` have handed the heap pages freed by earlier stages back to the OS. Without the trim, the
  allocator keeps those pages resident: in the `cpu` study, a process that had run a Laplace evaluation (12 GB
  peak) recorded 6.9 GB for each of its next runs, a zero-shot evaluation among them.
- ``rss_peak``: the same without the trim (another C library, or records written before it existed): an upper
  bound, since it counts pages the allocator kept from earlier stages of the process.
- ``rss_peak_since_start``: the process's peak so far (``ru_maxrss``), where the reset is impossible: an upper
  bound too.

``EXACT_KINDS`` are the first two; :func:`weakest` names the kind of a figure combined from several.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import resource
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

__all__ = ["EXACT_KINDS", "KINDS_BY_TRUST", "UNNAMED_MEMORY_KIND", "PeakMemory", "weakest"]

KINDS_BY_TRUST = ("cuda_max_allocated", "rss_peak_trimmed", "rss_peak", "rss_peak_since_start")
EXACT_KINDS = frozenset(KINDS_BY_TRUST[:2])
UNNAMED_MEMORY_KIND = "rss_peak"  # a stage or evaluation saved without a kind predates the trim (and ran on a CPU)


def weakest(kinds: Iterable[str]) -> str:
    """The least trustworthy of ``kinds`` (order: ``KINDS_BY_TRUST``; an unknown name counts as the least)."""
    rank = {kind: i for i, kind in enumerate(KINDS_BY_TRUST)}
    return max(kinds, key=lambda kind: rank.get(kind, len(rank)))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None under another C library."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


class PeakMemory:
    """``reset()`` at the start of a stage, ``read()`` (bytes) at its end; ``kind`` names what is measured
    (the weakest kind of any stage measured so far)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak_trimmed"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        gc.collect()
        trim = _malloc_trim()
        if trim is None:
            self.kind = weakest([self.kind, "rss_peak"])
        else:
            trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "rss_peak_since_start"

    def read(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        self.kind = "rss_peak_since_start"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
