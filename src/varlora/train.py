"""The training recipe as flat functions: setup → fit (with resumable checkpoints) → save → evaluate.

A run folder holds::

    config.json                 the RunConfig (a rerun with another config is refused)
    metrics.jsonl               one row per step ("train") and per periodic evaluation ("eval")
    checkpoint.pt               the latest resumable state, written atomically (adapter, optimizer,
                                scheduler, RNG states, step, training seconds)
    final/                      peft adapter (adapter_model.safetensors, adapter_config.json) and, for
                                IVON, posterior.safetensors (σ, h, ess, δ)
    eval/<task>.json            metrics of every method; eval/<task>.probs.safetensors the probabilities
    summary.json                written last: the run's final metrics and training seconds

Running the same command again continues a killed run from its checkpoint, bit for bit, and does
nothing more for a finished one. Under ``torchrun`` the ranks share each batch (see
:mod:`varlora.distributed`); rank 0 writes the files, and the checkpoint keeps every rank's RNG states.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from varlora import _io, distributed
from varlora.config import ConfigError, RunConfig
from varlora.evaluate import Prediction, evaluate_model
from varlora.models import attach_lora, load_base_model, load_tokenizer, lora_parameters
from varlora.optim import IVON
from varlora.posterior import Posterior
from varlora.run_paths import RunPaths, task_file_stem
from varlora.scoring import make_scorer
from varlora.tasks import Example, get_task

__all__ = ["RunPaths", "Session", "setup", "build_optimizer", "linear_schedule", "batch_indices", "fit",
           "train_run", "evaluate_run", "load_final", "load_splits", "train_step", "task_file_stem"]

Log = Callable[[str], None]


@dataclass
class Session:
    """What a run holds in memory: the model with LoRA, its named trainable parameters, task and data."""

    config: RunConfig
    paths: RunPaths
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    tokenizer: Any
    scorer: Any
    train_examples: list[Example]
    val_examples: list[Example]


def setup(config: RunConfig, run_dir: str | Path, *, need_train: bool = True) -> Session:
    """Load the model and data of ``config``; LoRA is initialised from the run seed."""
    paths = RunPaths(Path(run_dir))
    torch.manual_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model.name)
    base = load_base_model(config.model.name, config.model.dtype)
    model = attach_lora(base, config.lora, seed=config.train.seed)
    model.to(distributed.local_device())
    if distributed.rank() > 0:  # the same LoRA initialisation on every rank, but rank-specific dropout
        torch.manual_seed(config.train.seed * 1_000_003 + distributed.rank())
    task = get_task(config.data.task)
    train_examples, val_examples = load_splits(task, config, need_train=need_train)
    scorer = _scorer(config, tokenizer, task)
    return Session(config, paths, model, lora_parameters(model), tokenizer, scorer, train_examples, val_examples)


def _scorer(config: RunConfig, tokenizer, task):
    d = config.data
    return make_scorer(d.scoring, tokenizer, task, max_length=d.max_length, length_normalize=d.length_normalize)


def load_splits(task, config: RunConfig, need_train: bool = True) -> tuple[list[Example], list[Example]]:
    """Training and evaluation examples of a run.

    Normally the train split (``train_limit`` random examples, seeded by the run seed) and the validation
    split (``eval_limit`` examples chosen with seed 0, the same for every run). With ``data.holdout = N``
    (hyper-parameter tuning) the validation split is never read: N training examples, chosen with seed 0,
    are the evaluation set and the rest the training pool.
    """
    d = config.data
    if d.holdout is None:
        train = (task.load("train", data_dir=d.data_dir, limit=d.train_limit, seed=config.train.seed)
                 if need_train else [])
        return train, task.load("validation", data_dir=d.data_dir, limit=d.eval_limit, seed=0)
    pool = task.load("train", data_dir=d.data_dir)
    if d.holdout >= len(pool):
        raise ConfigError(f"invalid data.holdout={d.holdout}: "
                          f"the train split of {d.task} has only {len(pool)} examples")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
    held, rest = [pool[i] for i in order[: d.holdout]], [pool[i] for i in order[d.holdout :]]
    if d.train_limit is not None and d.train_limit < len(rest):
        pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(config.train.seed))
        rest = [rest[i] for i in sorted(pick[: d.train_limit].tolist())]
    return rest, held[: d.eval_limit]


def build_optimizer(config: RunConfig, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (the MAP baseline) or IVON with the run's hyper-parameters."""
    if config.train.optimizer == "adamw":
        a = config.adamw
        return torch.optim.AdamW(params, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps,
                                 weight_decay=a.weight_decay, foreach=True)
    v = config.ivon
    # each rank its own noise: under torch.distributed the ranks are IVON's MC samples (sync=True)
    generator = torch.Generator().manual_seed(config.train.seed + 1_000_003 * distributed.rank())
    return IVON(params, lr=v.lr, ess=v.ess, hess_init=v.hess_init, beta1=v.beta1, beta2=v.beta2,
                weight_decay=v.weight_decay, mc_samples=v.mc_samples, clip_radius=v.clip_radius,
                rescale_lr=v.rescale_lr, generator=generator, sync=distributed.active())


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def batch_indices(step: int, batch_size: int, n_examples: int, seed: int) -> list[int]:
    """Example indices of ``step``: a fresh seeded permutation every epoch, stateless so resume is exact."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_examples)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(order[offset]))
    return indices


def _step_loss(session: Session, examples: list[Example], n_micro: int) -> float:
    """Forward + backward of one micro-batch; the loss is scaled so micro-batches sum to the batch mean."""
    batch = session.scorer.collate(examples)
    logits = session.scorer.choice_logits(session.model, batch)  # (B, K)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device)) / n_micro
    loss.backward()
    return float(loss.detach())


def train_step(session: Session, optimizer: torch.optim.Optimizer, examples: list[Example]) -> float:
    """One optimizer step on ``examples``; returns the mean training loss over micro-batches and samples.

    IVON: each of the ``mc_samples`` samples θₛ runs all micro-batches inside ``sampled_params`` (their
    gradients accumulate at the same θₛ), the optimizer clips the sample's gradient norm before it consumes
    it, then one ``step``. AdamW: accumulate, clip, step. Under :mod:`varlora.distributed` each rank takes
    every N-th example (AdamW averages the gradients over ranks before clipping; IVON averages its
    estimates in ``step``) and the loss is the mean over ranks.
    """
    n_micro = session.config.train.grad_accum
    examples = examples[distributed.rank() :: distributed.world_size()]
    micro_batches = [examples[i::n_micro] for i in range(n_micro)]
    if isinstance(optimizer, IVON):
        total = 0.0
        for _ in range(optimizer.mc_samples):
            with optimizer.sampled_params(train=True, max_grad_norm=session.config.train.max_grad_norm):
                total += sum(_step_loss(session, mb, n_micro) for mb in micro_batches)
        optimizer.step()
        return distributed.mean_over_ranks(total / optimizer.mc_samples)
    optimizer.zero_grad(set_to_none=True)
    total = sum(_step_loss(session, mb, n_micro) for mb in micro_batches)
    distributed.average_gradients(list(session.params.values()))
    if session.config.train.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(session.params.values()), session.config.train.max_grad_norm)
    optimizer.step()
    return distributed.mean_over_ranks(total)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(session, optimizer, scheduler, step: int, train_seconds: float) -> None:
    """Rank 0 writes; with several ranks, ``ranks`` keeps each one's RNG states and IVON noise generators
    (the rest of the state is the same on every rank)."""
    optimizer_state = optimizer.state_dict()
    ranks = distributed.all_gather_objects({"rng": _rng_state(), "ivon": optimizer_state.get("ivon")})
    if not distributed.is_main():
        return
    _io.torch_save({
        "step": step,
        "train_seconds": train_seconds,
        "params": {n: p.detach().cpu().clone() for n, p in session.params.items()},
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": ranks[0]["rng"],  # this rank's (rank 0's)
        **({"ranks": ranks} if distributed.active() else {}),
    }, session.paths.checkpoint)


def _load_checkpoint(session, optimizer, scheduler) -> tuple[int, float]:
    state = torch.load(session.paths.checkpoint, map_location="cpu", weights_only=False)
    saved_world = len(state.get("ranks", [None]))
    if saved_world != distributed.world_size():
        raise ConfigError(f"{session.paths.checkpoint} was written by {saved_world} process(es); resume it with "
                          f"as many (this run has {distributed.world_size()})")
    with torch.no_grad():
        for name, param in session.params.items():
            param.copy_(state["params"][name])
    own = state["ranks"][distributed.rank()] if "ranks" in state else {"rng": state["rng"]}
    optimizer_state = state["optimizer"]
    if own.get("ivon") is not None:
        optimizer_state = {**optimizer_state, "ivon": own["ivon"]}
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(own["rng"])
    return state["step"], state["train_seconds"]


def _effective(config: RunConfig) -> dict[str, Any]:
    """The config without the optimizer sections the run does not use (they cannot affect it): the other
    optimizer's, and both when ``train.steps == 0`` (a zero-shot run never steps)."""
    data = config.to_dict()
    other = "ivon" if config.train.optimizer == "adamw" else "adamw"
    for section in {"adamw", "ivon"} if config.train.steps == 0 else {other}:
        del data[section]
    return data


def _prepare_run_dir(config: RunConfig, paths: RunPaths) -> None:
    """Write config.json for a new run; refuse to continue a run made with a different config (the unused
    optimizer's section aside, so that e.g. a changed IVON default does not orphan finished AdamW runs)."""
    if paths.config.exists():
        saved = RunConfig.load(paths.config)
        if _effective(saved) != _effective(config):
            diff = _config_diff(_effective(saved), _effective(config))
            raise ConfigError(f"{paths.root} holds a run with another config ({diff}); "
                              "use a new run folder or the same options")
        return
    _io.write_json(paths.config, config.to_dict())


def _config_diff(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _config_diff(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: saved {a!r}, given {b!r}"
    return ""


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if not distributed.is_main():
        return
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()


def fit(session: Session, log: Log = print) -> tuple[torch.optim.Optimizer, float]:
    """Train for ``config.train.steps`` steps, resuming from ``checkpoint.pt`` when present.

    Returns the optimizer and the training seconds (steps only: evaluation and checkpoints excluded).
    """
    cfg = session.config.train
    world = distributed.world_size()
    if cfg.batch_size % world or cfg.batch_size // world < cfg.grad_accum:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must split evenly over {world} processes, with at "
                          f"least train.grad_accum={cfg.grad_accum} examples each")
    optimizer = build_optimizer(session.config, list(session.params.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.warmup_steps, cfg.steps))
    step, train_seconds = 0, 0.0
    if session.paths.checkpoint.exists():
        step, train_seconds = _load_checkpoint(session, optimizer, scheduler)
        if distributed.is_main():
            kept = [r for r in _io.read_jsonl(session.paths.metrics) if r["step"] <= step]
            _io.write_text(session.paths.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        log(f"resuming {session.paths.root} from step {step}/{cfg.steps}")
    elif session.paths.metrics.exists() and distributed.is_main():
        session.paths.metrics.unlink()
    if not session.train_examples and cfg.steps > 0:
        raise ValueError(f"task {session.config.data.task!r} has no training examples")
    if cfg.eval_every and step == 0 and cfg.steps > 0:  # learning curves start at the untrained model
        _append_rows(session.paths.metrics, [_periodic_eval(session, 0, 0.0)])
    session.model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.optimizer} {session.config.data.task}", unit="step",
               dynamic_ncols=True, disable=None if distributed.is_main() else True)
    while step < cfg.steps:
        indices = batch_indices(step, cfg.batch_size, len(session.train_examples), cfg.seed)
        started = time.perf_counter()
        loss = train_step(session, optimizer, [session.train_examples[i] for i in indices])
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        seconds = time.perf_counter() - started
        train_seconds += seconds
        step += 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {step}; lower the learning rate")
        row = {"kind": "train", "step": step, "loss": loss, "lr": lr, "step_seconds": seconds,
               "train_seconds": train_seconds}
        if isinstance(optimizer, IVON):
            stats = optimizer.last_step_stats
            row |= {k: float(stats[k]) for k in ("clip_fraction", "hess_mean", "sigma_mean", "grad_norm")
                    if stats.get(k) is not None}
        rows = [row]
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            rows.append(_periodic_eval(session, step, train_seconds))
            session.model.train()
        _append_rows(session.paths.metrics, rows)
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_checkpoint(session, optimizer, scheduler, step, train_seconds)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"acc": f"{rows[-1]['acc']:.1f}"} if len(rows) > 1 else {}))
    bar.close()
    session.model.eval()
    return optimizer, train_seconds


def _periodic_eval(session: Session, step: int, train_seconds: float) -> dict[str, Any]:
    """Accuracy and calibration at the current weights (the posterior mean for IVON)."""
    [prediction] = evaluate_model(session.model, session.scorer, session.val_examples, session.config.eval,
                                  optimizer_name=session.config.train.optimizer, params=session.params,
                                  posterior=None)
    return {"kind": "eval", "step": step, "train_seconds": train_seconds, **prediction.metrics}


def _save_final(session: Session, optimizer: torch.optim.Optimizer) -> None:
    if not distributed.is_main():
        return
    with _io.atomic_dir(session.paths.final) as folder:
        session.model.save_pretrained(folder)
        if isinstance(optimizer, IVON) and session.config.train.steps > 0:
            Posterior.from_optimizer(session.params, optimizer).save(folder)


def load_final(session: Session) -> Posterior | None:
    """Load the final adapter weights into the session's model; return the posterior (None for AdamW)."""
    folder = session.paths.final
    adapter = folder / "adapter_model.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"{adapter} is missing: the run in {session.paths.root} has not finished training")
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(session.model, load_file(str(adapter)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"{adapter} lacks LoRA weights the model expects, e.g. {missing[0]}")
    if session.config.train.optimizer != "ivon" or session.config.train.steps == 0:
        return None
    posterior = Posterior.load(folder)
    posterior.check_matches(session.params)
    return posterior


def evaluate_run(session: Session, posterior: Posterior | None, task_name: str | None = None,
                 log: Log = print) -> list[Prediction]:
    """Evaluate the final model on ``task_name`` (default: the training task) and save metrics + probabilities."""
    task_name = task_name or session.config.data.task
    if task_name == session.config.data.task:
        examples, scorer = session.val_examples, session.scorer
    else:
        task = get_task(task_name)
        examples = task.load("validation", data_dir=session.config.data.data_dir,
                             limit=session.config.data.eval_limit, seed=0)
        scorer = _scorer(session.config, session.tokenizer, task)
    started = time.perf_counter()
    predictions = evaluate_model(session.model, scorer, examples, session.config.eval,
                                 optimizer_name=_method_prefix(session.config), params=session.params,
                                 posterior=posterior)
    seconds = time.perf_counter() - started
    _save_predictions(session, task_name, predictions, seconds)
    for p in predictions:
        m = p.metrics
        log(f"{task_name:>16} {p.method:>16}: acc {m['acc']:5.1f}%  ece {m['ece']:5.1f}%  "
            f"nll {m['nll']:.3f}  brier {m['brier']:.3f}  (n={len(examples)}, ece bins={m['n_bins']})")
    return predictions


def _method_prefix(config: RunConfig) -> str:
    """``zero-shot`` for an untrained run (steps 0: LoRA B = 0, the base model), else the optimizer's name."""
    return "zero-shot" if config.train.steps == 0 else config.train.optimizer


def _save_predictions(session: Session, task_name: str, predictions: list[Prediction], seconds: float) -> None:
    if not distributed.is_main():
        return
    c = session.config
    tensors = {"labels": predictions[0].labels.contiguous()}
    for p in predictions:
        tensors[f"probs/{p.method}"] = p.probs.contiguous()
    with _io.atomic_path(session.paths.eval_probs(task_name)) as tmp:
        save_file(tensors, str(tmp))
    _io.write_json(session.paths.eval_json(task_name), {
        "task": task_name,
        "train_task": c.data.task,
        "scoring": c.data.scoring,
        "n_examples": len(predictions[0].labels),
        "n_samples": c.eval.n_samples,
        "eval_seconds": seconds,
        "methods": {p.method: {"tau": p.tau, **p.metrics} for p in predictions},
    })


def train_run(config: RunConfig, run_dir: str | Path, log: Log = print) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; return its summary. A finished run is only re-read."""
    paths = RunPaths(Path(run_dir))
    log = distributed.main_only(log)
    refused = None
    if distributed.is_main():
        try:
            _prepare_run_dir(config, paths)
        except ConfigError as err:
            refused = str(err)
    refused = distributed.broadcast_object(refused)
    if refused is not None:
        raise ConfigError(refused)
    summary_path = paths.root / "summary.json"
    if distributed.broadcast_object(summary_path.exists()):
        log(f"{paths.root} is complete; reading its results")
        return json.loads(summary_path.read_text())
    session = setup(config, paths.root)
    if paths.final.exists() and not paths.checkpoint.exists() and config.train.steps > 0:
        raise FileNotFoundError(f"{paths.root} has final/ but no checkpoint.pt; start a new run folder")
    optimizer, train_seconds = fit(session, log)
    _save_final(session, optimizer)
    trained_ivon = isinstance(optimizer, IVON) and config.train.steps > 0
    posterior = Posterior.from_optimizer(session.params, optimizer) if trained_ivon else None
    results = {}
    for task_name in [config.data.task, *config.eval.ood_tasks]:
        results[task_name] = {p.method: p.metrics for p in evaluate_run(session, posterior, task_name, log)}
    summary = {"run_dir": str(paths.root), "optimizer": config.train.optimizer, "task": config.data.task,
               "seed": config.train.seed, "steps": config.train.steps, "train_seconds": train_seconds,
               "n_train": len(session.train_examples), "n_eval": len(session.val_examples), "results": results,
               "processes": distributed.world_size()}
    if distributed.is_main():
        _io.write_json(summary_path, summary)
    distributed.barrier()
    return summary
