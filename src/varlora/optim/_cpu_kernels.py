"""The fused fp32 CPU kernels of IVON (``_cpu_kernels.c``): built on first use, called through ctypes.

The C source ships with the package and is compiled with the system C compiler (``$CC``, else ``cc``) into
a shared library cached under ``$VARLORA_CACHE/kernels`` (default ``~/.cache/varlora/kernels``), named by a
hash of the source, the flags, the compiler and the CPU it targets, so a new version or another CPU gets its
own build. The library is written to a temporary name and renamed into place, so concurrent first uses are
safe. It needs no PyTorch headers (it sees plain float arrays), so it builds in well under a second.

**Flags.** :data:`BASE_FLAGS` always; then the first flag of :func:`arch_flag_candidates` that the compiler
accepts without a diagnostic (``-march=native`` on x86, ``-mcpu=native`` on aarch64/POWER, ``-mcpu=apple-m1``
as Apple clang's fallback, none if the compiler takes none: a portable build), and ``-fopenmp-simd`` if it is
accepted. The CPU that ``-march/-mcpu=native`` resolves to (from the driver's ``-###`` expansion) is part of
the hash: a library built for another CPU (a home folder shared across machines) is never loaded here.

**Vector math.** On x86-64 glibc the normal generator calls the SIMD ``logf``/``sinf``/``cosf`` of glibc's
libmvec. Where that library is missing (the build or the load fails), the source is rebuilt with
``-DVL_NO_LIBMVEC``: the same code on scalar libm calls, slower and equal to rounding.

**Threads.** Every kernel is element-wise, so a call is split into ``torch.get_num_threads()`` contiguous
ranges of the concatenated elements (at least :data:`MIN_PER_THREAD` each) run on
:mod:`~varlora.optim._threads` (ctypes releases the GIL). The results do not depend on the number of threads.

If no compiler works, :func:`load` raises :class:`KernelBuildError` with the compiler's message and
:func:`available` is False; :class:`~varlora.optim.IVON` then runs its ``torch._foreach_*`` path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from varlora._io import cache_dir as _cache_root
from varlora.optim import _threads

__all__ = ["BASE_FLAGS", "KernelBuildError", "accumulate", "arch_flag_candidates", "available", "build_error",
           "cache_dir", "fill_normal", "flags", "load", "perturb", "supports", "update"]

#: Flags of every build: IEEE semantics (no -ffast-math), FMA contraction allowed, no errno from libm.
BASE_FLAGS = ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11"]
#: Elements below which a kernel call stays in the calling thread (about 30 us of work).
MIN_PER_THREAD = 1 << 16


class KernelBuildError(RuntimeError):
    """The fused kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$VARLORA_CACHE/kernels`` (default ``~/.cache/varlora/kernels``)."""
    return _cache_root() / "kernels"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def arch_flag_candidates(machine: str, system: str) -> list[str]:
    """The flags that tune for this CPU, most specific first, for ``platform.machine()``/``platform.system()``.

    GCC and clang spell "this CPU" ``-march=native`` on x86, ``-mcpu=native`` on aarch64 and POWER (where
    ``-march=native`` is missing or means less); Apple clang before 15 knows no ``native`` on arm64, where
    ``-mcpu=apple-m1`` is the common baseline. The caller keeps the first one the compiler accepts.
    """
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        return ["-march=native"]
    if machine in ("arm64", "aarch64", "armv8l", "armv8b"):
        return ["-mcpu=native"] + (["-mcpu=apple-m1"] if system == "Darwin" else ["-march=native"])
    if machine.startswith(("ppc", "powerpc")):
        return ["-mcpu=native"]
    return ["-march=native", "-mcpu=native"]


def _accepts(compiler: str, flag_list: list[str]) -> bool:
    """Whether ``compiler`` compiles a trivial file with these flags and says nothing (GCC only warns about
    some foreign spellings, such as ``-mcpu=`` on x86)."""
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "probe.c"
        src.write_text("int vl_probe(int x) { return x + 1; }\n")
        try:
            run = subprocess.run([compiler, *flag_list, "-c", str(src), "-o", str(Path(scratch) / "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return run.returncode == 0 and not run.stderr.strip()


@functools.cache
def flags(compiler: str, machine: str, system: str) -> tuple[str, ...]:
    """The flags a build with ``compiler`` uses here: :data:`BASE_FLAGS`, the first accepted
    :func:`arch_flag_candidates` flag (if any) and ``-fopenmp-simd`` (if accepted)."""
    chosen = list(BASE_FLAGS)
    arch = next((f for f in arch_flag_candidates(machine, system) if _accepts(compiler, [*BASE_FLAGS, f])), None)
    if arch is not None:
        chosen.append(arch)
    if _accepts(compiler, [*chosen, "-fopenmp-simd"]):
        chosen.append("-fopenmp-simd")
    return tuple(chosen)


def load() -> ctypes.CDLL:
    """The kernels' library, built if needed (once per process); :class:`KernelBuildError` if impossible."""
    built = _build()
    if isinstance(built, KernelBuildError):
        raise built
    return built


def available() -> bool:
    """Whether the kernels can be built and loaded on this machine."""
    return not isinstance(_build(), KernelBuildError)


def build_error() -> str | None:
    """Why the kernels cannot be had on this machine, or None when they can."""
    built = _build()
    return str(built) if isinstance(built, KernelBuildError) else None


@functools.cache
def _build() -> ctypes.CDLL | KernelBuildError:
    """The library or, if it cannot be had, the error (kept, so that a failed build is not retried)."""
    try:
        return _compile_and_load(vector_math=True)
    except KernelBuildError as err:
        if "no C compiler" in str(err) or "does not run" in str(err):
            return err
        try:  # perhaps only glibc's vector math library is missing
            return _compile_and_load(vector_math=False)
        except KernelBuildError:
            return err


def _compile_and_load(vector_math: bool = True) -> ctypes.CDLL:
    """Build (or find in the cache) and load the library; ``vector_math=False`` builds with
    ``-DVL_NO_LIBMVEC`` (scalar libm in the normal generator)."""
    source = (resources.files("varlora.optim") / "_cpu_kernels.c").read_bytes()
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler {compiler!r} on PATH (set $CC) to build the fused IVON kernels")
    build_flags = [*flags(compiler, platform.machine(), platform.system())]
    if not vector_math:
        build_flags.append("-DVL_NO_LIBMVEC")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        # the driver's expansion of -march/-mcpu=native names this CPU and its features
        driver = subprocess.run([compiler, *build_flags, "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60).stderr
        target = " ".join(re.findall(r"-m[\w=.,+-]+|-target-(?:cpu|feature)\S*\s+\S+", driver))  # no temp names
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"C compiler {compiler!r} does not run: {err}") from err
    key = hashlib.sha256(b"\0".join([source, " ".join(build_flags).encode(), version.encode(), target.encode(),
                                     platform.machine().encode()])).hexdigest()
    folder = cache_dir()
    library = folder / f"ivon_kernels-{key[:16]}.so"
    if not library.exists():
        try:
            _compile(compiler, build_flags, source, library)
        except OSError as err:
            raise KernelBuildError(f"cannot build the fused IVON kernels in {folder} ({err}); "
                                   "set $VARLORA_CACHE to a writable folder") from err
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as err:
        raise KernelBuildError(f"cannot load {library}: {err}") from err
    _declare(lib)
    return lib


def _compile(compiler: str, build_flags: list[str], source: bytes, library: Path) -> None:
    """Compile ``source`` into ``library``, through a temporary file renamed into place."""
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        src = Path(scratch) / "ivon_kernels.c"
        src.write_bytes(source)
        built = Path(scratch) / library.name
        run = subprocess.run([compiler, *build_flags, str(src), "-o", str(built), "-lm"],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise KernelBuildError(f"building the fused IVON kernels with {compiler!r} failed:\n{run.stderr}")
        os.replace(built, library)  # atomic: a concurrent build of the same key writes the same bytes


def _declare(lib: ctypes.CDLL) -> None:
    i64, f64, ptr, ptrs = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    sizes = ctypes.POINTER(ctypes.c_int64)
    lib.vl_fill_normal.argtypes = [ptr, i64, ctypes.c_uint64]
    lib.vl_fill_normal.restype = None
    lib.vl_perturb.argtypes = [i64, sizes, ptrs, ptrs, ptrs, ptrs, f64, f64]
    lib.vl_perturb.restype = None
    lib.vl_accumulate.argtypes = [i64, sizes, ptrs, ptrs, ptrs, ptrs, ctypes.c_int, ctypes.c_int]
    lib.vl_accumulate.restype = None
    lib.vl_update.argtypes = [i64, sizes, ptrs, ptrs, ptrs, ptrs, ptrs, i64, f64, f64, f64, f64, f64, f64, f64,
                              ctypes.c_int]
    lib.vl_update.restype = i64


def supports(*lists: Sequence[Tensor]) -> bool:
    """Whether the kernels can take these tensors: all contiguous fp32 CPU tensors."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for ts in lists for t in ts)


def _parallel(kernel: Callable[..., int | None], lists: Sequence[Sequence[Tensor]], *args: object) -> list:
    """Run ``kernel(count, sizes, *pointer arrays, *args)`` on ``torch.get_num_threads()`` contiguous ranges
    of the concatenated elements of ``lists`` (all of one layout: tensor k has the same size in each)."""
    sizes = [t.numel() for t in lists[0]]
    total = sum(sizes)
    workers = max(1, min(torch.get_num_threads(), total // MIN_PER_THREAD))
    bases = [[t.data_ptr() for t in ts] for ts in lists]
    bounds = [total * w // workers for w in range(workers + 1)]

    def part(w: int) -> int | None:
        lo, hi = bounds[w], bounds[w + 1]
        spans, start = [], 0  # (tensor, first element, elements) of the range [lo, hi)
        for k, n in enumerate(sizes):
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                spans.append((k, a - start, b - a))
            start += n
        pointers = [(ctypes.c_void_p * len(spans))(*[base[k] + 4 * off for k, off, _ in spans]) for base in bases]
        counts = (ctypes.c_int64 * len(spans))(*[n for *_, n in spans])
        return kernel(len(spans), counts, *pointers, *args)

    return _threads.run(part, workers)


def fill_normal(out: Tensor, seed: int) -> None:
    """Fill the contiguous fp32 CPU tensor ``out`` with N(0, 1) draws determined by ``seed`` (< 2**64) alone."""
    load().vl_fill_normal(out.data_ptr(), out.numel(), seed)


def perturb(params: Sequence[Tensor], backups: Sequence[Tensor], noises: Sequence[Tensor],
            hessians: Sequence[Tensor], *, weight_decay: float, value: float) -> None:
    """η ← ε/√(h+δ) in ``noises``, backup ← θ, θ ← θ + value·η (see :func:`varlora.optim._functional.perturb_`)."""
    _parallel(load().vl_perturb, [params, backups, noises, hessians], weight_decay, value)


def accumulate(grad_sums: Sequence[Tensor], hess_sums: Sequence[Tensor], grads: Sequence[Tensor],
               noises: Sequence[Tensor], *, first: bool, price: bool) -> None:
    """Σg and Σg⊙η (price) or Σg⊙g, started with ``first`` (see :func:`varlora.optim._functional.accumulate_`)."""
    _parallel(load().vl_accumulate, [grad_sums, hess_sums, grads, noises], int(first), int(price))


def update(means: Sequence[Tensor], grad_sums: Sequence[Tensor], hess_sums: Sequence[Tensor],
           momenta: Sequence[Tensor], hessians: Sequence[Tensor], *, num_samples: int, hess_scale: float,
           beta1: float, beta2: float, weight_decay: float, radius: float, bias_correction: float, lr: float,
           price: bool) -> int:
    """One IVON update in one pass (see :func:`varlora.optim._functional.update_`); the clipped count."""
    return sum(_parallel(load().vl_update, [means, grad_sums, hess_sums, momenta, hessians], num_samples,
                         hess_scale, beta1, beta2, weight_decay, radius, bias_correction, lr, int(price)))
