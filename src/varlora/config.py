"""Argument groups of a varlora run, as validated dataclasses.

A run is fully described by one :class:`RunConfig` (model, LoRA, method, data, training and evaluation
groups, plus one hyper-parameter section per registered method, defined in that method's module). It is
saved as ``config.json`` in the run folder, so that ``varlora eval RUN_DIR``
and a resumed ``varlora train`` rebuild exactly the same objects. Every field carries its help text in
``metadata["help"]``; the CLI builds its options from them.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "DEFAULT_MODEL",
    "MODEL_ENV",
    "ModelArgs",
    "auto_dtype",
    "auto_sharding",
    "LoraArgs",
    "MethodArgs",
    "DataArgs",
    "TrainArgs",
    "EvalArgs",
    "RunConfig",
    "CONFIG_GROUPS",
    "all_groups",
    "check",
    "method_sections",
    "option",
]

ScoringMode = Literal["letter", "cloze"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "4bit", "8bit"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]
DeviceMap = Literal["local", "auto"]
Sharding = Literal["auto", "none", "fsdp"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def option(text: str, **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``varlora train --help``)."""
    return field(metadata={"help": text}, **kwargs)


def check(condition: bool, name: str, value: Any, requirement: str) -> None:
    """Raise :class:`ConfigError` naming ``name`` and ``value`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"invalid {name}={value!r}: {requirement}")


#: The environment variable naming the default base model (a hub id, a folder or a .gguf file).
MODEL_ENV = "VARLORA_MODEL"
#: The base model when neither ``model.name`` nor ``$VARLORA_MODEL`` names one.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def auto_dtype() -> str:
    """What ``model.dtype=auto`` means on this process's device: ``bfloat16`` on a CUDA GPU that computes in it
    natively (compute capability >= 8), else ``float32`` (the CPU, older GPUs: their bf16 matmuls are emulated or
    slow, and float16 can overflow in a base that was trained in bf16)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return "float32"


def auto_sharding() -> str:
    """What ``model.sharding=auto`` means in this process: ``fsdp`` under ``accelerate launch --use_fsdp
    --fsdp_version 2`` (its FSDP plugin sets ``ACCELERATE_USE_FSDP`` and ``FSDP_VERSION``), else ``none``.
    Raises :class:`ConfigError` for the plugin's FSDP version 1, which varlora does not implement."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return "none"
    version = os.environ.get("FSDP_VERSION", "1")
    check(version == "2", "model.sharding", "auto", f"accelerate launch asks for FSDP version {version}; varlora "
          "shards with FSDP2 only (launch with --fsdp_version 2)")
    return "fsdp"


@dataclass
class ModelArgs:
    """The base causal LM: where it comes from, its precision and quantisation, and the memory levers.

    ``dtype="auto"`` is resolved when the config is made (:func:`auto_dtype`), so ``config.json`` records the dtype
    a run used, and a run saved with ``"float32"`` resumes unchanged on a CPU, where ``auto`` means float32.
    """

    name: str = option(
        f"Hugging Face id, local folder, or path to a .gguf file (default: ${MODEL_ENV}, else {DEFAULT_MODEL})",
        default_factory=lambda: os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
    )
    dtype: DType = option(
        "dtype of the frozen base model (and the compute dtype of a quantised one); auto: bfloat16 on a CUDA GPU "
        "that supports it, float32 otherwise (config.json records the resolved dtype). LoRA weights are always "
        "float32", default="auto")
    quantization: Quantization = option(
        "load the base quantised by bitsandbytes (QLoRA; pip install 'varlora[qlora]'): 4bit (NF4, double "
        "quantisation) or 8bit (LLM.int8); LoRA stays float32, and the base's other weights are upcast to float32 "
        "as peft's prepare_model_for_kbit_training does. Not for a .gguf file", default="none")
    gradient_checkpointing: bool = option(
        "recompute each decoder layer's activations in the backward pass (non-reentrant) instead of storing them: "
        "less memory, about one more forward per step", default=False)
    attn_implementation: AttnImplementation = option("attention kernel of transformers", default="sdpa")
    device_map: DeviceMap = option(
        "local: load the base straight onto this process's device (its GPU, else the CPU), never whole on the host "
        "first; auto: spread its layers over every visible GPU (then the CPU) with accelerate, one process only",
        default="local")
    sharding: Sharding = option(
        "fsdp: shard the base and the LoRA weights over the ranks of torchrun or accelerate launch with FSDP2 "
        "(fully_shard per decoder layer), for a base that does not fit one device; none: every rank holds the "
        "whole model (data parallel); auto: fsdp under accelerate launch's FSDP plugin (--use_fsdp --fsdp_version "
        "2), else none (config.json records the resolved value). One process never shards", default="auto")
    tf32: bool = option("on CUDA, run float32 matmuls (LoRA, upcast layers) on TF32 tensor cores; no effect on CPU",
                        default=True)

    def __post_init__(self) -> None:
        check(bool(self.name), "model.name", self.name, "must be non-empty")
        check(self.dtype in typing.get_args(DType), "model.dtype", self.dtype,
              "must be auto, float32, bfloat16 or float16")
        if self.dtype == "auto":
            self.dtype = auto_dtype()
        check(self.quantization in typing.get_args(Quantization), "model.quantization", self.quantization,
              "must be none, 4bit or 8bit")
        check(self.quantization == "none" or not self.name.endswith(".gguf"), "model.quantization",
              self.quantization, f"cannot apply to the GGUF file {self.name} (transformers loads it de-quantised and "
              "does not quantise it again); give a hub id or a folder of safetensors weights")
        check(self.attn_implementation in typing.get_args(AttnImplementation), "model.attn_implementation",
              self.attn_implementation, f"must be one of {list(typing.get_args(AttnImplementation))}")
        check(self.device_map in typing.get_args(DeviceMap), "model.device_map", self.device_map,
              "must be local or auto")
        check(self.sharding in typing.get_args(Sharding), "model.sharding", self.sharding,
              "must be auto, none or fsdp")
        if self.sharding == "auto":
            self.sharding = auto_sharding()
        check(self.sharding == "none" or self.quantization == "none", "model.sharding", self.sharding,
              f"cannot shard a base quantised by bitsandbytes (model.quantization={self.quantization!r}): its packed "
              "weights are not DTensors; quantise on one GPU, or shard a bf16 base")
        check(self.sharding == "none" or self.device_map == "local", "model.sharding", self.sharding,
              "needs model.device_map=local (FSDP places every shard on its rank's device)")


@dataclass
class LoraArgs:
    """LoRA adapters (peft): rank, scale, dropout, target modules."""

    r: int = option("LoRA rank", default=8)
    alpha: float = option("LoRA scaling numerator (scale = alpha / r)", default=16.0)
    dropout: float = option("dropout on the LoRA input", default=0.1)
    target_modules: list[str] = option(
        "module names to adapt, or ['all-linear']", default_factory=lambda: ["q_proj", "v_proj"]
    )

    def __post_init__(self) -> None:
        check(self.r >= 1, "lora.r", self.r, "must be >= 1")
        check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        check(len(self.target_modules) > 0, "lora.target_modules", self.target_modules, "must be non-empty")


@dataclass
class MethodArgs:
    """The uncertainty method (``varlora methods`` lists them); its hyper-parameters are the section named after it."""

    name: str = option("the method (`varlora methods` lists them)", default_factory=lambda: _default_method())

    def __post_init__(self) -> None:
        from varlora.methods import list_methods

        check(self.name in list_methods(), "method.name", self.name, f"must be one of {list_methods()}")


@dataclass
class DataArgs:
    """Task, scoring protocol and data subsets."""

    task: str = option("task name from `varlora tasks`, or jsonl:TRAIN[,VALIDATION] for your own data",
                      default="arc_easy")
    scoring: ScoringMode = option("letter: published last-token protocol; cloze: choice log-likelihood",
                                 default="cloze")
    data_dir: str | None = option("folder with the original data files (default: $VARLORA_DATA_DIR, else the hub)",
                                 default=None)
    train_limit: int | None = option("random subset of the training split (seeded by the run seed)", default=None)
    eval_limit: int | None = option("first-N-by-seed subset of the validation split (seed 0, same for all runs)",
                                   default=None)
    holdout: int | None = option(
        "tuning mode: evaluate on N examples held out of the training split (seed 0) instead of the "
        "validation split, and train on the rest", default=None)
    calibration: int | None = option(
        "K of the training questions (data.train_limit of them, chosen with the run seed) kept out of training "
        "for what is fitted after it: every post-hoc fit (temperature, TFB's anchors, IVON's tau) and the "
        "calibration layer that temperature-scales each prediction row; so every method sees the same labelled "
        "questions", default=None)
    max_length: int = option("maximum tokens per sequence (long passages are truncated, never the answer cue)",
                            default=512)
    length_normalize: bool = option("cloze: mean per-token log-likelihood instead of the sum", default=True)

    def __post_init__(self) -> None:
        check(self.scoring in ("letter", "cloze"), "data.scoring", self.scoring, "must be letter or cloze")
        for name in ("train_limit", "eval_limit", "holdout", "calibration"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"data.{name}", value, "must be >= 1 or unset")
        check(self.max_length >= 16, "data.max_length", self.max_length, "must be >= 16")


@dataclass
class TrainArgs:
    """The training loop: steps, batches, schedule, checkpoints, seed (the optimizer belongs to the method)."""

    steps: int = option("optimizer steps", default=200)
    batch_size: int = option("examples per optimizer step", default=4)
    grad_accum: int = option("micro-batches per step (batch_size must be divisible by it)", default=1)
    max_grad_norm: float | None = option("clip the gradient norm of each sample (None: off)", default=None)
    warmup_steps: int = option("linear warm-up steps before the linear decay", default=0)
    eval_every: int = option("evaluate at the mean every N steps (0: only at the end)", default=0)
    save_every: int = option("write a resumable checkpoint every N steps", default=50)
    seed: int = option("seed of LoRA init, data order, dropout and IVON noise", default=21)

    def __post_init__(self) -> None:
        check(self.steps >= 0, "train.steps", self.steps, "must be >= 0")
        check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        check(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0, "train.grad_accum",
               self.grad_accum, f"must be >= 1 and divide batch_size={self.batch_size}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", self.max_grad_norm,
               "must be > 0 or unset")
        check(self.warmup_steps == 0 or self.warmup_steps < self.steps, "train.warmup_steps", self.warmup_steps,
               f"must be 0 or in [0, steps={self.steps})")
        check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0")
        check(self.save_every >= 1, "train.save_every", self.save_every, "must be >= 1")


@dataclass
class EvalArgs:
    """Evaluation: posterior samples, variance scales tau, ECE bins, out-of-distribution tasks."""

    n_samples: int = option("samples whose probabilities a sampled method averages (IVON, MC dropout, BLoB, "
                            "Laplace, TFB)", default=10)
    taus: list[float] = option("IVON: posterior variance scales tau in [0, 1] to evaluate (0 = IVON@mean)",
                              default_factory=lambda: [0.0, 1.0])
    n_bins: int = option("equal-width bins of the expected calibration error", default=10)
    batch_size: int = option("examples per evaluation forward", default=8)
    seed: int = option("seed of the evaluation noise (fixed: a re-evaluation reproduces the metrics)", default=0)
    batched_samples: bool = option(
        "IVON: run the n_samples posterior samples in one forward (batch folded n_samples times, per-sample LoRA "
        "weights by batched matmul) instead of one forward each; the same noise, equal up to float rounding (off: not "
        "faster on CPU in benchmarks/sampled_eval.py)",
        default=False)
    samples_per_forward: int = option(
        "IVON with batched_samples: posterior samples folded into one forward, the memory cap of the batched path "
        "(a forward holds samples_per_forward x batch_size rows; the predictions do not depend on it beyond float "
        "rounding); 0 = all n_samples", default=0)
    ood_tasks: list[str] = option("other tasks to evaluate the final posterior on (out of distribution)",
                                 default_factory=list)

    def __post_init__(self) -> None:
        check(self.n_samples >= 1, "eval.n_samples", self.n_samples, "must be >= 1")
        check(len(self.taus) > 0 and all(0.0 <= t <= 1.0 and math.isfinite(t) for t in self.taus), "eval.taus",
               self.taus, "must be a non-empty list of values in [0, 1]")
        check(self.n_bins >= 1, "eval.n_bins", self.n_bins, "must be >= 1")
        check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        check(self.samples_per_forward >= 0, "eval.samples_per_forward", self.samples_per_forward,
              "must be >= 0 (0 = all n_samples)")


CONFIG_GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "lora": LoraArgs,
    "method": MethodArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "eval": EvalArgs,
}


def _default_method() -> str:
    from varlora.methods import DEFAULT_METHOD

    return DEFAULT_METHOD


def method_sections() -> dict[str, type]:
    """The hyper-parameter section of every registered method that has one, by method name."""
    from varlora.methods import METHODS

    return {name: cls.args_class for name, cls in METHODS.items() if cls.args_class is not None}


def all_groups() -> dict[str, type]:
    """Every config section: the run's groups, then one per method (the CLI builds its options from them)."""
    return {**CONFIG_GROUPS, **method_sections()}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; numbers written as strings (YAML 1.1 reads ``1e7`` as a
    string) become numbers. Raises ConfigError naming the field and value otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        words = [w for a in options if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
        if value in words:  # e.g. "auto" of a `float | Literal["auto"]` field
            return value
        annotation = next((a for a in options if typing.get_origin(a) is not typing.Literal), options[0])
        if words and (isinstance(value, bool) or not isinstance(value, int | float | str)):
            raise ConfigError(f"{where}={value!r}: must be a number or one of {words}")
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


def _upgrade_legacy(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Read a config written before methods existed: ``train.optimizer: adamw|ivon`` becomes ``method.name``
    (``train.steps: 0`` meant the untrained model, now the ``zero_shot`` method)."""
    train = data.get("train")
    if not isinstance(train, dict) or "optimizer" not in train:
        return data
    if "method" in data:
        raise ConfigError(f"{source}: train.optimizer is replaced by method.name; give only method.name")
    from varlora.methods import legacy_method_name

    train = dict(train)
    name = legacy_method_name(train.pop("optimizer"), train.get("steps"))
    return {**data, "train": train, "method": {"name": name}}


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: saved {a!r}, given {b!r}"
    return ""


@dataclass
class RunConfig:
    """Everything that defines a run; ``to_dict``/``from_dict`` round-trip through ``config.json``.

    ``sections`` holds one hyper-parameter dataclass per registered method (``config.ivon``, ``config.adamw``
    ... read them); :meth:`effective` is the part that can affect the run of ``method.name``.
    """

    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    method: MethodArgs = field(default_factory=MethodArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    sections: dict[str, Any] = field(default_factory=lambda: {n: c() for n, c in method_sections().items()})

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no field or method section {name!r}")

    def method_args(self, name: str) -> Any:
        """The hyper-parameter section of method ``name``."""
        if name not in self.sections:
            raise ConfigError(f"method {name!r} has no config section; sections: {sorted(self.sections)}")
        return self.sections[name]

    def to_dict(self) -> dict[str, Any]:
        data = {name: asdict(getattr(self, name)) for name in CONFIG_GROUPS}
        return data | {name: asdict(args) for name, args in self.sections.items()}

    def effective(self) -> dict[str, Any]:
        """The config without what the chosen method does not read (it cannot affect the run): the other
        methods' sections, and ``eval.taus`` unless the method ``uses_tau``."""
        from varlora.methods import get_method

        cls = get_method(self.method.name)
        used = {cls.name, *cls.sections}
        out = {k: v for k, v in self.to_dict().items() if k in CONFIG_GROUPS or k in used}
        if not cls.uses_tau:
            out["eval"] = {k: v for k, v in out["eval"].items() if k != "taus"}
        return out

    def difference(self, given: RunConfig) -> str:
        """The first field (in sorted order) whose :meth:`effective` value differs between this (saved) config
        and ``given``, as ``"section.field: saved X, given Y"``; ``""`` where the two runs would be the same."""
        return _first_difference(self.effective(), given.effective())

    def starts_from(self, map_config: RunConfig) -> bool:
        """Whether ``map_config`` trains exactly the adapter this run's post-hoc method starts from: this config
        with the method replaced by its ``posthoc_of`` (False for a method that is not post-hoc)."""
        from varlora.methods import get_method

        base = get_method(self.method.name).posthoc_of
        if base is None:
            return False
        return RunConfig.from_dict({**self.to_dict(), "method": {"name": base}}).effective() == map_config.effective()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        data = _upgrade_legacy(data, source)
        groups_cls = all_groups()
        unknown = set(data) - set(groups_cls)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(groups_cls)}")
        groups = {}
        for name, group_cls in groups_cls.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping, got {values!r}")
            known = {f.name for f in fields(group_cls)}
            bad = set(values) - known
            if bad:
                hint = " (the optimizer is now method.name)" if name == "train" and "optimizer" in bad else ""
                raise ConfigError(f"{source}: unknown field(s) {sorted(bad)} in section {name!r}{hint}")
            hints = typing.get_type_hints(group_cls)
            coerced = {k: _coerce(v, hints[k], f"{source}: {name}.{k}") for k, v in values.items()}
            groups[name] = group_cls(**coerced)
        return cls(**{n: groups[n] for n in CONFIG_GROUPS},
                   sections={n: groups[n] for n in groups_cls if n not in CONFIG_GROUPS})

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
        return cls.from_dict(data, source=str(path))
