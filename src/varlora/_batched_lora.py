r"""S posterior samples of the LoRA weights in one forward pass.

The batch is repeated S times along its first axis, sample-major (rows [s·B, (s+1)·B) belong to sample s,
:func:`fold_batch`), and inside :func:`batched_lora` every peft ``lora.Linear`` computes

.. math:: y = W_0 x + \mathrm{scale}\cdot B_s A_s\, \mathrm{dropout}(x)

for the rows of sample s, with :math:`A_s, B_s` from (S, r, d_in) and (S, d_out, r) stacks and batched matmuls
(``torch.bmm``): the base weights run once on the folded batch, and no parameter is modified. Any module
that keeps rows apart (attention, norms, the KV cache of the scorer's shared-prefix path, whose rows are
repeated with ``repeat_interleave`` inside each sample's block) preserves the sample-major layout, so every
layer sees rows[i] belong to sample ``i // (rows / S)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["lora_layers", "batched_lora", "fold_batch"]


def _linear_lora_classes() -> tuple[type, ...]:
    """peft's LoRA layers on a linear base: ``lora.Linear`` and, where bitsandbytes is installed, its 8-bit and
    4-bit linears (a quantised base, :mod:`varlora.models`), which compute ``base_layer(x)`` plus the same LoRA
    term."""
    from peft.tuners.lora import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # peft defines them only where bitsandbytes imports
        return (Linear,)
    return Linear, Linear8bitLt, Linear4bit


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple[torch.nn.Module, str, str]]:
    """peft LoRA linear layers by module name → (layer, name of its A weight, name of its B weight)."""
    classes = _linear_lora_classes()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, classes) and adapter in module.lora_A:
            out[name] = (module, f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight")
    return out


def supports(model: torch.nn.Module, names: set[str], adapter: str = "default") -> bool:
    """Whether the parameters ``names`` are exactly the A and B weights of vanilla LoRA linear layers (no DoRA
    or other variant, not merged), so that :func:`batched_lora` can sample all of them."""
    layers = lora_layers(model, adapter)
    covered = {n for _, a, b in layers.values() for n in (a, b)}
    plain = all(adapter not in m.lora_variant and not m.merged for m, _, _ in layers.values())
    return plain and covered == names


def fold_batch(batch: Mapping[str, Tensor], n_samples: int) -> dict[str, Tensor]:
    """Every tensor of a collated batch repeated ``n_samples`` times along its first axis, sample-major."""
    return {k: v.repeat(n_samples, *([1] * (v.dim() - 1))) for k, v in batch.items()}


def _forward(layer: torch.nn.Module, adapter: str, A: Tensor, B: Tensor):
    """A replacement for ``layer.forward`` applying sample s's (A_s, B_s) to the s-th block of rows."""
    S = A.shape[0]
    scale = layer.scaling[adapter]
    dropout = layer.lora_dropout[adapter]

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        if x.shape[0] % S:
            raise RuntimeError(f"batched_lora: {x.shape[0]} rows do not fold into {S} samples")
        h = dropout(layer._cast_input_dtype(x, A.dtype))
        lead = h.shape[:-1]
        h = h.reshape(S, -1, h.shape[-1])  # (S, rows/S · T, d_in)
        delta = torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2))  # (S, rows/S · T, d_out)
        return (result + delta.reshape(*lead, -1) * scale).to(result.dtype)

    return forward


@contextlib.contextmanager
def batched_lora(model: torch.nn.Module, samples: Mapping[str, Tensor], adapter: str = "default") -> Iterator[int]:
    """Inside the block, the LoRA layers of ``model`` apply per-sample weights to sample-major folded batches.

    Args:
        model: a peft model with vanilla LoRA linear layers.
        samples: parameter name (as in ``model.named_parameters()``) → (S, \\*shape) sampled values, for the A
            and B weights of every LoRA layer (``ValueError`` otherwise).

    Yields S. The layers' ``forward`` is restored on exit, also when the body raises.
    """
    layers = lora_layers(model, adapter)
    if not supports(model, set(samples), adapter):
        raise ValueError("batched_lora needs samples for exactly the A and B weights of plain LoRA linear layers")
    sizes = {t.shape[0] for t in samples.values()}
    if len(sizes) != 1:
        raise ValueError(f"samples have different sample counts {sorted(sizes)}")
    patched = []
    try:
        for layer, a, b in layers.values():
            layer.forward = _forward(layer, adapter, samples[a], samples[b])
            patched.append(layer)
        yield sizes.pop()
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward
