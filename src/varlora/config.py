"""Argument groups of a varlora run, as validated dataclasses.

A run is fully described by one :class:`RunConfig` (model, LoRA, optimizer, data, training and
evaluation groups). It is saved as ``config.json`` in the run folder, so that ``varlora eval RUN_DIR``
and a resumed ``varlora train`` rebuild exactly the same objects. Every field carries its help text in
``metadata["help"]``; the CLI builds its options from them.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "ModelArgs",
    "LoraArgs",
    "AdamWArgs",
    "IVONArgs",
    "DataArgs",
    "TrainArgs",
    "EvalArgs",
    "RunConfig",
    "CONFIG_GROUPS",
]

OptimizerName = Literal["adamw", "ivon"]
ScoringMode = Literal["letter", "cloze"]
DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _check(condition: bool, name: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"invalid {name}={value!r}: {requirement}")


@dataclass
class ModelArgs:
    """The base causal LM."""

    name: str = _help(
        "Hugging Face id, local folder, or path to a .gguf file "
        "(e.g. ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf)",
        default="../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    dtype: DType = _help("dtype of the frozen base model; LoRA weights are always float32", default="float32")

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", self.name, "must be non-empty")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype,
               "must be float32, bfloat16 or float16")


@dataclass
class LoraArgs:
    """LoRA adapters (peft): rank, scale, dropout, target modules."""

    r: int = _help("LoRA rank", default=8)
    alpha: float = _help("LoRA scaling numerator (scale = alpha / r)", default=16.0)
    dropout: float = _help("dropout on the LoRA input", default=0.1)
    target_modules: list[str] = _help(
        "module names to adapt, or ['all-linear']", default_factory=lambda: ["q_proj", "v_proj"]
    )

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", self.r, "must be >= 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target_modules", self.target_modules, "must be non-empty")


@dataclass
class AdamWArgs:
    """AdamW, the MAP baseline (Loshchilov & Hutter 2019)."""

    lr: float = _help("peak learning rate", default=1e-3)
    weight_decay: float = _help("decoupled weight decay", default=0.0)
    beta1: float = _help("first-moment decay", default=0.9)
    beta2: float = _help("second-moment decay", default=0.999)
    eps: float = _help("denominator epsilon", default=1e-8)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "adamw.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "adamw.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.beta1 < 1, "adamw.beta1", self.beta1, "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "adamw.beta2", self.beta2, "must be in [0, 1)")


@dataclass
class IVONArgs:
    """IVON (Shen et al. 2024): posterior N(m, 1/(ess (h + weight_decay))); see varlora.IVON for the update.

    The defaults are the values tuned for SmolLM2-135M / 100 steps (``varlora experiment tune-cpu``); the
    paper's for Llama-2-7B / 10,000 steps are in the ``paper`` preset.
    """

    lr: float = _help("peak learning rate alpha", default=0.03)
    ess: float = _help("effective sample size lambda (sets the posterior scale)", default=1e5)
    hess_init: float = _help("initial Hessian estimate h0; initial std is 1/sqrt(ess*h0)", default=0.1)
    beta1: float = _help("momentum decay", default=0.9)
    beta2: float = _help("Hessian decay", default=0.99)
    weight_decay: float = _help("prior precision delta", default=0.0)
    clip_radius: float = _help("element-wise clip of the preconditioned update (rho)", default=1e-2)
    mc_samples: int = _help("posterior samples per training step", default=1)
    rescale_lr: bool = _help("multiply lr by (h0 + delta) as the reference does", default=False)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "ivon.lr", self.lr, "must be > 0")
        _check(self.ess > 0, "ivon.ess", self.ess, "must be > 0")
        _check(self.hess_init > 0, "ivon.hess_init", self.hess_init, "must be > 0")
        _check(0 <= self.beta1 < 1, "ivon.beta1", self.beta1, "must be in [0, 1)")
        _check(0 <= self.beta2 <= 1, "ivon.beta2", self.beta2, "must be in [0, 1]")
        _check(self.weight_decay >= 0, "ivon.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.clip_radius > 0, "ivon.clip_radius", self.clip_radius, "must be > 0 (inf disables)")
        _check(self.mc_samples >= 1, "ivon.mc_samples", self.mc_samples, "must be >= 1")


@dataclass
class DataArgs:
    """Task, scoring protocol and data subsets."""

    task: str = _help("task name from `varlora tasks`, or jsonl:TRAIN[,VALIDATION] for your own data",
                      default="arc_easy")
    scoring: ScoringMode = _help("letter: published last-token protocol; cloze: choice log-likelihood",
                                 default="cloze")
    data_dir: str | None = _help("folder with the original data files (default: $VARLORA_DATA_DIR or ../shared/data)",
                                 default=None)
    train_limit: int | None = _help("random subset of the training split (seeded by the run seed)", default=None)
    eval_limit: int | None = _help("first-N-by-seed subset of the validation split (seed 0, same for all runs)",
                                   default=None)
    holdout: int | None = _help(
        "tuning mode: evaluate on N examples held out of the training split (seed 0) instead of the "
        "validation split, and train on the rest", default=None)
    max_length: int = _help("maximum tokens per sequence (long passages are truncated, never the answer cue)",
                            default=512)
    length_normalize: bool = _help("cloze: mean per-token log-likelihood instead of the sum", default=True)

    def __post_init__(self) -> None:
        _check(self.scoring in ("letter", "cloze"), "data.scoring", self.scoring, "must be letter or cloze")
        for name in ("train_limit", "eval_limit", "holdout"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"data.{name}", value, "must be >= 1 or unset")
        _check(self.max_length >= 16, "data.max_length", self.max_length, "must be >= 16")


@dataclass
class TrainArgs:
    """The training loop: optimizer, steps, batches, schedule, checkpoints, seed."""

    optimizer: OptimizerName = _help("adamw (MAP baseline) or ivon (variational)", default="ivon")
    steps: int = _help("optimizer steps (0: evaluate the untrained model, reported as zero-shot)", default=200)
    batch_size: int = _help("examples per optimizer step", default=4)
    grad_accum: int = _help("micro-batches per step (batch_size must be divisible by it)", default=1)
    max_grad_norm: float | None = _help("clip the gradient norm of each sample (None: off)", default=None)
    warmup_steps: int = _help("linear warm-up steps before the linear decay", default=0)
    eval_every: int = _help("evaluate at the mean every N steps (0: only at the end)", default=0)
    save_every: int = _help("write a resumable checkpoint every N steps", default=50)
    seed: int = _help("seed of LoRA init, data order, dropout and IVON noise", default=21)

    def __post_init__(self) -> None:
        _check(self.optimizer in ("adamw", "ivon"), "train.optimizer", self.optimizer, "must be adamw or ivon")
        _check(self.steps >= 0, "train.steps", self.steps, "must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _check(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0, "train.grad_accum",
               self.grad_accum, f"must be >= 1 and divide batch_size={self.batch_size}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", self.max_grad_norm,
               "must be > 0 or unset")
        _check(self.warmup_steps == 0 or self.warmup_steps < self.steps, "train.warmup_steps", self.warmup_steps,
               f"must be 0 or in [0, steps={self.steps})")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0")
        _check(self.save_every >= 1, "train.save_every", self.save_every, "must be >= 1")


@dataclass
class EvalArgs:
    """Evaluation: posterior samples, variance scales tau, ECE bins, out-of-distribution tasks."""

    n_samples: int = _help("posterior samples whose probabilities are averaged (IVON)", default=10)
    taus: list[float] = _help("posterior variance scales tau in [0, 1] to evaluate (0 = IVON@mean)",
                              default_factory=lambda: [0.0, 1.0])
    n_bins: int = _help("equal-width bins of the expected calibration error", default=10)
    batch_size: int = _help("examples per evaluation forward", default=8)
    seed: int = _help("seed of the evaluation noise (fixed: a re-evaluation reproduces the metrics)", default=0)
    ood_tasks: list[str] = _help("other tasks to evaluate the final posterior on (out of distribution)",
                                 default_factory=list)

    def __post_init__(self) -> None:
        _check(self.n_samples >= 1, "eval.n_samples", self.n_samples, "must be >= 1")
        _check(len(self.taus) > 0 and all(0.0 <= t <= 1.0 and math.isfinite(t) for t in self.taus), "eval.taus",
               self.taus, "must be a non-empty list of values in [0, 1]")
        _check(self.n_bins >= 1, "eval.n_bins", self.n_bins, "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


CONFIG_GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "lora": LoraArgs,
    "adamw": AdamWArgs,
    "ivon": IVONArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "eval": EvalArgs,
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; numbers written as strings (YAML 1.1 reads ``1e7`` as a
    string) become numbers. Raises ConfigError naming the field and value otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}={value!r}: must be one of {list(typing.get_args(annotation))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}={value!r}: must be a list")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, where) for v in value]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: must be true or false")
        return value
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: must be a number")
        try:
            number = float(value) if annotation is float else int(value)
        except (TypeError, ValueError):
            kind = "a number" if annotation is float else "an integer"
            raise ConfigError(f"{where}={value!r}: must be {kind}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{where}={value!r}: must be an integer")
        return number
    if annotation is str and not isinstance(value, str):
        raise ConfigError(f"{where}={value!r}: must be a string")
    return value


@dataclass
class RunConfig:
    """Everything that defines a run; ``to_dict``/``from_dict`` round-trip through ``config.json``."""

    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    adamw: AdamWArgs = field(default_factory=AdamWArgs)
    ivon: IVONArgs = field(default_factory=IVONArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        unknown = set(data) - set(CONFIG_GROUPS)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(CONFIG_GROUPS)}")
        groups = {}
        for name, group_cls in CONFIG_GROUPS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping, got {values!r}")
            known = {f.name for f in fields(group_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"{source}: unknown field(s) {sorted(bad)} in section {name!r}")
            hints = typing.get_type_hints(group_cls)
            coerced = {k: _coerce(v, hints[k], f"{source}: {name}.{k}") for k, v in values.items()}
            groups[name] = group_cls(**coerced)
        return cls(**groups)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
        return cls.from_dict(data, source=str(path))

    @property
    def optimizer_args(self) -> AdamWArgs | IVONArgs:
        return self.ivon if self.train.optimizer == "ivon" else self.adamw
