"""Training-step time and peak memory of IVON and BLoB against AdamW, measured side by side.

Default: the shared SmolLM2-135M-Instruct, LoRA r 8 on q_proj, v_proj, batches of 4 ARC-Easy training
questions (cloze scoring), the exact step varlora's trainer runs (``Method.train_step``), with the `cpu`
experiment preset's IVON and BLoB settings. ``--shape llama-2-7b`` (or ``smollm2-135m``) times a randomly
initialised model of that size instead, built on ``--device`` in ``--dtype`` with a tokenizer trained in memory
and the demo's packaged ARC-Easy questions where no data folder exists: what runs on a GPU machine, which has
neither the model nor the data. One copy of the model per method; the copies take turns on the same batches
(interleaved, the order rotating every step, so machine noise hits all alike); the ratio of each method's median
step time to AdamW's is printed. Peak memory is measured in one fresh subprocess per method (the steps' peak RSS
on CPU, ``torch.cuda.max_memory_allocated`` on GPU, weights included), plus the bytes of optimizer state and of
extra parameters (IVON's σ exists only once training ends; BLoB's ρ from the start). Goal (issue): IVON ≤ 1.05×
AdamW's step time. The ensemble's training is M AdamW runs by construction and the post-hoc methods reuse
AdamW's, so these three methods cover every training cost of the harness.

    python benchmarks/train_step.py [--model PATH | --shape llama-2-7b [--layers N]] [--device cuda]
                                    [--dtype bfloat16] [--steps 12] [--warmup 2] [--methods adamw ivon blob]
                                    [--lora-r 16 --targets all-linear] [--quantization 4bit]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _shapes import SHAPES, describe, device_name, random_model, synchronize, tokenizer

from varlora.assets import find_demo_data
from varlora.config import RunConfig
from varlora.cost import PeakMemory
from varlora.experiment import load_preset
from varlora.methods import build_method
from varlora.session import setup
from varlora.tasks import shared_dir

DEFAULT_MODEL = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def _config(args: argparse.Namespace, method: str) -> RunConfig:
    """The benchmark's run of ``method``, with the method's own settings from the `cpu` preset's variant of
    the same name (none for a method the preset lacks: its defaults)."""
    variant = load_preset("cpu").variants.get(method, {})
    return RunConfig.from_dict({
        "model": {"name": args.model, "dtype": args.dtype, "quantization": args.quantization},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.1, "target_modules": args.targets},
        "data": {"task": args.task, "scoring": args.scoring, "train_limit": 4 * (args.steps + args.warmup),
                 "eval_limit": 1, "max_length": 256, "data_dir": args.data_dir},
        "method": {"name": method},
        "train": {"steps": args.steps + args.warmup, "batch_size": 4, "seed": 21},
        **{section: values for section, values in variant.items() if section != "method"},
    })


def _session(args: argparse.Namespace, method: str):
    """The session of ``method``'s run: the model of ``--model``, or a random one of ``--shape`` on ``--device``."""
    if args.shape is None:
        return setup(_config(args, method), tempfile.mkdtemp())
    base = random_model(args.shape, args.layers, args.dtype, args.device)
    return setup(_config(args, method), tempfile.mkdtemp(), base_model=base, tokenizer=tokenizer())


def time_side_by_side(args: argparse.Namespace) -> dict:
    methods = {}
    for name in args.methods:
        session = _session(args, name)
        session.model.train()
        methods[name] = build_method(session)
        methods[name].setup()
    times: dict[str, list[float]] = {name: [] for name in args.methods}
    for step in range(args.steps + args.warmup):  # the same batches for all: session.batch(step)
        shift = step % len(args.methods)
        for name in args.methods[shift:] + args.methods[:shift]:
            synchronize(args.device)
            started = time.perf_counter()
            methods[name].train_step(step)
            synchronize(args.device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), **methods[name].extra_bytes()}
            for name, t in times.items()}


def peak_memory(args: argparse.Namespace, name: str) -> dict:
    """Run in a fresh process: setup, then steps of one method; the peak memory of the steps alone
    (:class:`varlora.cost.PeakMemory`, reset after the model is loaded: loading a GGUF file peaks higher than
    training and would hide the difference)."""
    session = _session(args, name)
    session.model.train()
    method = build_method(session)
    method.setup()
    gc.collect()
    peak = PeakMemory(next(iter(session.params.values())).device)
    peak.reset()
    for step in range(args.warmup + 2):
        method.train_step(step)
    return {"peak_bytes": peak.read(), "kind": peak.kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="time a random model of this size, not --model")
    parser.add_argument("--layers", type=int, help="with --shape: depth (default: the shape's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"],
                        help="with --model: quantise the base as it loads (QLoRA; bitsandbytes)")
    parser.add_argument("--task", default="arc_easy")
    shared = shared_dir()
    parser.add_argument("--data-dir", default=str(shared / "data") if shared is not None else None,
                        help="the task's release files (default: ../shared/data where it exists, else "
                             "$VARLORA_DATA_DIR, else the demo's packaged ARC-Easy questions)")
    parser.add_argument("--scoring", default="cloze", choices=["cloze", "letter"])
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 r, as r 8 / alpha 16)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                        help="LoRA target modules (`all-linear` for every linear layer but the head)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["adamw", "ivon", "blob"],
                        help="methods to time; the first is the reference of the ratios")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_dir is None:  # no ../shared (a GPU machine): $VARLORA_DATA_DIR, else the demo's
        folder = find_demo_data()
        args.data_dir = None if folder is None else str(folder)
    if args.memory_of:
        print(json.dumps(peak_memory(args, args.memory_of)))
        return
    timing = time_side_by_side(args)
    memory = {}
    for name in args.methods:
        command = [sys.executable, __file__, *sys.argv[1:], "--memory-of", name]  # the same settings
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])
    model = args.model if args.shape is None else describe(random_model(args.shape, args.layers, args.dtype, "meta"),
                                                                      args.shape)
    targets = ",".join(args.targets)
    print(f"train step, {model}, LoRA r{args.lora_r} {targets}, batch 4 {args.task} ({args.scoring}), "
          f"{device_name(args.device)}, {args.steps} interleaved steps each after {args.warmup} warm-up")
    print(f"{'':8}{'median s/step':>14}{'min s/step':>12}{'opt. state MB':>15}{'extra MB':>10}{'peak MB':>10}")
    for name in args.methods:
        t, m = timing[name], memory[name]
        print(f"{name:8}{t['median_s']:14.3f}{t['min_s']:12.3f}{t['optimizer_state_bytes'] / 2**20:15.2f}"
              f"{t['extra_param_bytes'] / 2**20:10.2f}{m['peak_bytes'] / 2**20:10.0f}")
    reference = args.methods[0]
    for name in args.methods[1:]:
        ratio = timing[name]["median_s"] / timing[reference]["median_s"]
        goal = "  (goal <= 1.05)" if name == "ivon" else ""
        print(f"{name} / {reference} step time (median): {ratio:.3f}{goal}; peak memory ({memory[name]['kind']}): "
              f"{memory[name]['peak_bytes'] / memory[reference]['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
