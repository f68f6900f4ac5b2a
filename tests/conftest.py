"""Shared fixtures: tiny seeded random models built from a config, and paths to the shared real assets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(seed: int = 0, vocab_size: int = 64, dtype: torch.dtype = torch.float32):
    """A 2-layer random Llama small enough to train in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def llama():
    return tiny_llama()


requires_shared = pytest.mark.skipif(
    not (SHARED_MODEL.exists() and SHARED_DATA.exists()), reason="shared model/data not present"
)
