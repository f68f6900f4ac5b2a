"""Cost of an S-sample posterior evaluation against S evaluations at the mean, on CPU.

The model is a randomly initialised Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV
heads, MLP 1536, vocabulary 49,152; ``--layers`` to shrink it) with rank-8 LoRA on q_proj and v_proj and a
random mean-field posterior; the examples are ARC-Easy validation questions (the shared data folder, else
made-up 4-way questions), scored with the cloze protocol (shared-prefix KV cache). Timed alternately in one
process, per repeat:

* ``mean``: one evaluation at the posterior mean (``predict_logits``);
* ``batched``: S samples in one folded forward per batch (``eval.batched_samples = true``);
* ``sequential``: S forwards, one per sample (``eval.batched_samples = false``, the default: the batched path
  is not faster on CPU, where both do the same FLOPs on batches that already fill a core).

The ratio reported is median(batched) / (S × median(mean)); the goal is ≤ 0.6. The output starts with the
CPU model and the thread count. Run: ``python benchmarks/sampled_eval.py [--samples 10] [--examples 16]
[--batch-size 8] [--repeats 3] [--threads 1] [--layers 30]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from varlora._batched_lora import batched_lora
from varlora.config import LoraArgs
from varlora.evaluate import predict_logits
from varlora.models import attach_lora, lora_parameters
from varlora.optim.sampling import perturbed_named_params, stacked_named_samples
from varlora.scoring import make_scorer
from varlora.tasks import Example, get_task


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tokenizer():
    """A byte-level BPE tokenizer trained in memory (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Question: Which of these is a mammal?\nAnswer: a whale a shark a trout"] * 10,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def examples(n: int) -> tuple[list[Example], str]:
    try:
        return get_task("arc_easy").load("validation", limit=n, seed=0), "ARC-Easy validation"
    except (FileNotFoundError, ValueError):
        words = ["red", "blue", "green", "pink", "black", "white"]
        return [Example(f"q{i}", f"Which of these colours is {words[i % 6]}, as the painter said?",
                        tuple(words[(i + j) % 6] for j in range(4)), 0) for i in range(n)], "made-up questions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential path (saves time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = attach_lora(LlamaForCausalLM(config).eval(), LoraArgs(r=8, alpha=16), seed=0).eval()
    params = lora_parameters(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    stds = {n: 0.01 * torch.rand(p.shape, generator=gen) for n, p in params.items()}
    data, source = examples(args.examples)
    task = get_task("arc_easy")
    scorer = make_scorer("cloze", tokenizer(), task, max_length=512)
    S, bs = args.samples, args.batch_size

    def mean() -> None:
        predict_logits(model, scorer, data, bs)

    def batched() -> None:
        samples = stacked_named_samples(params, stds, tau=1.0, generator=torch.Generator().manual_seed(0),
                                        n_samples=S)
        with batched_lora(model, samples) as n:
            predict_logits(model, scorer, data, bs, n_samples=n)

    def sequential() -> None:
        g = torch.Generator().manual_seed(0)
        for _ in range(S):
            with perturbed_named_params(params, stds, tau=1.0, generator=g):
                predict_logits(model, scorer, data, bs)

    cases = {"mean": mean, "batched": batched} | ({} if args.no_sequential else {"sequential": sequential})
    print(f"CPU: {cpu_model()}; torch threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"model: random Llama, SmolLM2-135M shape with {args.layers} layers "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), LoRA r=8 on q_proj, v_proj; "
          f"{len(data)} {source} questions, cloze, batch {bs}; S = {S}; {args.repeats} repeats")
    mean()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, value in med.items():
        print(f"{name:>10}: median {value:7.3f} s  ({', '.join(f'{t:.3f}' for t in times[name])})")
    ratio = med["batched"] / (S * med["mean"])
    print(f"S = {S} batched sampled evaluation / ({S} x evaluation at the mean): {ratio:.2f} (goal <= 0.6)")
    if "sequential" in med:
        print(f"S = {S} sequential sampled evaluation / ({S} x evaluation at the mean): "
              f"{med['sequential'] / (S * med['mean']):.2f}")


if __name__ == "__main__":
    main()
