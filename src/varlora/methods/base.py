"""The interface every uncertainty method implements, and the registry that names them.

A method is one way of turning a LoRA model into predictive probabilities: a training procedure (or none),
an optional post-hoc fit, and a predictive. The generic recipe in :mod:`varlora.train` drives it:

1. ``method = build_method(session)``: the :class:`Method` registered under ``config.method.name``.
2. ``method.setup()``: trainable state on the LoRA model (optimizers, schedulers, extra parameters).
3. ``method.train_step(step)`` for ``step < method.total_steps``; the loop logs, checkpoints
   (``state_dict`` / ``load_state_dict``) and resumes bit for bit.
4. ``method.fit_posthoc(log)``: temperature, Laplace and TFB fit here, after training; others do nothing.
5. ``method.save(folder)`` writes into ``final/`` everything its predictions need; ``method.load(folder)``
   restores it (``varlora eval`` and :func:`varlora.load` call only ``load`` and ``predict``).
6. ``method.predict(examples, scorer)``: one :class:`Prediction` per table row (IVON: τ = 0 and τ = 1; BLoB:
   N = 10 and N = 0), each with per-sample probabilities (S, N, K) when it samples.

Modules outside :mod:`varlora.methods` never branch on a method's name: labels, colours, τ, sample counts
and costs travel in the class attributes and in the fields of each :class:`Prediction`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from varlora.prediction import Prediction

if TYPE_CHECKING:
    from torch import Tensor

    from varlora.session import Session
    from varlora.tasks import Example

__all__ = ["Method", "Prediction", "StepResult", "register", "get_method", "list_methods", "METHODS"]

Log = Callable[[str], None]


@dataclass
class StepResult:
    """What a training step reports: the mean loss and optional per-step statistics (logged to metrics.jsonl)."""

    loss: float
    stats: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class: a deterministic predictive at the LoRA model's current weights, no training.

    Subclasses set the class attributes and override what they need:

    - ``name``: registry key and config value (``--method.name``); ``label`` the default row label;
      ``color`` a matplotlib colour used by every figure.
    - ``args_class``: the dataclass of the method's own hyper-parameters, a config section named ``name``
      (None if it has none). ``sections``: the other method sections it reads (e.g. ``("adamw",)`` for a
      method that trains a MAP adapter first). Only these sections count when a run folder compares configs.
    - ``trains``: whether it runs training steps. ``posthoc_of``: the method whose trained adapter a post-hoc
      method starts from; an experiment may reuse that method's finished run instead of training again.
    - ``supports_distributed``: whether it runs under torchrun with several processes, data parallel or with the
      model sharded by FSDP2 (``model.sharding=fsdp``: its training, saving and predictions then see DTensor
      parameters, :mod:`varlora.sharding`).
    - ``checkpointing_conflict``: why its training cannot run with ``model.gradient_checkpointing`` ("" where it
      can; the recipe refuses such a run with this reason).
    - ``role``: ``"map"`` for the deterministic baseline drawn as the reference point in figures, else "".
    - ``seed_independent``: its predictions do not depend on the seed (zero-shot): experiments run it once.
    - ``uses_tau``: it reads ``eval.taus`` (posterior variance scales); for the others that field is not part of
      the run's identity, so a preset may add τ values for one task without orphaning its other runs.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    color: ClassVar[str] = "C7"
    args_class: ClassVar[type | None] = None
    sections: ClassVar[tuple[str, ...]] = ()
    trains: ClassVar[bool] = False
    posthoc_of: ClassVar[str | None] = None
    supports_distributed: ClassVar[bool] = False
    checkpointing_conflict: ClassVar[str] = ""
    role: ClassVar[str] = ""
    seed_independent: ClassVar[bool] = False
    uses_tau: ClassVar[bool] = False

    def __init__(self, session: Session) -> None:
        self.session = session
        self.config = session.config

    @property
    def args(self) -> Any:
        """This method's own config section (an instance of ``args_class``)."""
        return self.config.method_args(self.name)

    # ---- training -------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """Training steps the generic loop runs (0 for a method that does not train)."""
        return self.config.train.steps if self.trains else 0

    def setup(self) -> None:
        """Build the trainable state (optimizers, schedulers, extra parameters) before training or loading."""

    def train_step(self, step: int) -> StepResult:
        """Run training step ``step`` (0-based) and return its loss."""
        raise NotImplementedError(f"method {self.name!r} does not train")

    def state_dict(self) -> dict[str, Any]:
        """Everything the next training step depends on (weights, optimizer and scheduler states)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the generic loop restores RNG states itself)."""

    def rank_state(self) -> dict[str, Any] | None:
        """State that differs between torchrun ranks (e.g. IVON's noise generator), or None."""
        return None

    def load_rank_state(self, state: dict[str, Any] | None) -> None:
        """Restore this rank's :meth:`rank_state`."""

    # ---- after training -------------------------------------------------------------------------------
    def fit_posthoc(self, log: Log) -> dict[str, Any]:
        """Fit what comes after training (a temperature, a Laplace posterior, a TFB variance); return what the
        summary should record about it (e.g. ``{"temperature": 1.3}``). Default: nothing."""
        return {}

    # ---- saving ---------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write the adapter (peft format) and whatever the predictive needs into ``folder`` (``final/``)."""
        from varlora.models import save_adapter

        save_adapter(self.session.model, folder)

    def load(self, folder: Path) -> None:
        """Restore what :meth:`save` wrote, onto a freshly built session."""
        from varlora.session import load_adapter_weights

        load_adapter_weights(self.session.model, folder)

    @classmethod
    def saved_std(cls, final: Path) -> dict[str, Tensor] | None:
        """The standard deviations of the mean-field Gaussian posterior that a finished run saved in ``final``,
        by the adapter's weight names (``...q_proj.lora_A.weight``, peft's adapter segment allowed); None for a
        method without one, or where ``final`` holds none. Read by the reports' σ / |m| (no model is built)."""
        return None

    # ---- prediction -----------------------------------------------------------------------------------
    def predict(self, examples: Sequence[Example], scorer: Any) -> list[Prediction]:
        """Every table row of this method on ``examples`` (default: one deterministic forward)."""
        return [self.predict_at_mean(examples, scorer)]

    def predict_at_mean(self, examples: Sequence[Example], scorer: Any) -> Prediction:
        """The cheapest point prediction, used for learning curves during training: one eval-mode forward at
        the current weights (a posterior's mean)."""
        from varlora.evaluate import deterministic_prediction

        return deterministic_prediction(self, self.label, examples, scorer)

    # ---- cost -----------------------------------------------------------------------------------------
    def extra_bytes(self) -> dict[str, int]:
        """Memory the method adds beyond one LoRA adapter: ``extra_param_bytes`` (additional weights or
        posterior tensors kept for prediction) and ``optimizer_state_bytes`` (held during training)."""
        return {"extra_param_bytes": 0, "optimizer_state_bytes": 0}


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method.name cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def list_methods() -> list[str]:
    return list(METHODS)
