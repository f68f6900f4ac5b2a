"""Peak memory of each loading and precision path, measured on a small random Llama on the CPU and extrapolated
per parameter to Llama-2-7B and Llama-2-70B.

Paths: the base in float32, in bfloat16, bfloat16 with gradient checkpointing, 8-bit and 4-bit (bitsandbytes,
compute in bfloat16, as ``model.dtype auto`` gives on an Ampere-or-later GPU), and 4-bit with checkpointing. Each
runs in a fresh process: the model is loaded from a safetensors folder by :func:`varlora.session.setup` (meta
device, ``device_map``, quantised as it loads), then two training steps of ``--method`` run on fixed batches of
ARC-Easy questions (``--scoring letter``, the paper preset's protocol, by default). Every weight is read once
after loading, so that the pages of a memory-mapped safetensors file count as the copy onto a GPU would.
Measured (:class:`varlora.cost.PeakMemory`, the process's peak RSS from a trimmed heap): the peak while loading
and the peak of the steps, each minus the RSS before loading (the interpreter and the libraries), and the RSS
right after loading. Counted exactly from the tensors: the bytes of the base's weights (parameters, buffers and
bitsandbytes' quantisation constants) per decoder-linear parameter (the weights quantisation applies to) and per
other parameter (embeddings, head, norms: these stay float, float32 once peft's
``prepare_model_for_kbit_training`` has upcast them).

Extrapolation: base bytes = N_linear × b_linear + N_other × b_other with the architectures' exact counts. The
training-step increment above the loaded base (activations, LoRA gradients, optimizer state) is measured at two
depths, L1 and L2 layers, and split into a + b·L: ``a`` (the logits of the continuation tokens over the 32,000-word
vocabulary, the same for every Llama-2) is kept, the per-layer ``b`` is scaled by the target's hidden size over the
small model's (the same questions: a layer's activations grow with its width), so step = a + b × L_target ×
h_target / h. A GPU adds its CUDA context (~0.5 GB).

    python benchmarks/memory_paths.py [--hidden 1024 --layers 4 8] [--method ivon] [--paths fp32 bf16 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from varlora.assets import find_demo_data
from varlora.config import RunConfig
from varlora.cost import PeakMemory
from varlora.methods import build_method
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
}
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


def measure(folder: str, path: str, method: str, steps: int, scoring: str) -> dict:
    """In a fresh process: load through ``setup`` and run ``steps`` training steps; memory of each stage."""
    data_dir = resolve_data_dir() or find_demo_data()
    config = RunConfig.from_dict({
        "model": {"name": folder, **PATHS[path]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"task": "arc_easy", "scoring": scoring, "train_limit": 4 * steps, "eval_limit": 1,
                 "max_length": 512, "data_dir": str(data_dir)},
        "method": {"name": method}, "train": {"steps": steps, "batch_size": 4, "seed": 21},
    })
    import bitsandbytes  # noqa: F401  (its libraries are not part of any path's cost)
    import peft.tuners.lora.bnb  # noqa: F401

    peak = PeakMemory(torch.device("cpu"))
    peak.reset()
    before = _rss()
    session = setup(config, tempfile.mkdtemp())
    for t in [*session.model.parameters(), *session.model.buffers()]:  # page in memory-mapped weights, as a GPU
        float(t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum())  # copy would: one read per page
    load_peak = peak.read()
    gc.collect()
    after_load = _rss()
    lin_bytes, lin_n, other_bytes, other_n = _weight_bytes(session.model)
    session.model.train()
    m = build_method(session)
    m.setup()
    peak.reset()
    for step in range(steps):
        m.train_step(step)
    return {"path": path, "before": before, "load_peak": load_peak - before, "loaded": after_load - before,
            "train_peak": peak.read() - before, "kind": peak.kind, "lin_bytes": lin_bytes, "lin_n": lin_n,
            "other_bytes": other_bytes, "other_n": other_n}


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


def _save_small_model(shape: tuple[int, ...]) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    L, h, inter, heads, kv, vocab = shape
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=L, num_attention_heads=heads,
        num_key_value_heads=kv, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


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
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.folder, args.measure, args.method, args.steps, args.scoring)))
        return
    h, (L1, L2) = args.hidden, args.layers
    shapes = {L: _small_shape(h, L) for L in (L1, L2)}
    rows: dict[int, dict[str, dict]] = {}
    for L, shape in shapes.items():
        folder = _save_small_model(shape)
        n_lin, n_other = counts(*shape)
        print(f"small model: {L} layers, hidden {h}, intermediate {shape[2]}, vocabulary {shape[5]}: "
              f"{n_lin / 1e6:.1f}M decoder-linear + {n_other / 1e6:.1f}M other parameters")
        rows[L] = {}
        for path in args.paths:
            command = [sys.executable, __file__, "--folder", folder, "--measure", path, "--method", args.method,
                       "--steps", str(args.steps), "--scoring", args.scoring]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{path} at {L} layers failed:\n{done.stderr[-3000:]}")
            rows[L][path] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nmethod {args.method}, {args.steps} training steps of 4 ARC-Easy questions ({args.scoring}), "
          "LoRA r 8 on q,v; memory above the RSS before loading (peak RSS from a trimmed heap)\n")
    mib = 2**20
    print("| path | layers | bytes/param linear | bytes/param other | base weights MiB | RSS after load MiB "
          "| load peak MiB | train-step peak MiB | step increment MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for L in (L1, L2):
        for r in rows[L].values():
            r["b_lin"], r["b_other"] = r["lin_bytes"] / r["lin_n"], r["other_bytes"] / r["other_n"]
            r["increment"] = r["train_peak"] - r["loaded"]
            print(f"| {r['path']} | {L} | {r['b_lin']:.4f} | {r['b_other']:.2f} | "
                  f"{(r['lin_bytes'] + r['other_bytes']) / mib:,.0f} | {r['loaded'] / mib:,.0f} | "
                  f"{r['load_peak'] / mib:,.0f} | {r['train_peak'] / mib:,.0f} | {r['increment'] / mib:,.0f} |")
    fits = {}
    print("\nstep increment = a + b x layers, from the two depths:")
    for path in args.paths:
        i1, i2 = rows[L1][path]["increment"], rows[L2][path]["increment"]
        b = (i2 - i1) / (L2 - L1)
        fits[path] = (i1 - b * L1, b)
        print(f"  {path}: b = ({i2 / mib:,.0f} - {i1 / mib:,.0f}) / ({L2} - {L1}) = {b / mib:,.1f} MiB per layer, "
              f"a = {i1 / mib:,.0f} - {L1} x b = {fits[path][0] / mib:,.0f} MiB")
    gb = 1e9
    for target, t_shape in TARGETS.items():
        n_lin, n_other = counts(*t_shape)
        width = t_shape[1] / h
        print(f"\n{target}: N_linear = {n_lin / 1e9:.3f}B, N_other = {n_other / 1e9:.3f}B; {t_shape[0]} layers, "
              f"width ratio {t_shape[1]}/{h} = {width:.0f}")
        print("| path | base = N_linear x b_linear + N_other x b_other | step = a + b x layers x width | total GB |")
        print("|---|---|---|---|")
        for path in args.paths:
            r = rows[L2][path]
            a, b = fits[path]
            base = n_lin * r["b_lin"] + n_other * r["b_other"]
            step = max(a, 0) + max(b, 0) * t_shape[0] * width
            print(f"| {path} | {n_lin / 1e9:.3f}B x {r['b_lin']:.4f} + {n_other / 1e9:.3f}B x {r['b_other']:.2f} = "
                  f"{base / gb:.1f} GB | {max(a, 0) / mib:,.0f} MiB + {max(b, 0) / mib:,.1f} MiB x {t_shape[0]} x "
                  f"{width:.0f} = {step / gb:.1f} GB | {(base + step) / gb:.1f} |")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
