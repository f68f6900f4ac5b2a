"""Uncertainty methods behind one interface (:class:`~varlora.methods.base.Method`), registered by name.

====================  ===========================================================================
``zero_shot``          the base model, no training
``adamw``              MAP LoRA with AdamW (the deterministic baseline)
``ivon``               variational LoRA with IVON: IVON@mean and posterior samples for each τ
``mc_dropout``         the MAP adapter with LoRA dropout on at test time (post-hoc)
``ensemble``           M MAP adapters, probabilities averaged
``temperature``        the MAP adapter's logits scaled by a temperature fitted on held-out training data
``laplace``            Laplace-LoRA: post-hoc K-FAC Laplace on the MAP adapter, linearised predictive
====================  ===========================================================================
"""

from varlora.methods import adamw, ensemble, ivon, laplace, mc_dropout, temperature, zero_shot  # noqa: F401
from varlora.methods.base import METHODS, Method, Prediction, StepResult, get_method, list_methods, register

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "Prediction", "StepResult", "get_method", "list_methods", "register",
           "build_method"]

DEFAULT_METHOD = "ivon"


def build_method(session) -> Method:
    """The method named by ``session.config.method.name``, bound to ``session``."""
    return get_method(session.config.method.name)(session)
