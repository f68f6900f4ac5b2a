"""What a run costs: wall-clock seconds of each stage and the peak memory reached in it.

Peak memory is what BayesAdapt's harness reports, weights included: on a GPU
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the process's peak resident
set size (``VmHWM``), reset for each stage by writing 5 to ``/proc/self/clear_refs`` (Linux ≥ 4.0). Where
that reset is not possible the peak is the process's so far (``ru_maxrss``), and ``kind`` says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """``reset()`` at the start of a stage, ``read()`` (bytes) at its end; ``kind`` names what is measured."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
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
