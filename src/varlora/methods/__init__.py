"""Uncertainty methods behind one interface (:class:`~varlora.methods.base.Method`), registered by name.

====================  ===========================================================================
``zero_shot``          the base model, no training
``adamw``              MAP LoRA with AdamW (the deterministic baseline)
``ivon``               variational LoRA with IVON: IVON@mean and posterior samples for each τ
``mc_dropout``         the MAP adapter with LoRA dropout on at test time (post-hoc)
``ensemble``           M MAP adapters, probabilities averaged
``temperature``        the MAP adapter's logits scaled by a temperature fitted on held-out training data
``laplace``            Laplace-LoRA: post-hoc K-FAC Laplace on the MAP adapter, linearised predictive
``blob``               BLoB: Gaussian LoRA A trained by backprop with a KL term; N samples and N = 0 rows
``tfb``                TFB: the MAP adapter with the largest isotropic variance that keeps its anchor set
====================  ===========================================================================
"""

from varlora.methods import (  # noqa: F401
    adamw,
    blob,
    ensemble,
    ivon,
    laplace,
    mc_dropout,
    temperature,
    tfb,
    zero_shot,
)
from varlora.methods.base import METHODS, Method, Prediction, StepResult, get_method, list_methods, register

__all__ = [
    "DEFAULT_METHOD",
    "legacy_method_name",
    "METHODS",
    "Method",
    "Prediction",
    "StepResult",
    "get_method",
    "list_methods",
    "register",
    "build_method",
]

DEFAULT_METHOD = "ivon"


def build_method(session) -> Method:
    """The method named by ``session.config.method.name``, bound to ``session``."""
    return get_method(session.config.method.name)(session)


def legacy_method_name(optimizer: str, steps: int | None) -> str:
    """The method of a config written before methods existed (``train.optimizer``): the optimizer's method, or
    ``zero_shot`` for ``train.steps: 0`` (that was how the untrained model was spelled)."""
    return "zero_shot" if steps == 0 else optimizer
