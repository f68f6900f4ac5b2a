"""Peak memory per stage (varlora.cost): a stage's peak counts what it allocates, not the heap pages an earlier
stage freed but the C allocator kept, and the kind of every figure says how it was measured."""

import sys
from pathlib import Path

import pytest
import torch

from varlora import cost
from varlora.cost import PeakMemory, weakest

MiB = 2**20
linux_glibc = pytest.mark.skipif(not (sys.platform == "linux" and cost._malloc_trim() is not None
                                      and Path("/proc/self/clear_refs").exists()),
                                 reason="needs Linux's clear_refs and glibc's malloc_trim")


def _resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_weakest_is_the_least_trustworthy_kind():
    assert weakest(["rss_peak_trimmed"]) == "rss_peak_trimmed"
    assert weakest(["rss_peak_trimmed", "rss_peak", "rss_peak_trimmed"]) == "rss_peak"
    assert weakest(["rss_peak", "rss_peak_since_start"]) == "rss_peak_since_start"
    assert weakest(["cuda_max_allocated", "a kind from the future"]) == "a kind from the future"


@linux_glibc
def test_a_stage_peak_leaves_out_heap_pages_freed_by_an_earlier_stage():
    """400 MiB in 64 KiB tensors (below glibc's mmap threshold, so from the heap), freed while a small tensor
    allocated after them keeps the heap's top in place: the allocator keeps those pages resident unless
    malloc_trim hands them back. The next stage's peak must not count them."""
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    baseline = memory.read()
    chunks = [torch.ones(16 * 1024) for _ in range(6400)]
    pin = torch.ones(16)
    assert _resident() > baseline + 350 * MiB
    del chunks
    memory.reset()  # the next stage starts
    assert memory.read() < baseline + 100 * MiB
    assert memory.kind == "rss_peak_trimmed"
    del pin


@linux_glibc
def test_a_stage_peak_counts_what_the_stage_allocated():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    baseline = memory.read()
    block = torch.ones(64 * MiB)  # 256 MiB, touched
    peak = memory.read()
    del block
    assert peak >= baseline + 250 * MiB
    memory.reset()
    assert memory.read() < peak - 200 * MiB


def test_without_malloc_trim_the_kind_says_upper_bound(monkeypatch):
    monkeypatch.setattr(cost, "_malloc_trim", lambda: None)
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    memory.read()
    assert memory.kind in ("rss_peak", "rss_peak_since_start")


def test_without_clear_refs_the_peak_is_the_process_peak(monkeypatch):
    real_write = Path.write_text

    def refuse_clear_refs(self, *args, **kwargs):
        if str(self) == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse_clear_refs)
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    assert memory.read() > 0 and memory.kind == "rss_peak_since_start"
