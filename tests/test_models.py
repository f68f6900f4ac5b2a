"""Model loading and LoRA: sources, fp32 adapters on a bf16 base, GPT-2 Conv1D, errors."""

import pytest
import torch

from conftest import tiny_llama
from varlora.config import LoraArgs, ModelArgs
from varlora.models import ModelLoadError, attach_lora, load_base_model, lora_parameters, resolve_model_source


def test_resolve_model_source(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "m.gguf")
    assert resolve_model_source("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", None)
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ModelLoadError, match="model path not found"):
        resolve_model_source("./nowhere")


def test_lora_is_float32_on_a_bfloat16_base_and_only_lora_trains(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    base = load_base_model(ModelArgs(name=str(tmp_path), dtype="bfloat16"))
    model = attach_lora(base, LoraArgs(r=4, target_modules=["all-linear"]), seed=0)
    params = lora_parameters(model)
    assert params and all("lora_" in n and p.dtype == torch.float32 for n, p in params.items())
    assert {n.split(".")[-4] for n in params} >= {"q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in frozen)
    out = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    out.float().sum().backward()
    assert all(p.grad is not None for p in params.values())


def test_same_seed_same_lora_init_and_other_seed_differs():
    a = lora_parameters(attach_lora(tiny_llama(), LoraArgs(r=4), seed=1))
    b = lora_parameters(attach_lora(tiny_llama(), LoraArgs(r=4), seed=1))
    c = lora_parameters(attach_lora(tiny_llama(), LoraArgs(r=4), seed=2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a if "lora_A" in n)


def test_gpt2_conv1d_model_trains_with_lora():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    model = attach_lora(base, LoraArgs(r=2, target_modules=["c_attn"], dropout=0.0), seed=0)
    params = lora_parameters(model)
    assert len(params) == 4  # A and B in each of the 2 layers
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in params.items() if "lora_B" in n)


def test_lora_parameters_requires_an_adapter():
    with pytest.raises(ValueError, match="no trainable parameters"):
        lora_parameters(tiny_llama().requires_grad_(False))
