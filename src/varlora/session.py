"""What a run holds in memory: the LoRA model, its trainable parameters, the task's scorer and data.

:func:`setup` builds a :class:`Session` from a :class:`~varlora.config.RunConfig`; every method
(:mod:`varlora.methods`) trains and predicts through it. The data of a run:

- ``train_examples``: ``data.train_limit`` random examples of the train split (seeded by the run seed);
- ``val_examples``: ``data.eval_limit`` examples of the validation split chosen with seed 0 (the same for
  every run and seed), or, in tuning mode (``data.holdout = N``), N training examples chosen with seed 0;
- ``calibration_examples``: with ``data.calibration = K``, K of the ``data.train_limit`` questions (chosen with
  the run seed) that training leaves out, for every post-hoc fit and the calibration layer
  (:mod:`varlora.calibration`): every method of a task and seed then uses the same N labelled questions;
- :meth:`Session.heldout_train_examples`: what a post-hoc method fits on (a temperature, TFB's anchor set): the
  calibration examples where there are, else training-split examples that are neither trained on nor evaluated.
  Evaluation data is never among them.

All three are tokenised and checked by the scorer when the session is set up, before any training step
(:meth:`varlora.scoring.Scorer.prepare`): a row that cannot be scored stops the run there, named by file and
line, and ``Session.truncation`` says how many examples of each were cut to ``data.max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from varlora import _io, distributed, sharding
from varlora.config import ConfigError, RunConfig
from varlora.models import attach_lora, load_base_model, load_tokenizer, lora_parameters, prepare_base_model, set_tf32
from varlora.run_paths import RunPaths
from varlora.schedule import batch_indices
from varlora.scoring import Scorer, TruncationReport, make_scorer
from varlora.tasks import Example, Task, get_task, subsample

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["Session", "setup", "load_splits", "scorer_for", "load_adapter_weights", "ADAPTER_FILE"]

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class Session:
    """The model with LoRA, its named trainable parameters (sorted), tokenizer, the task's scorer and data."""

    config: RunConfig
    paths: RunPaths
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    tokenizer: Any
    scorer: Any
    train_examples: list[Example]
    val_examples: list[Example]
    unused_train_examples: list[Example] = field(default_factory=list)
    calibration_examples: list[Example] = field(default_factory=list)
    truncation: dict[str, TruncationReport] = field(default_factory=dict)  # "train", "validation", ... -> report
    _eval_splits: dict[str, tuple[list[Example], Scorer]] = field(default_factory=dict, repr=False)

    def eval_split(self, task_name: str) -> tuple[list[Example], Scorer]:
        """The evaluation examples of ``task_name`` and its scorer: ``val_examples`` for the run's task; for
        another task (out of distribution) its validation split (``data.eval_limit`` examples, seed 0), tokenised
        and checked once, on first use, its truncation added to ``truncation`` as ``"<task> validation"``."""
        if task_name == self.config.data.task:
            return self.val_examples, self.scorer
        if task_name not in self._eval_splits:
            d, task = self.config.data, get_task(task_name)
            examples = task.load("validation", data_dir=d.data_dir, limit=d.eval_limit, seed=0)
            scorer = scorer_for(self.config, self.tokenizer, task)
            self.truncation[f"{task_name} validation"] = scorer.prepare(examples, f"{task_name} validation")
            self._eval_splits[task_name] = examples, scorer
        return self._eval_splits[task_name]

    def batch(self, step: int, seed_offset: int = 0) -> list[Example]:
        """The training examples of ``step``: a seeded permutation per epoch (``train.seed + seed_offset``)."""
        cfg = self.config.train
        if not self.train_examples:
            raise ConfigError(f"task {self.config.data.task!r} has no training examples")
        indices = batch_indices(step, cfg.batch_size, len(self.train_examples), cfg.seed + seed_offset)
        return [self.train_examples[i] for i in indices]

    def heldout_train_examples(self, n: int, field_name: str = "held-out examples") -> list[Example]:
        """The examples a post-hoc fit uses: all the calibration examples where ``data.calibration`` is set (one
        labelled-data budget for every method: ``n`` is then not used), else ``n`` training-split examples never
        trained on nor evaluated, chosen with the run seed.

        Raises ConfigError naming ``field_name`` when the train split has fewer unused examples.
        """
        if self.config.data.calibration:
            return self.calibration_examples
        pool = self.unused_train_examples
        if n > len(pool):
            raise ConfigError(f"invalid {field_name}={n}: only {len(pool)} examples of the train split of "
                              f"{self.config.data.task!r} are unused by training (lower it or data.train_limit)")
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.config.train.seed))
        return [pool[i] for i in sorted(pick[:n].tolist())]


def setup(config: RunConfig, run_dir: str | Path, *, need_train: bool = True, need_data: bool = True,
          base_model: PreTrainedModel | None = None, tokenizer: Any = None) -> Session:
    """Load the model and data of ``config``; LoRA is initialised from the run seed.

    ``need_train=False``: only the evaluation examples are loaded. ``need_data=False``: no task data at all
    (the task is not even looked up; ``scorer`` is None and the example lists are empty), for prediction on
    examples given by the caller (:func:`varlora.load`). ``base_model`` and ``tokenizer`` (both or neither): a
    causal LM already in memory and its tokenizer, used instead of loading ``config.model.name`` (e.g. a randomly
    initialised model of a real size, for a benchmark); the model is frozen in place (prepared for
    ``config.model``'s gradient checkpointing, for k-bit training if bitsandbytes quantised it), gets LoRA and is
    moved to this process's device. A base loaded here is loaded onto its device directly (``model.device_map``).
    Under ``model.sharding=fsdp`` with several ranks the model, LoRA included, is sharded over the ranks
    (:func:`varlora.sharding.shard_model`), each shard on its rank's device; a base loaded here is read by rank 0
    only, onto the host, and each rank receives its shards from it (:func:`varlora.sharding.load_sharded_model`).
    """
    if (base_model is None) != (tokenizer is None):
        raise ValueError("setup: pass base_model and tokenizer together, or neither")
    paths = RunPaths(Path(run_dir))
    torch.manual_seed(config.train.seed)
    device = distributed.local_device()
    set_tf32(device, config.model.tf32)
    shard = sharding.shards(config)
    if base_model is None:
        tokenizer = load_tokenizer(config.model.name)
        if shard:
            model = sharding.load_sharded_model(config.model, config.lora, seed=config.train.seed)
        else:  # prepared, and already where device_map put it; LoRA is made beside each layer
            model = attach_lora(load_base_model(config.model, device), config.lora, seed=config.train.seed)
    else:
        prepare_base_model(base_model, config.model)
        model = attach_lora(base_model, config.lora, seed=config.train.seed)
        if shard:
            sharding.shard_model(model)
        else:
            model.to(device)
    if distributed.rank() > 0:  # the same LoRA initialisation on every rank, but rank-specific dropout
        torch.manual_seed(config.train.seed * 1_000_003 + distributed.rank())
    if not need_data:
        return Session(config, paths, model, lora_parameters(model), tokenizer, None, [], [], [])
    task = get_task(config.data.task)
    train_examples, val_examples, unused = load_splits(task, config, need_train=need_train)
    train_examples, calibration = calibration_split(train_examples, config)
    scorer = scorer_for(config, tokenizer, task)
    splits = {"train": train_examples, "validation": val_examples, "unused train": unused,
              "calibration": calibration}
    truncation = {label: scorer.prepare(examples, f"{task.name} {label}") for label, examples in splits.items()
                  if examples}
    return Session(config, paths, model, lora_parameters(model), tokenizer, scorer, train_examples, val_examples,
                   unused, calibration, truncation)


def scorer_for(config: RunConfig, tokenizer, task: Task) -> Scorer:
    """The scorer of ``task`` with the run's scoring protocol."""
    d = config.data
    return make_scorer(d.scoring, tokenizer, task, max_length=d.max_length, length_normalize=d.length_normalize)


def load_splits(task: Task, config: RunConfig,
                need_train: bool = True) -> tuple[list[Example], list[Example], list[Example]]:
    """Training, evaluation and unused training examples of a run (see the module docstring).

    With ``need_train=False`` only the evaluation examples are loaded (the other two are empty).
    """
    d = config.data
    if d.holdout is None:
        if not need_train:
            return [], task.load("validation", data_dir=d.data_dir, limit=d.eval_limit, seed=0), []
        pool = task.load("train", data_dir=d.data_dir)
        train = subsample(pool, d.train_limit, config.train.seed)  # = task.load("train", limit=..., seed=...)
        used = {ex.id for ex in train}
        return (train, task.load("validation", data_dir=d.data_dir, limit=d.eval_limit, seed=0),
                [ex for ex in pool if ex.id not in used])
    pool = task.load("train", data_dir=d.data_dir)
    if d.holdout >= len(pool):
        raise ConfigError(f"invalid data.holdout={d.holdout}: "
                          f"the train split of {d.task} has only {len(pool)} examples")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
    held, rest = [pool[i] for i in order[: d.holdout]], [pool[i] for i in order[d.holdout :]]
    unused: list[Example] = []
    if d.train_limit is not None and d.train_limit < len(rest):
        pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(config.train.seed))
        chosen = set(pick[: d.train_limit].tolist())
        unused = [rest[i] for i in range(len(rest)) if i not in chosen]
        rest = [rest[i] for i in sorted(chosen)]
    return (rest if need_train else []), held[: d.eval_limit], (unused if need_train else [])


def calibration_split(examples: list[Example], config: RunConfig) -> tuple[list[Example], list[Example]]:
    """(training, calibration) examples: ``data.calibration`` of ``examples`` chosen with the run seed, in their
    order, and the rest; (``examples``, []) without it."""
    k = config.data.calibration
    if not k or not examples:
        return examples, []
    if k >= len(examples):
        raise ConfigError(f"invalid data.calibration={k}: the run has only {len(examples)} training questions "
                          "(data.train_limit); keep some to train on")
    pick = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.train.seed + 7_919))
    chosen = set(pick[:k].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in chosen],
            [ex for i, ex in enumerate(examples) if i in chosen])


def load_adapter_weights(model: torch.nn.Module, folder: Path, adapter_name: str = "default") -> None:
    """Load ``folder/adapter_model.safetensors`` (peft format) into ``model``'s adapter ``adapter_name``.

    Raises FileNotFoundError if the file is missing, ValueError naming the file if it is unreadable or lacks
    LoRA weights the model expects.
    """
    from peft import set_peft_model_state_dict

    adapter = Path(folder) / ADAPTER_FILE
    if not adapter.is_file():
        raise FileNotFoundError(f"{adapter} is missing: the run has not finished training")
    weights, _ = _io.read_safetensors(adapter)
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if missing:
        raise ValueError(f"{adapter} lacks LoRA weights the model expects, e.g. {missing[0]}")
