"""Cost of an S-sample posterior evaluation against S evaluations at the mean, side by side in one process.

The model is a randomly initialised Llama (``--shape``: SmolLM2-135M's, the default, or Llama-2-7B's;
``--layers`` to shrink it), built on ``--device`` in ``--dtype``, with rank-8 LoRA on q_proj and v_proj and a
random mean-field posterior; the examples are ARC-Easy validation questions (the shared data folder, else the
demo's packaged ones, as on a GPU machine), scored with the cloze protocol (shared-prefix KV cache) and a
tokenizer trained in memory. Timed alternately, per repeat:

* ``mean``: one evaluation at the posterior mean (``predict_logits``);
* ``batched``: S samples in one folded forward per batch (``eval.batched_samples = true``);
* ``batched/k``: the same in chunks of ``--samples-per-forward`` k samples (``eval.samples_per_forward``, the
  memory cap of the batched path);
* ``sequential``: S forwards, one per sample (``eval.batched_samples = false``, the default: the batched path
  is not faster on CPU, where both do the same FLOPs on batches that already fill a core).

The noise is drawn on the weights' device, as IVON's evaluation draws it. The ratio reported is median(batched) /
(S × median(mean)); the goal is ≤ 0.6 (reachable where one forward leaves the device idle, i.e. on a GPU). On a
GPU each case's peak memory (``torch.cuda.max_memory_allocated``, weights included) is printed beside its time.
The output starts with the device and, on CPU, the thread count. Run:
``python benchmarks/sampled_eval.py [--shape smollm2-135m|llama-2-7b] [--layers N] [--device cpu|cuda]
[--dtype float32|bfloat16] [--samples 10] [--samples-per-forward 5] [--examples 16] [--batch-size 8]
[--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _shapes import SHAPES, describe, device_name, examples, random_model, synchronize, tokenizer

from varlora.config import LoraArgs
from varlora.evaluate import batched_sample_logits, predict_logits
from varlora.models import attach_lora, lora_parameters
from varlora.optim.sampling import perturbed_named_params, stacked_named_samples
from varlora.scoring import make_scorer
from varlora.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="depth (default: the shape's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--samples-per-forward", type=int, help="also time the batched path in chunks of this many")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential path (saves time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.shape, args.layers, args.dtype, args.device)
    model = attach_lora(model, LoraArgs(r=8, alpha=16), seed=0).to(args.device).eval()
    params = lora_parameters(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    stds = {n: 0.01 * torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}
    data, source = examples(args.examples)
    scorer = make_scorer("cloze", tokenizer(), get_task("arc_easy"), max_length=512)
    S, bs = args.samples, args.batch_size
    device = next(iter(params.values())).device

    def noise() -> torch.Generator:
        return torch.Generator(device).manual_seed(0)  # on the weights' device, as IVON's evaluation

    def mean() -> None:
        predict_logits(model, scorer, data, bs)

    def batched(per_forward: int | None = None) -> None:
        samples = stacked_named_samples(params, stds, tau=1.0, generator=noise(), n_samples=S)
        batched_sample_logits(model, scorer, data, bs, samples, per_forward)

    def sequential() -> None:
        g = noise()
        for _ in range(S):
            with perturbed_named_params(params, stds, tau=1.0, generator=g):
                predict_logits(model, scorer, data, bs)

    cases = {"mean": mean, "batched": batched}
    if args.samples_per_forward:
        cases[f"batched/{args.samples_per_forward}"] = lambda: batched(args.samples_per_forward)
    if not args.no_sequential:
        cases["sequential"] = sequential
    cuda = args.device.startswith("cuda")
    print(f"device: {device_name(args.device)}; torch {torch.__version__}")
    print(f"model: {describe(model, args.shape)}, LoRA r=8 on q_proj, v_proj; {len(data)} {source}, cloze, "
          f"batch {bs}; S = {S}; {args.repeats} repeats")
    mean()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            synchronize(args.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            started = time.perf_counter()
            fn()
            synchronize(args.device)
            times[name].append(time.perf_counter() - started)
            if cuda:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, value in med.items():
        peak = f"  peak {peaks[name] / 2**20:,.0f} MB" if name in peaks else ""
        print(f"{name:>12}: median {value:7.3f} s  ({', '.join(f'{t:.3f}' for t in times[name])}){peak}")
    ratio = med["batched"] / (S * med["mean"])
    print(f"S = {S} batched sampled evaluation / ({S} x evaluation at the mean): {ratio:.2f} (goal <= 0.6)")
    for name in med:
        if name.startswith("batched/"):
            print(f"S = {S} in chunks of {name.split('/')[1]} / ({S} x evaluation at the mean): "
                  f"{med[name] / (S * med['mean']):.2f}")
    if "sequential" in med:
        print(f"S = {S} sequential sampled evaluation / ({S} x evaluation at the mean): "
              f"{med['sequential'] / (S * med['mean']):.2f}")


if __name__ == "__main__":
    main()
