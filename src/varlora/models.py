"""Load a causal LM (hub id, local folder or GGUF file) and attach LoRA adapters with peft.

The base model is frozen in the requested dtype, optionally quantised to 4 or 8 bits by bitsandbytes (QLoRA),
loaded straight onto its device; the LoRA weights are always float32 (peft's ``autocast_adapter_dtype``), so that
optimizer states and posterior variances never live in bf16.

Two third-party warnings that say nothing to a varlora user are silenced where they arise, by category and
message only: transformers' ``is_gradient_checkpointing`` deprecation, which peft triggers when it wraps a model
(:func:`attach_lora`), and peft's "Could not find a config file" on saving an adapter whose base is a GGUF file
(:func:`save_adapter`; peft looks for the base's ``config.json`` to tell whether the vocabulary was resized, which
varlora never does). On an 8-bit base, bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on
every forward of every layer (LLM.int8 always quantises float16 inputs; the float32 activations of a k-bit-prepared
model are expected): :func:`quantization_config` drops exactly that log record. Every other warning passes.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from varlora import distributed
from varlora.config import ConfigError, LoraArgs, ModelArgs

__all__ = ["ModelLoadError", "resolve_model_source", "load_base_model", "empty_base_model", "prepare_base_model",
           "quantization_config", "is_kbit", "set_tf32", "load_tokenizer", "attach_lora", "lora_parameters",
           "save_adapter"]

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


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for bitsandbytes' per-forward "inputs will be cast to float16" notice."""
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast from")


def quantization_config(args: ModelArgs) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``args.quantization`` (None for ``"none"``): 4bit is QLoRA's NF4 with
    double quantisation, computing in ``args.dtype``; 8bit is LLM.int8. Raises ConfigError naming the field where
    bitsandbytes is not installed (it is the optional extra ``qlora``)."""
    if args.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401  (transformers checks it too, with a less direct message)
    except ImportError as err:
        raise ConfigError(f"invalid model.quantization={args.quantization!r}: bitsandbytes is not installed "
                          "(pip install 'varlora[qlora]', or bitsandbytes with --no-deps beside your torch)") from err
    from transformers import BitsAndBytesConfig

    if args.quantization == "8bit":
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        if _drop_int8_cast_notice not in bnb_log.filters:
            bnb_log.addFilter(_drop_int8_cast_notice)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_DTYPES[args.dtype])


def _device_map(args: ModelArgs, device: torch.device) -> str | dict[str, torch.device]:
    if args.device_map == "local":
        return {"": device}
    if distributed.launch_env().world_size > 1:
        raise ConfigError("invalid model.device_map='auto': it spreads one model over every GPU, for one process; "
                          "under torchrun every rank holds its own copy (use model.device_map=local)")
    return "auto"


def load_base_model(args: ModelArgs, device: torch.device | str | None = None) -> PreTrainedModel:
    """The frozen base causal LM of ``args`` (dtype, quantisation, attention kernel, checkpointing), in eval mode.

    transformers builds the model on the meta device and loads each weight straight to where ``device_map`` puts
    it (``local``: all on ``device``, by default this process's, :func:`varlora.distributed.local_device`), so a base
    larger than the host's memory is never materialised there whole. A quantised base is quantised as its weights
    load (bitsandbytes) and prepared as peft's ``prepare_model_for_kbit_training`` does (:func:`prepare_base_model`).
    """
    source, gguf_file = resolve_model_source(args.name)
    device = torch.device(device) if device is not None else distributed.local_device()
    kwargs: dict[str, Any] = {"gguf_file": gguf_file, "dtype": _DTYPES[args.dtype],
                              "attn_implementation": args.attn_implementation, "device_map": _device_map(args, device)}
    if args.quantization != "none":
        kwargs["quantization_config"] = quantization_config(args)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if gguf_file is not None:
        # The GGUF loader de-quantises to plain floats but leaves a quantizer marker that makes
        # peft/transformers treat the model as quantized; the weights are ordinary tensors now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return prepare_base_model(model, args)


def empty_base_model(args: ModelArgs) -> PreTrainedModel:
    """The base :func:`load_base_model` loads, built from the model's config on the meta device: every weight and
    buffer a placeholder without memory, of the same shape and dtype, tied weights tied, frozen and prepared alike
    (attention kernel, checkpointing), so that LoRA attaches to it as to the loaded base. Nothing is read but the
    config; the values come later, from a rank that loaded them (:func:`varlora.sharding.load_sharded_model`).
    ``args.quantization`` must be ``"none"`` (a sharded base is never quantised)."""
    source, gguf_file = resolve_model_source(args.name)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)  # a GGUF file's config carries no quantizer
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[args.dtype],
                                                 attn_implementation=args.attn_implementation)
    return prepare_base_model(model, args)


def is_kbit(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are bitsandbytes 4- or 8-bit (a GGUF base is plain floats once loaded)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_base_model(model: PreTrainedModel, args: ModelArgs | None = None) -> PreTrainedModel:
    """Freeze ``model`` in place (no gradients, eval mode) and give its config a pad token id (the EOS id when it
    has none), as LoRA training on top of it expects.

    A bitsandbytes-quantised base goes through peft's ``prepare_model_for_kbit_training`` (its non-quantised
    weights, norms, embeddings and head, become float32, so LoRA's float32 activations and gradients meet no bf16
    rounding on the way); with ``args.gradient_checkpointing`` each decoder layer is recomputed in the backward pass
    (non-reentrant ``torch.utils.checkpoint``, which needs no input that requires a gradient). Checkpointing acts in
    train mode only.
    """
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if is_kbit(model):
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight (bf16 scales) at its first eval-mode
            # forward without gradients and uses that kernel for every later forward: outputs would depend on
            # which forward came first (1e-3 apart on a tiny Llama), so a reloaded run would not reproduce its own
            # predictions. The plain de-quantising path is kept, with or without gradients (no effect on a GPU).
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    if args is not None and args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"invalid model.gradient_checkpointing=True: {type(model).__name__} does not support it")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.eval()


def set_tf32(device: torch.device, enabled: bool) -> None:
    """On a CUDA ``device``, let float32 matmuls run on TF32 tensor cores (``enabled``) or in full IEEE float32;
    on any other device leave torch's process-wide setting alone (it concerns CUDA only)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"


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
