"""Write a randomly initialised Llama of a real size (:mod:`_shapes`) and the in-memory tokenizer to a folder, as a
model that varlora loads by name: what a GPU machine without the hub needs to time the loading paths (QLoRA
quantises the base as it loads it) and the ``varlora train`` command (several processes).

    python benchmarks/save_random_model.py FOLDER [--shape llama-2-7b] [--layers N] [--dtype bfloat16] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from _shapes import SHAPES, describe, random_model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="depth (default: the shape's)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the weights are initialised (fast on a GPU), before they are written")
    args = parser.parse_args()
    started = time.perf_counter()
    model = random_model(args.shape, args.layers, args.dtype, args.device)
    model.save_pretrained(args.folder)
    tokenizer().save_pretrained(args.folder)
    print(f"{args.folder}: {describe(model, args.shape)}, written in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
