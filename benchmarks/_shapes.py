"""What the benchmarks need where no model or data can be read (a lent GPU machine has neither the hub nor
``../shared``): randomly initialised Llama models of real sizes, built directly on the device in the dtype
asked for, a byte-level BPE tokenizer trained in memory, and ARC-Easy questions from the local data folder or,
without one, the demo's packaged questions. Speed and memory depend on the shapes, not on the weights' values.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from varlora.assets import find_demo_data
from varlora.tasks import Example, get_task, resolve_data_dir

#: LlamaConfig fields of the architectures the benchmarks time (vocabulary, widths, layers, heads)
SHAPES = {
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
                     "tie_word_embeddings": True},
    "llama-2-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                   "tie_word_embeddings": False},
}


def random_model(shape: str, layers: int | None = None, dtype: str = "float32", device: str = "cpu",
                 seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` (``layers`` overrides its depth), made in
    ``dtype`` (a torch dtype's name) on ``device`` (no copy through host memory: a 7B model is built on the GPU
    directly)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = SHAPES[shape] | ({"num_hidden_layers": layers} if layers else {})
    config = LlamaConfig(**fields, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def describe(model: torch.nn.Module, shape: str) -> str:
    config = model.config
    return (f"random Llama of {shape}'s shape, {config.num_hidden_layers} layers "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M parameters, {model.dtype})")


def tokenizer():
    """A byte-level BPE tokenizer (2,000 tokens, ids below every shape's vocabulary) trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Question: Which of these is a mammal?\nAnswer: a whale a shark a trout"] * 10,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def examples(n: int, split: str = "validation") -> tuple[list[Example], str]:
    """``n`` ARC-Easy questions of ``split`` (seed-0 subset) from the local data folder (``$VARLORA_DATA_DIR``,
    else ``../shared/data``), else from the demo's packaged ones; never the hub (a GPU machine is offline)."""
    folder = resolve_data_dir() or find_demo_data()
    return get_task("arc_easy").load(split, data_dir=folder, limit=n, seed=0), f"ARC-Easy {split} questions"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a timer read after it counts that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
