"""``zero_shot``: the base model as it is (LoRA attached with B = 0, so the adapter is the identity)."""

from __future__ import annotations

from varlora.methods.base import Method, register

__all__ = ["ZeroShot"]


@register
class ZeroShot(Method):
    """No training; one deterministic forward of the untrained model. Seed-independent."""

    name = "zero_shot"
    label = "zero-shot"
    color = "C7"
    supports_distributed = True
    seed_independent = True
