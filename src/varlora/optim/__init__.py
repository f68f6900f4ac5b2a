"""Optimizers: :class:`IVON` (variational online Newton) and its posterior accessors."""

from varlora.optim.ivon import IVON, ParamPosterior

__all__ = ["IVON", "ParamPosterior"]
