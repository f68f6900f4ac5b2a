"""Cost of one IVON step (sampling + update) against ``torch.optim.AdamW(foreach=True)`` on CPU.

Parameter sets are LoRA adapters of Llama-2-7B (32 layers, hidden 4096, MLP 11008):

* 4.2M: rank 8 on q_proj and v_proj (128 tensors of 32,768), the IVON-LoRA paper's setting;
* 40M: rank 16 on q, k, v, o, gate, up and down projections (448 tensors);
* 4.9M: SmolLM2-135M's adapter at rank 16 on every linear layer (420 small tensors), the heaviest setting of
  ``benchmarks/train_step.py``: IVON's extra milliseconds here, over that benchmark's step time, are its cost in
  a training step.

The IVON step is ``with opt.sampled_params(train=True)`` (noise draw, perturbation, restore, gradient
consumption) plus ``opt.step()``, with the paper's IVON-LoRA hyperparameters; the AdamW step is ``opt.step()``.
The backward pass, the same for both, is left out: precomputed gradients are attached. The two are timed
alternately in one process and the ratio is that of the medians (the median of per-repeat ratios is shown
too), beside the time of the noise draw alone (torch's CPU normal generator runs on one thread). Memory: bytes of
the tensors each optimizer keeps between steps, and bytes allocated inside one step (profiler).

Each thread count of ``--threads`` (default 1 and 2) is measured in the same run, one after the other, with
``torch.set_num_threads``. The output starts with the CPU model (``/proc/cpuinfo``) and the thread counts, since
the ratios depend on both (on a small shared machine, OpenMP barriers of 2-thread ops stall on descheduled
threads). The unit "pass" is the time of one ``torch._foreach_add_`` over tensors shaped like the parameters
(read two, write one), timed in the same interleaved loop: IVON's step, without its noise draw, makes 22 such
element-wise passes (σ 3, perturbation and restore 3, the sums 2, the update 13, the momentum 1) and AdamW's 7
(one of them allocating). Guard of issue 33: IVON's step without the draw within 30 passes, which catches an extra
pass over the state, an allocation or a host sync per parameter. The draw is torch's single-threaded CPU normal
generator (mt19937 + Box-Muller), 5-8 ns a number, itself about one AdamW step, so that on CPU no IVON built on
torch's ops and generators comes near AdamW's step time: the removed C kernels, one fused pass with their own
generator, were 0.85-1.25x AdamW. In a training step this is 0.5% (LoRA r 8 on q, v) to 3% (r 16 on every
linear layer) of SmolLM2-135M's step (``benchmarks/train_step.py``), the 4.9M row's "IVON-AdamW ms".

Run: ``python benchmarks/optimizer_step.py [--repeats 15] [--threads 1 2] [--sizes 4.2M 40M]``; the
output of the development machine is ``results/benchmarks/optimizer_step_cpu.txt``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from varlora import IVON
from varlora.optim import sampling

LAYERS, HIDDEN, MLP = 32, 4096, 11008
GOAL_PASSES = 30


def lora_shapes(size: str) -> list[tuple[int, int]]:
    """(A, B) shapes of every LoRA adapter of the configuration."""
    if size == "4.2M":
        layers, rank, modules = LAYERS, 8, [(HIDDEN, HIDDEN)] * 2
    elif size == "40M":
        layers, rank, modules = LAYERS, 16, [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, MLP)] * 2 + [(MLP, HIDDEN)]
    elif size == "4.9M":  # SmolLM2-135M: 30 layers, hidden 576, MLP 1536, k and v 192 wide (3 of 9 heads)
        hidden, mlp, kv = 576, 1536, 192
        layers, rank = 30, 16
        modules = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp), (hidden, mlp),
                   (mlp, hidden)]
    else:
        raise ValueError(f"unknown size {size!r} (expected 4.2M, 40M or 4.9M)")
    return [shape for _ in range(layers) for fan_in, fan_out in modules for shape in ((rank, fan_in), (fan_out, rank))]


def make_params(shapes: list[tuple[int, int]], seed: int) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    return params, grads


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def allocated_bytes(fn: Callable[[], object]) -> int:
    """Bytes allocated by the ops run in ``fn`` (freed or not)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events() if e.name.startswith("aten::"))


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what ``platform`` knows) and its logical CPU count."""
    name = ""
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def make_ivon(params: list[torch.nn.Parameter]) -> IVON:
    # IVON-LoRA (Cong et al. 2024) on Llama-2-7B, ARC: ess 1e6, h0 1e-3; lr 0.03, clip 1e-3, no weight decay
    return IVON(params, lr=0.03, ess=1e6, hess_init=1e-3, weight_decay=0.0, clip_radius=1e-3, rescale_lr=False,
                generator=torch.Generator().manual_seed(0), stats_every=10)


def bench(size: str, repeats: int) -> dict[str, float]:
    shapes = lora_shapes(size)
    ivon_params, grads = make_params(shapes, 0)
    adam_params, adam_grads = make_params(shapes, 0)
    for p, g in zip(adam_params, adam_grads, strict=True):
        p.grad = g
    ivon = make_ivon(ivon_params)
    adamw = torch.optim.AdamW(adam_params, lr=5e-5, weight_decay=0.0, foreach=True)
    noise_gen = torch.Generator().manual_seed(1)
    pass_out = [torch.zeros_like(g) for g in grads]

    def ivon_step() -> None:
        with ivon.sampled_params(train=True):
            for p, g in zip(ivon_params, grads, strict=True):
                p.grad = g  # stands for loss.backward()
        ivon.step()

    steps: dict[str, Callable[[], object]] = {
        "ivon": ivon_step,
        "adamw": adamw.step,
        "noise": lambda: sampling.standard_normal(ivon_params, noise_gen),  # the draws of one IVON sample
        "pass": lambda: torch._foreach_add_(pass_out, grads),  # one element-wise pass: the unit of work
    }
    for _ in range(3):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    numel = sum(p.numel() for p in ivon_params)
    return dict(
        numel=numel,
        tensors=len(shapes),
        adamw_ms=median_ms(times["adamw"]),
        ivon_ms=median_ms(times["ivon"]),
        noise_ms=median_ms(times["noise"]),
        pass_ms=median_ms(times["pass"]),
        ratio=statistics.median(times["ivon"]) / statistics.median(times["adamw"]),
        pair_ratio=statistics.median(i / a for i, a in zip(times["ivon"], times["adamw"], strict=True)),
        adamw_state=held_bytes([t for s in adamw.state.values() for t in s.values() if torch.is_tensor(t)]),
        ivon_state=held_bytes([t for s in ivon.state.values() for t in s.values() if torch.is_tensor(t)]
                              + [t for pair in ivon._workspace.values() for t in pair]),
        adamw_alloc=allocated_bytes(adamw.step),
        ivon_alloc=allocated_bytes(ivon_step),
        param_bytes=4 * numel,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each optimizer")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    parser.add_argument("--sizes", nargs="+", default=["4.2M", "40M", "4.9M"], help="LoRA configurations")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    print(f"torch {torch.__version__}, threads {args.threads} (measured in turn in this run), {args.repeats} "
          "interleaved repeats, fp32")
    print("IVON: lr 0.03, ess 1e6, hess_init 1e-3, weight_decay 0, clip_radius 1e-3, 1 MC sample, stats_every 10;"
          " AdamW foreach")
    print(f"guard: IVON without its noise draw <= {GOAL_PASSES} passes (issue 33); noise = the standard-normal draws of"
          " one IVON sample; pass = one foreach add over the parameters' shapes")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print()
        print(f"== {torch.get_num_threads()} thread(s)")
        report(args.sizes, [bench(size, args.repeats) for size in args.sizes])


def report(sizes: list[str], rows: list[dict[str, float]]) -> None:
    """Print the timing and memory tables of one thread count."""
    mb = 1 / 2**20
    print()
    print("parameters             tensors  AdamW ms  IVON ms  IVON/AdamW  (median per repeat)  noise ms  pass ms"
          "  AdamW passes  IVON-noise passes  IVON-AdamW ms")
    for size, r in zip(sizes, rows, strict=True):
        ivon_passes = (r["ivon_ms"] - r["noise_ms"]) / r["pass_ms"]
        flag = " " if ivon_passes <= GOAL_PASSES else "!"
        print(f"{size:>4} = {r['numel']:>10,}  {r['tensors']:>9}  {r['adamw_ms']:>8.1f}  {r['ivon_ms']:>7.1f}"
              f"  {r['ratio']:>10.2f}  {r['pair_ratio']:>19.2f}  {r['noise_ms']:>8.1f}  {r['pass_ms']:>7.2f}"
              f"  {r['adamw_ms'] / r['pass_ms']:>12.1f}  {ivon_passes:>16.1f}{flag}"
              f"  {r['ivon_ms'] - r['adamw_ms']:>13.1f}")
    print("! = over the guard")
    print()
    print("memory, MB        parameters   AdamW held + allocated/step = peak   IVON held + allocated/step = peak"
          "   ratio")
    for size, r in zip(sizes, rows, strict=True):
        adam_peak, ivon_peak = r["adamw_state"] + r["adamw_alloc"], r["ivon_state"] + r["ivon_alloc"]
        print(f"{size:>4}              {r['param_bytes'] * mb:>10.1f}   {r['adamw_state'] * mb:>10.1f}"
              f" + {r['adamw_alloc'] * mb:>14.1f} = {adam_peak * mb:>5.1f}   {r['ivon_state'] * mb:>9.1f}"
              f" + {r['ivon_alloc'] * mb:>14.1f} = {ivon_peak * mb:>5.1f}   {ivon_peak / adam_peak:>5.2f}")
    print("held: tensors kept between steps (AdamW: exp_avg, exp_avg_sq; IVON: hess, momentum and the two buffers\n"
          "it reuses every step); allocated/step: what one step allocates (profiler), freed or not, so held +\n"
          "allocated bounds the peak.")


if __name__ == "__main__":
    main()
