"""Optimizers: :class:`IVON` (variational online Newton), its hyper-parameter rules and posterior sampling."""

from varlora.optim.ivon import IVON, IVON_DEFAULTS, OWN_STATE_KEY, ParamPosterior, validate_ivon_hyperparameters
from varlora.optim.sampling import perturbed_named_params, perturbed_params

__all__ = ["IVON", "IVON_DEFAULTS", "OWN_STATE_KEY", "ParamPosterior", "perturbed_named_params",
           "perturbed_params", "validate_ivon_hyperparameters"]
