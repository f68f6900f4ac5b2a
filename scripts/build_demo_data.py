"""Write the demo's ARC-Easy questions into the package (``src/varlora/demo_data/arc/``).

The demo (``recipes/experiment_demo.yaml``) trains on ``train_limit`` questions of the ARC-Easy train split
chosen with the run seed and evaluates on ``eval_limit`` validation questions chosen with seed 0. This script
makes that selection with the task loader from the release files (``$VARLORA_DATA_DIR`` or ``../shared/data``)
and copies the selected records, byte for byte and in file order, so that the packaged files give the same
examples (``tests/test_demo_assets.py`` checks it). Run from the repository root:
``python scripts/build_demo_data.py``.
"""

from __future__ import annotations

import json

from varlora.assets import DEMO_DATA_DIR
from varlora.experiment import load_preset, run_configs
from varlora.tasks import get_task, resolve_data_dir, shared_dir

RELEASE_FILES = {"train": "arc/ARC-Easy-Train.jsonl", "validation": "arc/ARC-Easy-Dev.jsonl"}


def main() -> None:
    source = resolve_data_dir() or (shared / "data" if (shared := shared_dir()) is not None else None)
    if source is None or not source.is_dir():
        raise SystemExit("no data folder: set VARLORA_DATA_DIR or run next to ../shared/data")
    (_, _, _, config), *others = run_configs(load_preset("demo"))
    for _, _, _, other in others:  # every run of the demo must select the same questions
        if (other.data, other.train.seed) != (config.data, config.train.seed):
            raise SystemExit("the demo's runs select different data; package each selection")
    task = get_task(config.data.task)
    picks = {
        "train": task.load("train", data_dir=source, limit=config.data.train_limit, seed=config.train.seed),
        "validation": task.load("validation", data_dir=source, limit=config.data.eval_limit, seed=0),
    }
    for split, relative in RELEASE_FILES.items():
        wanted = {ex.id for ex in picks[split]}
        lines = [line for line in (source / relative).read_text(encoding="utf-8").splitlines(keepends=True)
                 if line.strip() and json.loads(line)["id"] in wanted]
        if len(lines) != len(wanted):
            raise SystemExit(f"{relative}: found {len(lines)} of the {len(wanted)} selected ids")
        target = DEMO_DATA_DIR / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(lines), encoding="utf-8")
        print(f"{target}: {len(lines)} questions ({split})")


if __name__ == "__main__":
    main()
