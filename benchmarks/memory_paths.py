"""Peak memory of each loading and precision path, measured on a small random Llama on the CPU and extrapolated
per parameter to Llama-2-7B and Llama-2-70B.

Paths: the base in float32, in bfloat16, bfloat16 with gradient checkpointing, 8-bit and 4-bit (bitsandbytes,
compute in bfloat16, as ``model.dtype auto`` gives on an Ampere-or-later GPU), 4-bit with checkpointing, and
bfloat16 sharded by FSDP2 over 2 processes (``model.sharding fsdp``, gloo on the CPU, launched by torchrun), with
and without checkpointing. Each runs in fresh processes: the model is loaded from a safetensors folder (saved in
float32) by :func:`varlora.session.setup` (meta device, ``device_map``, quantised as it loads; under FSDP rank 0
reads the base and the other rank builds it on the meta device and receives its shards), then two training steps
of ``--method`` run on fixed batches of 4 ARC-Easy questions (``--scoring letter``, the paper preset's protocol,
by default; under FSDP each rank takes 2 of every 4). Every weight is read once after loading, so that the pages
of a memory-mapped safetensors file count as the copy onto a GPU would. Measured per process
(:class:`varlora.cost.PeakMemory`, the process's peak RSS from a trimmed heap): the peak while loading and the
peak of the steps, each minus the RSS before loading (the interpreter, the libraries and the process group), and
the RSS right after loading. Counted exactly from the tensors: the bytes of the base's weights (parameters,
buffers and bitsandbytes' quantisation constants) per decoder-linear parameter (the weights quantisation applies
to) and per other parameter (embeddings, head, norms: these stay float, float32 once peft's
``prepare_model_for_kbit_training`` has upcast them); under FSDP also the rank's shards of the base and the full
bytes of a decoder layer and of the root's own parameters (embeddings, head, last norm), which FSDP2 all-gathers.

Allocator: the measuring processes run with glibc's mmap threshold fixed (``--mmap-threshold``, 1 MiB: the
environment variable ``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor of 1 MiB or more leaves the RSS at once
and the peak RSS follows the live tensors, as ``torch.cuda.max_memory_allocated`` does on a GPU. With glibc's
default, dynamic threshold (``--mmap-threshold 0``), blocks freed during a step (activations; FSDP's gathered
layers, freed after each layer) stay in the heap, fragmented, and the RSS grows with depth without live tensors:
at the default sizes (IVON) it made the per-layer step increment (b, below) 75 MiB instead of 51 for bf16, and 52
instead of 3 for an FSDP rank with checkpointing (whose RSS grew by about 50 MiB in each layer's forward, its live
tensors by 1 MiB).

Extrapolation: base bytes = N_linear × b_linear + N_other × b_other with the architectures' exact counts. The
training-step increment above the loaded base (activations, LoRA gradients, optimizer state) is measured at two
depths, L1 and L2 layers, and split into a + b·L: ``a`` (the logits of the continuation tokens over the 32,000-word
vocabulary, the same for every Llama-2) is kept, the per-layer ``b`` is scaled by the target's hidden size over the
small model's (the same questions: a layer's activations grow with its width), so step = a + b × L_target ×
h_target / h. A GPU adds its CUDA context (~0.5 GB).

FSDP on ``--world`` GPUs (8), per GPU, at the measured per-rank batch of 2 questions (a global batch of 16 on 8
GPUs): shards = base / world; gathered = the root's parameters (all-gathered for the forward and again for the
whole backward, where the peak is) + 2 × a decoder layer, in full bf16 (FSDP2 gathers one layer at a time and
prefetches the next: in the backward explicitly, in the forward on CUDA's all-gather stream; on the CPU two layers
are gathered at once in the backward); the step = a' + b × L_target × h_target / h as above from the larger rank's
increments, where a' is ``a`` less the small model's gathered weights (same assumption, so that they are counted
at the target's size only); LoRA = its parameters × 32 B (the weight, its gradient and up to six fp32 buffers of
the optimizer and its sampling) / world, an upper bound already inside b at the small model's share; and two
constants a CPU run cannot measure: the CUDA context (0.5 GB) and NCCL's communicators (1 GB, an assumption: their
buffers of NCCL_BUFFSIZE, 4 MiB, per channel and peer, and work memory). Not modelled: the caching allocator's
fragmentation and the all-gather's input copy (a layer's shard). While loading, rank 0's host holds the whole base
(bf16, as loaded; measured here it also holds the checkpoint's float32 pages while they are mapped, and its own
shards, which on a GPU are in GPU memory) and the other ranks' hosts none of it; a GPU holds its shards and one
full tensor being broadcast (at most the embeddings).

    python benchmarks/memory_paths.py [--hidden 1024 --layers 4 8] [--method ivon] [--paths fp32 bf16 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from varlora import distributed
from varlora.assets import find_demo_data
from varlora.config import RunConfig
from varlora.cost import PeakMemory
from varlora.methods import build_method
from varlora.optim._dtensor import local
from varlora.session import setup
from varlora.tasks import resolve_data_dir

#: path name -> ModelArgs fields
PATHS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "bf16+ckpt": {"dtype": "bfloat16", "gradient_checkpointing": True},
    "8bit": {"dtype": "bfloat16", "quantization": "8bit"},
    "4bit": {"dtype": "bfloat16", "quantization": "4bit"},
    "4bit+ckpt": {"dtype": "bfloat16", "quantization": "4bit", "gradient_checkpointing": True},
    "fsdp-bf16": {"dtype": "bfloat16", "sharding": "fsdp"},
    "fsdp-bf16+ckpt": {"dtype": "bfloat16", "gradient_checkpointing": True, "sharding": "fsdp"},
}
RANKS = 2  #: processes of an FSDP path (gloo on the CPU); each takes every RANKS-th question of a batch
BATCH = 4  #: questions per training step (the global batch)
#: per-GPU memory of an FSDP rank that a CPU run cannot measure: the CUDA context (as for the other paths) and
#: NCCL's communicators (buffers of NCCL_BUFFSIZE, 4 MiB, per channel and peer, and their work memory): assumptions
CUDA_CONTEXT = 0.5e9
NCCL = 1.0e9
#: decoder layers whose full weights a rank holds at once: FSDP2 prefetches the next layer's all-gather while one
#: computes (forward on CUDA's all-gather stream, backward explicitly), so two; the root's (embeddings, head, last
#: norm) are gathered besides, for the forward and again for the whole backward
GATHERED_LAYERS = 2
#: bytes per LoRA parameter on a rank, before sharding: the fp32 weight, its gradient and up to six fp32 buffers of
#: the optimizer and its sampling (IVON: h, ḡ, the sample's sums; AdamW: two moments), an upper bound
LORA_BYTES = 8 * 4
#: (layers, hidden, intermediate, attention heads, kv heads, vocabulary) of the targets of the extrapolation
TARGETS = {
    "Llama-2-7B": (32, 4096, 11008, 32, 32, 32000),
    "Llama-2-70B": (80, 8192, 28672, 64, 8, 32000),
}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def counts(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> tuple[int, int]:
    """(decoder-linear parameters, other parameters) of a Llama without tied embeddings."""
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate
    other = 2 * vocab * hidden + (2 * layers + 1) * hidden  # embeddings, head; two norms per layer and the last
    return layers * per_layer, other


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _weight_bytes(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(bytes, parameters) of the decoder linears' weights, then of everything else, counted from the tensors
    (bitsandbytes' absmax and nested constants included)."""
    lin_bytes = lin_n = other_bytes = other_n = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] in _LINEARS and hasattr(module, "in_features") and ".lora_" not in name:
            w = module.weight
            lin_n += module.in_features * module.out_features
            lin_bytes += w.numel() * w.element_size()
            qs = getattr(w, "quant_state", None) or getattr(w, "SCB", None)
            if isinstance(qs, torch.Tensor):  # LLM.int8's row scales
                lin_bytes += qs.numel() * qs.element_size()
            elif qs is not None:
                lin_bytes += sum(t.numel() * t.element_size() for t in qs.as_dict(packed=True).values()
                                 if isinstance(t, torch.Tensor))
            for b in module.buffers(recurse=False):
                lin_bytes += b.numel() * b.element_size()
    seen = {id(m.weight) for n, m in model.named_modules() if n.split(".")[-1] in _LINEARS and hasattr(m, "weight")}
    for name, p in model.named_parameters():
        if id(p) not in seen and "lora_" not in name:
            other_n += p.numel()
            other_bytes += p.numel() * p.element_size()
    return lin_bytes, lin_n, other_bytes, other_n


def _is_fsdp(path: str) -> bool:
    """Whether a path of :data:`PATHS` shards the model over :data:`RANKS` processes."""
    return PATHS[path].get("sharding") == "fsdp"


def _fsdp_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Of a model sharded by :func:`varlora.sharding.shard_model`: this rank's bytes of the base (its local shards
    of the base's parameters), the full bytes of the largest decoder layer (LoRA included) and of the root's own
    parameters (embeddings, head, last norm): what FSDP2 all-gathers (a layer at a time, the next one prefetched;
    the root's for the forward and again for the backward), and the number of LoRA parameters (full)."""
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    in_layers = {id(p) for m in layers for p in m.parameters()}
    named = list(model.named_parameters())
    return {"shard_bytes": sum(local(p).numel() * p.element_size() for n, p in named if "lora_" not in n),
            "layer_bytes": max(sum(p.numel() * p.element_size() for p in m.parameters()) for m in layers),
            "root_bytes": sum(p.numel() * p.element_size() for _, p in named if id(p) not in in_layers),
            "lora_n": sum(p.numel() for n, p in named if "lora_" in n)}


def measure(folder: str, path: str, method: str, steps: int, scoring: str) -> dict:
    """In a fresh process (one rank of a torchrun launch for an FSDP path): load through ``setup`` and run
    ``steps`` training steps; memory of each stage."""
    sharded = _is_fsdp(path)
    if sharded:
        distributed.init()  # gloo on the CPU, from torchrun's environment
    data_dir = resolve_data_dir() or find_demo_data()
    config = RunConfig.from_dict({
        "model": {"name": folder, **PATHS[path]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"task": "arc_easy", "scoring": scoring, "train_limit": BATCH * steps, "eval_limit": 1,
                 "max_length": 512, "data_dir": str(data_dir)},
        "method": {"name": method}, "train": {"steps": steps, "batch_size": BATCH, "seed": 21},
    })
    import bitsandbytes  # noqa: F401  (its libraries are not part of any path's cost)
    import peft.tuners.lora.bnb  # noqa: F401

    peak = PeakMemory(torch.device("cpu"))
    peak.reset()
    before = _rss()
    run_dir = tempfile.TemporaryDirectory()  # removed when the process ends
    session = setup(config, run_dir.name)
    # page in memory-mapped weights, as a GPU copy would: one read per page (a rank's shards are copies already)
    for t in [*session.model.parameters(), *session.model.buffers()]:
        t = local(t)
        float(t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum())
    load_peak = peak.read()
    gc.collect()
    after_load = _rss()
    lin_bytes, lin_n, other_bytes, other_n = _weight_bytes(session.model)  # full tensors' bytes, sharded or not
    shards = _fsdp_bytes(session.model) if sharded else {}
    session.model.train()
    m = build_method(session)
    m.setup()
    peak.reset()
    for step in range(steps):
        m.train_step(step)
    row = {"path": path, "before": before, "load_peak": load_peak - before, "loaded": after_load - before,
           "train_peak": peak.read() - before, "kind": peak.kind, "lin_bytes": lin_bytes, "lin_n": lin_n,
           "other_bytes": other_bytes, "other_n": other_n, "rank": distributed.rank(),
           "world": distributed.world_size(), **shards}
    if sharded:
        dist.destroy_process_group()
    return row


def _small_shape(hidden: int, layers: int) -> tuple[int, int, int, int, int, int]:
    """Llama-2-7B's proportions at ``hidden`` and ``layers`` (head size 128, no grouped KV)."""
    return layers, hidden, int(hidden * 11008 / 4096), max(1, hidden // 128), max(1, hidden // 128), 32000


def _tokenizer():
    """A byte-level BPE tokenizer (2,000 tokens) trained in memory on text where " A" .. " D" are single tokens,
    as the letter protocol needs (``_shapes.tokenizer`` has no such tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Question: Which of these is a mammal?\nAnswer: a whale a shark a trout"] * 10
                            + ["Choices: A. B. C. D. Answer: A B C D E"] * 40, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def _save_small_model(shape: tuple[int, ...], folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    L, h, inter, heads, kv, vocab = shape
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=L, num_attention_heads=heads,
        num_key_value_heads=kv, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)


def _measured(command: list[str], what: str, mmap_threshold: int) -> str:
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _fit(rows: dict[int, dict[str, Any]], path: str, L1: int, L2: int) -> tuple[float, float, float, float]:
    """(a, b) of the step increment a + b x layers through the two depths (an FSDP path: its largest rank's),
    and the two increments."""
    i1, i2 = (max(r["increment"] for r in _ranks(rows[L][path])) for L in (L1, L2))
    b = (i2 - i1) / (L2 - L1)
    return i1 - b * L1, b, i1, i2


def _ranks(row: dict | list[dict]) -> list[dict]:
    return row if isinstance(row, list) else [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs=2, default=[4, 8], help="the two depths L1 < L2 measured")
    parser.add_argument("--method", default="ivon")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--scoring", default="letter", choices=["letter", "cloze"],
                        help="letter (the paper preset's: one sequence per question, with or without checkpointing) "
                             "or cloze (its shared-prefix KV cache becomes one sequence per choice under "
                             "checkpointing, K times the tokens)")
    parser.add_argument("--world", type=int, default=8, help="GPUs of the FSDP paths' extrapolation")
    parser.add_argument("--mmap-threshold", type=int, default=2**20,
                        help="glibc's mmap threshold in the measuring processes, bytes (0: glibc's dynamic default)")
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        row = measure(args.folder, args.measure, args.method, args.steps, args.scoring)
        if args.out:  # one file per rank: torchrun interleaves the ranks' output
            Path(args.out, f"rank{row['rank']}.json").write_text(json.dumps(row))
        else:
            print(json.dumps(row))
        return
    h, (L1, L2) = args.hidden, args.layers
    shapes = {L: _small_shape(h, L) for L in (L1, L2)}
    rows: dict[int, dict[str, Any]] = {}
    model_dirs = {L: tempfile.TemporaryDirectory() for L in shapes}  # removed when the process ends
    for L, shape in shapes.items():
        folder = model_dirs[L].name
        _save_small_model(shape, folder)
        n_lin, n_other = counts(*shape)
        print(f"small model: {L} layers, hidden {h}, intermediate {shape[2]}, vocabulary {shape[5]}: "
              f"{n_lin / 1e6:.1f}M decoder-linear + {n_other / 1e6:.1f}M other parameters")
        rows[L] = {}
        for path in args.paths:
            what = f"{path} at {L} layers"
            command = [__file__, "--folder", folder, "--measure", path, "--method", args.method,
                       "--steps", str(args.steps), "--scoring", args.scoring]
            if _is_fsdp(path):
                with tempfile.TemporaryDirectory() as out:
                    _measured([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(RANKS), *command, "--out", out], what, args.mmap_threshold)
                    rows[L][path] = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(RANKS)]
            else:
                done = _measured([sys.executable, *command], what, args.mmap_threshold)
                rows[L][path] = json.loads(done.strip().splitlines()[-1])
    single = [p for p in args.paths if not _is_fsdp(p)]
    sharded = [p for p in args.paths if _is_fsdp(p)]
    print(f"\nmethod {args.method}, {args.steps} training steps of {BATCH} ARC-Easy questions ({args.scoring}), "
          f"LoRA r 8 on q,v; FSDP paths: {RANKS} processes (gloo), each {BATCH // RANKS} questions of every batch; "
          "memory above the RSS before loading (peak RSS from a trimmed heap), per process; glibc's mmap threshold "
          f"{f'{args.mmap_threshold:,} B' if args.mmap_threshold else 'dynamic (its default)'}\n")
    mib = 2**20
    print("| path | layers | bytes/param linear | bytes/param other | base weights MiB | of which this process's "
          "MiB | RSS after load MiB | load peak MiB | train-step peak MiB | step increment MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for L in (L1, L2):
        for path, row in rows[L].items():
            for r in _ranks(row):
                r["b_lin"], r["b_other"] = r["lin_bytes"] / r["lin_n"], r["other_bytes"] / r["other_n"]
                r["increment"] = r["train_peak"] - r["loaded"]
                base = r["lin_bytes"] + r["other_bytes"]
                name = f"{path} rank {r['rank']}" if isinstance(row, list) else path
                print(f"| {name} | {L} | {r['b_lin']:.4f} | {r['b_other']:.2f} | {base / mib:,.0f} | "
                      f"{r.get('shard_bytes', base) / mib:,.0f} | {r['loaded'] / mib:,.0f} | "
                      f"{r['load_peak'] / mib:,.0f} | {r['train_peak'] / mib:,.0f} | {r['increment'] / mib:,.0f} |")
    fits = {}
    print("\nstep increment = a + b x layers, from the two depths (an FSDP path: the larger rank's):")
    for path in args.paths:
        a, b, i1, i2 = fits[path] = _fit(rows, path, L1, L2)
        print(f"  {path}: b = ({i2 / mib:,.0f} - {i1 / mib:,.0f}) / ({L2} - {L1}) = {b / mib:,.1f} MiB per layer, "
              f"a = {i1 / mib:,.0f} - {L1} x b = {a / mib:,.0f} MiB")
    gb = 1e9
    for target, t_shape in TARGETS.items():
        n_lin, n_other = counts(*t_shape)
        width = t_shape[1] / h
        print(f"\n{target}: N_linear = {n_lin / 1e9:.3f}B, N_other = {n_other / 1e9:.3f}B; {t_shape[0]} layers, "
              f"width ratio {t_shape[1]}/{h} = {width:.0f}")
        print("| path | base = N_linear x b_linear + N_other x b_other | step = a + b x layers x width | total GB |")
        print("|---|---|---|---|")
        for path in single:
            r = rows[L2][path]
            a, b = fits[path][:2]
            base = n_lin * r["b_lin"] + n_other * r["b_other"]
            step = max(a, 0) + max(b, 0) * t_shape[0] * width
            print(f"| {path} | {n_lin / 1e9:.3f}B x {r['b_lin']:.4f} + {n_other / 1e9:.3f}B x {r['b_other']:.2f} = "
                  f"{base / gb:.1f} GB | {max(a, 0) / mib:,.0f} MiB + {max(b, 0) / mib:,.1f} MiB x {t_shape[0]} x "
                  f"{width:.0f} = {step / gb:.1f} GB | {(base + step) / gb:.1f} |")
    if sharded:
        _fsdp_extrapolation(rows, fits, sharded, h, L2, args.world)
    print("\n" + json.dumps(rows))


def _fsdp_extrapolation(rows: dict[int, dict[str, Any]], fits: dict, paths: list[str], h: int, L2: int,
                        world: int) -> None:
    """The FSDP paths' tables: per GPU, and rank 0's host memory while loading (see the module docstring)."""
    mib, gb = 2**20, 1e9
    per_rank = BATCH // RANKS
    print(f"\nFSDP2 on {world} GPUs, per GPU, at the measured per-rank batch of {per_rank} questions (a global "
          f"batch of {per_rank * world}): shards = base / {world}; gathered = the root's parameters (embeddings, "
          f"head, last norm, gathered in the forward and the backward) + {GATHERED_LAYERS} x the largest decoder "
          "layer (one computing, the next prefetched), full bf16; step = a' + b x layers x width, a' = a less the "
          f"small model's gathered weights (same assumption); LoRA = n_LoRA x {LORA_BYTES} B / {world} (an upper "
          f"bound; b holds the small model's too); + CUDA context {CUDA_CONTEXT / gb:.1f} GB + NCCL "
          f"{NCCL / gb:.1f} GB (assumed: a CPU run has neither)")
    for path in paths:
        r0, r1 = rows[L2][path][:2]
        gathered = r0["root_bytes"] + GATHERED_LAYERS * r0["layer_bytes"]
        a, b = fits[path][:2]
        print(f"  {path}, small model at {L2} layers: gathered = {r0['root_bytes'] / mib:,.0f} MiB + "
              f"{GATHERED_LAYERS} x {r0['layer_bytes'] / mib:,.1f} MiB = {gathered / mib:,.0f} MiB, "
              f"a' = {a / mib:,.0f} - {gathered / mib:,.0f} = {(a - gathered) / mib:,.0f} MiB; loading: rank 0 peaked "
              f"at {r0['load_peak'] / mib:,.0f} MiB = {r0['load_peak'] / (r0['lin_bytes'] + r0['other_bytes']):.2f} "
              f"x the base (its file's float32 pages and its own shards included), rank 1 at "
              f"{r1['load_peak'] / mib:,.0f} MiB = its shards {r1['shard_bytes'] / mib:,.0f} MiB + "
              f"{(r1['load_peak'] - r1['shard_bytes']) / mib:,.0f} MiB")
    for target, (L, ht, inter, heads, kv, vocab) in TARGETS.items():
        n_lin, n_other = counts(L, ht, inter, heads, kv, vocab)
        width = ht / h
        n_lora = L * 8 * ((ht + ht) + (ht + ht // heads * kv))  # r 8 on q (h -> h) and v (h -> kv)
        print(f"\n{target} on {world} GPUs: layer = {n_lin / L / 1e6:,.1f}M linear + {2 * ht:,} norm parameters, "
              f"root = {(2 * vocab * ht + ht) / 1e6:,.1f}M, n_LoRA = {n_lora / 1e6:.1f}M; width ratio {width:.0f}")
        print("| path | shards = base / world | gathered = root + layers x layer | step = a' + b x layers x width "
              "| LoRA | CUDA + NCCL | per GPU GB | host while loading: rank 0 / others |")
        print("|---|---|---|---|---|---|---|---|")
        for path in paths:
            r = rows[L2][path][0]
            a, b = fits[path][:2]
            base = n_lin * r["b_lin"] + n_other * r["b_other"]
            layer, root = n_lin / L * r["b_lin"] + 2 * ht * r["b_other"], (2 * vocab * ht + ht) * r["b_other"]
            gathered = root + GATHERED_LAYERS * layer
            a_rest = max(a - r["root_bytes"] - GATHERED_LAYERS * r["layer_bytes"], 0)
            step = a_rest + max(b, 0) * L * width
            lora = n_lora * LORA_BYTES / world
            total = base / world + gathered + step + lora + CUDA_CONTEXT + NCCL
            print(f"| {path} | {base / gb:.1f} GB / {world} = {base / world / gb:.2f} GB | {root / gb:.2f} GB + "
                  f"{GATHERED_LAYERS} x {layer / gb:.2f} GB = {gathered / gb:.2f} GB | {a_rest / mib:,.0f} MiB + "
                  f"{max(b, 0) / mib:,.1f} MiB x {L} x {width:.0f} = {step / gb:.1f} GB | {lora / gb:.2f} GB | "
                  f"{(CUDA_CONTEXT + NCCL) / gb:.1f} GB | {total / gb:.1f} | {base / gb:.1f} GB / 0 |")
    print("  while loading, a GPU holds its shards and one full tensor being broadcast (at most the embeddings: "
          "vocabulary x hidden x 2 B, 0.52 GB at 70B); rank 0's host holds the base (bf16, as loaded; more while "
          "the checkpoint's pages are mapped), the other ranks' hosts none of it")


if __name__ == "__main__":
    main()
