"""Training-step time and peak memory of IVON against AdamW on a real model, measured side by side.

Default: the shared SmolLM2-135M-Instruct, LoRA r 8 on q_proj, v_proj, batches of 4 ARC-Easy training
questions (cloze scoring), the exact step varlora's trainer runs (``Method.train_step``). Two
copies of the model, one per optimizer, take turns on the same batches (interleaved, so machine noise hits
both alike); the ratio of median step times is printed. Peak memory is measured in one fresh subprocess
per optimizer (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU), plus the bytes of optimizer
state. Goal (issue): IVON ≤ 1.05× AdamW's step time.

    python benchmarks/train_step.py [--model PATH] [--steps 12] [--warmup 2] [--task arc_easy]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from varlora.config import RunConfig
from varlora.methods import build_method
from varlora.session import setup

DEFAULT_MODEL = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def _config(args: argparse.Namespace, optimizer: str) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": args.model, "dtype": args.dtype},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "data": {"task": args.task, "scoring": args.scoring, "train_limit": 4 * (args.steps + args.warmup),
                 "eval_limit": 1, "max_length": 256},
        "method": {"name": optimizer},
        "train": {"steps": args.steps + args.warmup, "batch_size": 4, "seed": 21},
        "ivon": {"lr": 0.03, "ess": 1e6, "hess_init": 0.1, "beta2": 0.99, "clip_radius": 1e-2},
    })


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def time_side_by_side(args: argparse.Namespace) -> dict:
    methods = {}
    for name in ("adamw", "ivon"):
        session = setup(_config(args, name), tempfile.mkdtemp())
        session.model.train()
        methods[name] = build_method(session)
        methods[name].setup()
    times: dict[str, list[float]] = {"adamw": [], "ivon": []}
    for step in range(args.steps + args.warmup):  # the same batches for both: session.batch(step)
        order = ("adamw", "ivon") if step % 2 == 0 else ("ivon", "adamw")
        for name in order:
            _sync()
            started = time.perf_counter()
            methods[name].train_step(step)
            _sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    return {name: {"median_s": statistics.median(t), "min_s": min(t),
                   "state_bytes": _state_bytes(methods[name].optimizer)} for name, t in times.items()}


def peak_memory(args: argparse.Namespace, optimizer: str) -> dict:
    """Run in a fresh process: setup + steps of one optimizer; report peak memory."""
    session = setup(_config(args, optimizer), tempfile.mkdtemp())
    session.model.train()
    method = build_method(session)
    method.setup()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + 2):
        method.train_step(step)
    if torch.cuda.is_available():
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "kind": "cuda max_memory_allocated"}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "peak RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--scoring", default="cloze", choices=["cloze", "letter"])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-of", choices=["adamw", "ivon"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory(args, args.memory_of)))
        return
    timing = time_side_by_side(args)
    memory = {}
    for name in ("adamw", "ivon"):
        command = [sys.executable, __file__, "--memory-of", name, "--model", args.model, "--dtype", args.dtype,
                   "--task", args.task, "--scoring", args.scoring, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"train step, {args.model}, LoRA r8 q,v, batch 4 {args.task} ({args.scoring}), {device}, "
          f"{args.steps} interleaved steps each after {args.warmup} warm-up")
    print(f"{'':8}{'median s/step':>14}{'min s/step':>12}{'opt. state MB':>15}{'peak MB':>10}")
    for name in ("adamw", "ivon"):
        t, m = timing[name], memory[name]
        print(f"{name:8}{t['median_s']:14.3f}{t['min_s']:12.3f}{t['state_bytes'] / 2**20:15.2f}"
              f"{m['peak_bytes'] / 2**20:10.0f}")
    ratio = timing["ivon"]["median_s"] / timing["adamw"]["median_s"]
    print(f"IVON / AdamW step time (median): {ratio:.3f}  (goal <= 1.05)")
    print(f"IVON / AdamW peak memory ({memory['ivon']['kind']}): "
          f"{memory['ivon']['peak_bytes'] / memory['adamw']['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
