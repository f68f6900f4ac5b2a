"""The fused fp32 CPU kernels of IVON (``_cpu_kernels.c``): built on first use, called through ctypes.

The C source ships with the package and is compiled with the system C compiler (``$CC``, else ``cc``) into
a shared library cached under ``$VARLORA_CACHE_DIR`` (default ``~/.cache/varlora``), named by a hash of the
source, the flags, the compiler and the CPU it targets (``-march=native`` as the compiler resolves it), so a new
version or another CPU gets its own build. The
library is written to a temporary name and renamed into place, so concurrent first uses are safe. It needs
no PyTorch headers (it sees plain float arrays), so it builds in well under a second.

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
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["KernelBuildError", "accumulate", "available", "build_error", "fill_normal", "load", "perturb", "supports",
           "update"]

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared", "-std=gnu11"]


class KernelBuildError(RuntimeError):
    """The fused kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$VARLORA_CACHE_DIR`` or ``~/.cache/varlora``."""
    configured = os.environ.get("VARLORA_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "varlora"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


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
        return _compile_and_load()
    except KernelBuildError as err:
        return err


def _compile_and_load() -> ctypes.CDLL:
    source = (resources.files("varlora.optim") / "_cpu_kernels.c").read_bytes()
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler {compiler!r} on PATH (set $CC) to build the fused IVON kernels")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        # the driver's expansion of -march=native names this CPU and its features: a library built for
        # another CPU (a home folder shared across machines) is never loaded here
        driver = subprocess.run([compiler, *FLAGS, "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60).stderr
        target = " ".join(re.findall(r"-m[\w=.,+-]+|-target-(?:cpu|feature)\S*\s+\S+", driver))  # no temp names
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"C compiler {compiler!r} does not run: {err}") from err
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), target.encode(),
                                     platform.machine().encode()])).hexdigest()
    folder = cache_dir()
    library = folder / f"ivon_kernels-{key[:16]}.so"
    if not library.exists():
        try:
            _compile(compiler, source, library)
        except OSError as err:
            raise KernelBuildError(f"cannot build the fused IVON kernels in {folder} ({err}); "
                                   "set $VARLORA_CACHE_DIR to a writable folder") from err
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as err:
        raise KernelBuildError(f"cannot load {library}: {err}") from err
    _declare(lib)
    return lib


def _compile(compiler: str, source: bytes, library: Path) -> None:
    """Compile ``source`` into ``library``, through a temporary file renamed into place."""
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        src = Path(scratch) / "ivon_kernels.c"
        src.write_bytes(source)
        built = Path(scratch) / library.name
        run = subprocess.run([compiler, *FLAGS, str(src), "-o", str(built), "-lm"],
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


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _sizes(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def fill_normal(out: Tensor, seed: int) -> None:
    """Fill the contiguous fp32 CPU tensor ``out`` with N(0, 1) draws determined by ``seed`` (< 2**64) alone."""
    load().vl_fill_normal(out.data_ptr(), out.numel(), seed)


def perturb(params: Sequence[Tensor], backups: Sequence[Tensor], noises: Sequence[Tensor],
            hessians: Sequence[Tensor], *, weight_decay: float, value: float) -> None:
    """η ← ε/√(h+δ) in ``noises``, backup ← θ, θ ← θ + value·η (see :func:`varlora.optim._functional.perturb_`)."""
    load().vl_perturb(len(params), _sizes(params), _pointers(params), _pointers(backups), _pointers(noises),
                      _pointers(hessians), weight_decay, value)


def accumulate(grad_sums: Sequence[Tensor], hess_sums: Sequence[Tensor], grads: Sequence[Tensor],
               noises: Sequence[Tensor], *, first: bool, price: bool) -> None:
    """Σg and Σg⊙η (price) or Σg⊙g, started with ``first`` (see :func:`varlora.optim._functional.accumulate_`)."""
    load().vl_accumulate(len(grads), _sizes(grads), _pointers(grad_sums), _pointers(hess_sums), _pointers(grads),
                         _pointers(noises), int(first), int(price))


def update(means: Sequence[Tensor], grad_sums: Sequence[Tensor], hess_sums: Sequence[Tensor],
           momenta: Sequence[Tensor], hessians: Sequence[Tensor], *, num_samples: int, hess_scale: float,
           beta1: float, beta2: float, weight_decay: float, radius: float, bias_correction: float, lr: float,
           price: bool) -> int:
    """One IVON update in one pass (see :func:`varlora.optim._functional.update_`); the clipped count."""
    return load().vl_update(len(means), _sizes(means), _pointers(means), _pointers(grad_sums),
                            _pointers(hess_sums), _pointers(momenta), _pointers(hessians), num_samples, hess_scale,
                            beta1, beta2, weight_decay, radius, bias_correction, lr, int(price))
