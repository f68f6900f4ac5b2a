"""Shared fixtures: tiny seeded random models built from a config, and paths to the shared real assets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(seed: int = 0, vocab_size: int = 320, dtype: torch.dtype = torch.float32, hidden_size: int = 32,
               tie_word_embeddings: bool = False):
    """A 2-layer random Llama small enough to train in milliseconds (``hidden_size`` 64 or more for bitsandbytes'
    CPU 4-bit kernel, which packs the input dimension in blocks of 64; ``tie_word_embeddings``: the head is the
    embedding, as in SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared busy machine threads make them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama():
    return tiny_llama()


requires_shared = pytest.mark.skipif(
    not (SHARED_MODEL.exists() and SHARED_DATA.exists()), reason="shared model/data not present"
)


_TOKENIZER_CORPUS = [
    "Select one of the choices that answers the following question: Choices: A. B. C. D. Answer:",
    "Question: Which of these is a mammal?\nAnswer: a whale a shark a trout a frog",
    "Answer the question with only True or False: Context: True False",
    "The trophy does not fit into the suitcase because the _ is too large.",
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory (no hub): every string is encodable, vocab < 320."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


TINY_VOCAB = 320


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


_LETTER_CORPUS = _TOKENIZER_CORPUS + [" A B C D True False yes no Answer: A"] * 40


def tiny_letter_tokenizer(add_bos: bool = False):
    """Like :func:`tiny_tokenizer`, trained on a corpus where " A".." D", " True", " False" become single
    tokens; ``add_bos`` makes it prepend ``<s>`` (as Llama/Gemma tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_LETTER_CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


@pytest.fixture(scope="module")
def letter_tokenizer():
    return tiny_letter_tokenizer()


WORDS = ["red", "blue", "green", "gold", "gray", "pink", "black", "white"]


def write_colour_data(folder: Path, n: int, seed: int) -> Path:
    """A learnable 4-way task: the answer is the colour named in the question."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        choices = [WORDS[j] for j in torch.randperm(len(WORDS), generator=gen)[:4].tolist()]
        answer = int(torch.randint(4, (1,), generator=gen))
        rows.append({"id": f"s{seed}q{i}", "question": f"Which colour is {choices[answer]}?", "choices": choices,
                     "answer": answer})
    path = folder / f"data{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_assets(folder: Path, n_train: int = 48, n_val: int = 16, hidden_size: int = 32) -> dict[str, str]:
    """A tiny Llama with its tokenizer and a jsonl task, saved in ``folder``."""
    tiny_llama(seed=0, hidden_size=hidden_size).save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    train, val = write_colour_data(folder, n_train, seed=1), write_colour_data(folder, n_val, seed=2)
    return {"model": str(folder / "model"), "task": f"jsonl:train={train},validation={val}"}


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """Every leaf of a (nested) state dict, keyed by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}/{key}").items()}
    if isinstance(value, list | tuple):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def assert_identical(a: dict, b: dict) -> None:
    """The two (nested) state dicts have the same leaves: tensors bitwise equal, everything else equal."""
    a, b = _flatten(a), _flatten(b)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
