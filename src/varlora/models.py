"""Load a causal LM (hub id, local folder or GGUF file) and attach LoRA adapters with peft.

The base model is frozen in the requested dtype; the LoRA weights are always float32 (peft's
``autocast_adapter_dtype``), so that optimizer states and posterior variances never live in bf16.

Two third-party warnings that say nothing to a varlora user are silenced where they arise, by category and
message only: transformers' ``is_gradient_checkpointing`` deprecation, which peft triggers when it wraps a model
(:func:`attach_lora`), and peft's "Could not find a config file" on saving an adapter whose base is a GGUF file
(:func:`save_adapter`; peft looks for the base's ``config.json`` to tell whether the vocabulary was resized, which
varlora never does). Every other warning passes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from varlora.config import LoraArgs

__all__ = ["ModelLoadError", "resolve_model_source", "load_base_model", "prepare_base_model", "load_tokenizer",
           "attach_lora", "lora_parameters", "save_adapter"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# (category, message regex) of the silenced warnings, matched from the start of the message
_GRADIENT_CHECKPOINTING_DEPRECATION = (FutureWarning, r"`is_gradient_checkpointing` is deprecated")
_NO_BASE_CONFIG = (
    UserWarning, r"Could not find a config file in .* - will assume that the vocabulary was not modified"
)


@contextmanager
def _silenced(*warnings_: tuple[type[Warning], str]) -> Iterator[None]:
    """Ignore exactly these (category, message) warnings inside the block."""
    with warnings.catch_warnings():
        for category, message in warnings_:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


class ModelLoadError(ValueError):
    """The model source does not exist or cannot be read."""


def resolve_model_source(name: str) -> tuple[str, str | None]:
    """Map a model name to ``(name_or_folder, gguf_file)`` for ``from_pretrained``.

    A path ending in ``.gguf`` becomes its folder plus the file name; an existing folder is used as is;
    anything else is treated as a hub id (which needs the network).
    """
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file but not a .gguf file")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {path} has no config.json")
        return str(path), None
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path not found: {path}")
    return name, None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer with left padding and a pad token (the EOS token when it has none)."""
    source, gguf_file = resolve_model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name: str, dtype: str = "float32") -> PreTrainedModel:
    """The frozen base causal LM in ``dtype``, in eval mode."""
    source, gguf_file = resolve_model_source(name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=_DTYPES[dtype])
    if gguf_file is not None:
        # The GGUF loader de-quantises to plain floats but leaves a quantizer marker that makes
        # peft/transformers treat the model as quantized; the weights are ordinary tensors now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return prepare_base_model(model)


def prepare_base_model(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze ``model`` in place (no gradients, eval mode) and give its config a pad token id (the EOS id when it
    has none), as LoRA training on top of it expects."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    model.requires_grad_(False)
    return model.eval()


def attach_lora(model: PreTrainedModel, args: LoraArgs, seed: int) -> PeftModel:
    """Wrap ``model`` with float32 LoRA adapters initialised from ``seed`` (A ~ Kaiming-uniform, B = 0)."""
    targets: str | list[str] = "all-linear" if args.target_modules == ["all-linear"] else list(args.target_modules)
    config = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
        task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _silenced(_GRADIENT_CHECKPOINTING_DEPRECATION):
            return get_peft_model(model, config, autocast_adapter_dtype=True)


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name, in a stable (sorted) order."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no trainable parameters: was LoRA attached?")
    return dict(sorted(named.items()))


def save_adapter(model: PeftModel, folder: str | os.PathLike[str]) -> None:
    """``model.save_pretrained(folder)`` (``adapter_model.safetensors``, ``adapter_config.json``) without peft's
    warning that a GGUF base has no ``config.json``."""
    with _silenced(_NO_BASE_CONFIG):
        model.save_pretrained(folder)
