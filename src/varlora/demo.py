"""``varlora demo``: the offline main job on a fresh machine.

Real model (SmolLM2-135M-Instruct, GGUF, found by :func:`varlora.assets.find_demo_model`), real data
(ARC-Easy: the release files, or without a data folder the same questions packaged with varlora, see
:func:`varlora.assets.find_demo_data`), so that it needs nothing but PyPI. AdamW and IVON are trained on the
same budget with the tuned CPU hyper-parameters of the ``demo`` preset, then a side-by-side table (ACC, ECE,
NLL, Brier for AdamW, IVON@mean and IVON), a reliability diagram and an accuracy-vs-time plot. Rerunning the
command resumes or re-reads the runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from varlora.assets import DEMO_DATA_DIR, find_demo_data, find_demo_model
from varlora.experiment import run_experiment

__all__ = ["run_demo"]


def run_demo(out: Path, steps: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Train and compare; return the folder holding ``table.md`` and the PNGs (``out/report``)."""
    model = find_demo_model(log)
    overrides: dict = {"model": {"name": str(model)}}
    if (data_dir := find_demo_data()) is not None:
        overrides["data"] = {"data_dir": str(data_dir)}
        log(f"no data folder ($VARLORA_DATA_DIR, ../shared/data): using the demo's questions packaged in {data_dir} "
            f"(ARC, CC BY-SA 4.0: see {DEMO_DATA_DIR / 'README.md'})")
    if steps is not None:
        overrides["train"] = {"steps": steps}
    log(f"varlora demo: {model.name} on ARC-Easy (cloze scoring), AdamW vs IVON, 2 idle CPU cores ≈ 7–10 min")
    results = run_experiment("demo", out=str(out), results=str(out / "report"), overrides=overrides, log=log)
    log((results / "table.md").read_text())
    for png in sorted(results.glob("*.png")):
        log(f"figure: {png}")
    return results
