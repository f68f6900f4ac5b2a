"""The generic recipe of a run, for every method: setup → fit (resumable) → post-hoc fit → save → evaluate.

A run folder holds::

    config.json                 the RunConfig (a rerun with another config is refused, naming the field)
    metrics.jsonl               one row per step ("train") and per periodic evaluation ("eval")
    checkpoint.safetensors      the latest resumable training state, written atomically, no pickle
                                (varlora.checkpoint; an older version's checkpoint.pt still resumes)
    final/                      the method's saved state (peft adapter, posterior, temperature, ...) and
                                stage.json (training seconds, post-hoc fit, peak memory, the SHA-256 of every
                                other file of final/, checked when it is loaded): training is done
    eval/<task>.json            the rows of every prediction (label, method, τ, samples, forward passes, metrics),
                                the evaluation's seconds and peak memory, and the fingerprint of the posterior
                                and config it was made with
    eval/<task>.probs.safetensors   the probabilities of each row, per sample where it samples
    summary.json                written last: the run's results and cost, and how many examples of each split
                                ``data.max_length`` truncated (and by how many tokens); a finished run is only re-read

Running the same command again continues a killed run: from its checkpoint while training, from ``final/``
after it (the post-hoc fit is not redone; an evaluation task whose ``eval/<task>.json`` carries this ``final/``'s
and config's fingerprint is read, not redone), and does nothing more for a finished one. A post-hoc method
(``posthoc_of``) may take its trained adapter from a finished run of that method (``reuse``), whose config
must then equal this run's apart from the method.

Every split the run reads (training, evaluation, out-of-distribution) is tokenised once and checked before the
first step: rows the scorer cannot score stop the run there, each named by file and line with its reason.

Faults: a non-finite training loss stops the run with FloatingPointError naming the step (the last checkpoint
is kept); a write that fails (disk full) raises :class:`~varlora.checkpoint.SaveError` naming the file, the
files written before it intact, and the same command continues once there is space; a truncated or corrupted
checkpoint or file of ``final/`` raises ValueError naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tqdm.auto import tqdm

from varlora import _io, calibration, distributed, sharding
from varlora.checkpoint import (
    file_digests,
    file_sha256,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    saving,
    verify_digests,
)
from varlora.config import ConfigError, RunConfig
from varlora.cost import UNNAMED_MEMORY_KIND, PeakMemory, weakest
from varlora.evaluate import finish
from varlora.methods import Method, Prediction, build_method, get_method
from varlora.run_paths import RunPaths, task_file_stem
from varlora.session import Session, setup

__all__ = ["RunPaths", "Session", "setup", "fit", "train_run", "evaluate_run", "load_run", "check_final",
           "task_file_stem", "STAGE_FILE"]

Log = Callable[[str], None]
STAGE_FILE = "stage.json"


def fit(session: Session, method: Method, log: Log = print) -> float:
    """Run ``method.total_steps`` training steps, resuming from the run's checkpoint when present.

    Returns the training seconds (steps only: evaluation and checkpoints excluded).
    """
    cfg = session.config.train
    total = method.total_steps
    world = distributed.world_size()
    if cfg.batch_size % world or cfg.batch_size // world < cfg.grad_accum:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must split evenly over {world} processes, with at "
                          f"least train.grad_accum={cfg.grad_accum} examples each")
    step, train_seconds = 0, 0.0
    checkpoint = find_checkpoint(session.paths)
    if checkpoint is not None:
        step, train_seconds = load_checkpoint(session, method)
        if distributed.is_main():
            kept = [r for r in _io.read_jsonl(session.paths.metrics) if r["step"] <= step]
            with saving(session.paths.metrics, "nothing else was changed"):
                _io.write_text(session.paths.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        log(f"resuming {session.paths.root} from step {step}/{total}")
    elif session.paths.metrics.exists() and distributed.is_main():
        session.paths.metrics.unlink()
    if total and not session.train_examples:
        raise ConfigError(f"task {session.config.data.task!r} has no training examples")
    if cfg.eval_every and step == 0 and total > 0:  # learning curves start at the untrained model
        _append_rows(session.paths.metrics, [_periodic_eval(session, method, 0, 0.0)])
    session.model.train()
    bar = tqdm(total=total, initial=step, desc=f"{method.name} {session.config.data.task}", unit="step",
               dynamic_ncols=True, disable=None if distributed.is_main() else True)
    saved = step  # the step of the checkpoint (0: none yet)
    while step < total:
        started = time.perf_counter()
        result = method.train_step(step)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        step += 1
        if not math.isfinite(result.loss):
            kept = f"{checkpoint.name} of step {saved} is kept" if saved else "no checkpoint was written yet"
            raise FloatingPointError(f"training loss became {result.loss} at step {step} ({kept}); lower the "
                                     "learning rate in a new run folder")
        rows = [{"kind": "train", "step": step, "loss": result.loss, **result.stats, "step_seconds": seconds,
                 "train_seconds": train_seconds}]
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            rows.append(_periodic_eval(session, method, step, train_seconds))
            session.model.train()
        _append_rows(session.paths.metrics, rows)
        if step % cfg.save_every == 0 or step == total:
            save_checkpoint(session, method, step, train_seconds)
            checkpoint = session.paths.checkpoint
            saved = step
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.3f}", **({"acc": f"{rows[-1]['acc']:.1f}"} if len(rows) > 1 else {}))
    bar.close()
    session.model.eval()
    return train_seconds


def _periodic_eval(session: Session, method: Method, step: int, train_seconds: float) -> dict[str, Any]:
    """Accuracy and calibration of the method's point prediction (the posterior mean for IVON)."""
    prediction = finish(method.predict_at_mean(session.val_examples, session.scorer), session.config.eval.n_bins)
    return {"kind": "eval", "step": step, "train_seconds": train_seconds, **prediction.metrics}


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if not distributed.is_main():
        return
    with saving(path, "the rows before are intact: free some space and rerun the same command to continue"), \
            open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()


def _prepare_run_dir(config: RunConfig, paths: RunPaths) -> None:
    """Write config.json for a new run; refuse to continue a run made with a different config (sections of
    methods the run does not use aside, so that e.g. a changed IVON default does not orphan AdamW runs)."""
    if paths.config.exists():
        diff = RunConfig.load(paths.config).difference(config)
        if diff:
            raise ConfigError(f"{paths.root} holds a run with another config ({diff}); "
                              "use a new run folder or the same options")
        return
    _io.write_json(paths.config, config.to_dict())


def _reusable(config: RunConfig, source: Path) -> dict[str, Any] | None:
    """The summary of a finished run in ``source`` that trained exactly this run's adapter (same config, the
    method aside), or None."""
    summary = source / "summary.json"
    if not summary.is_file() or not (source / "config.json").is_file():
        return None
    if not config.starts_from(RunConfig.load(source / "config.json")):
        return None
    return json.loads(summary.read_text())


def _train_or_reuse(session: Session, method: Method, reuse: Path | None, memory: PeakMemory,
                    log: Log) -> dict[str, Any]:
    """Train (or resume), or take the adapter of a finished run; then the post-hoc fit. Returns stage info."""
    source = _reusable(session.config, reuse) if reuse is not None else None
    memory.reset()
    if source is not None and find_checkpoint(session.paths) is None:
        log(f"reusing the trained adapter of {reuse} ({method.posthoc_of})")
        check_final(reuse / "final")
        get_method(method.posthoc_of).load(method, reuse / "final")
        if distributed.is_main() and (reuse / "metrics.jsonl").exists():
            shutil.copyfile(reuse / "metrics.jsonl", session.paths.metrics)
        cost = source["cost"]
        stage = {"train_seconds": cost["train_seconds"], "peak_train_bytes": cost["peak_train_bytes"],
                 "trained_in": str(reuse), "map_optimizer_state_bytes": cost["optimizer_state_bytes"],
                 "map_memory_kind": cost.get("memory_kind", UNNAMED_MEMORY_KIND)}
    else:
        train_seconds = fit(session, method, log)
        stage = {"train_seconds": train_seconds, "peak_train_bytes": memory.read(), "trained_in": "this run"}
    memory.reset()
    started = time.perf_counter()
    stage["posthoc"] = method.fit_posthoc(log)
    if session.calibration_examples:
        stage["calibration_layer"] = _fit_calibration_layer(session, method, log)
    stage["fit_seconds"] = time.perf_counter() - started
    stage["peak_fit_bytes"] = memory.read()
    stage |= method.extra_bytes()  # after the fit: a posterior (IVON's σ, Laplace's factors) exists now
    if "map_optimizer_state_bytes" in stage:  # the training this run reused held that optimizer state
        stage["optimizer_state_bytes"] = stage.pop("map_optimizer_state_bytes")
    stage["memory_kind"] = weakest([memory.kind, stage.pop("map_memory_kind", memory.kind)])
    return stage


def _fit_calibration_layer(session: Session, method: Method, log: Log) -> dict[str, Any]:
    """The temperature of each of the method's rows on the run's calibration questions (:mod:`varlora.calibration`)."""
    examples = session.calibration_examples
    fitted = calibration.fit_layer(method.predict(examples, session.scorer))
    for label, fit in fitted.items():
        log(f"calibration layer: {label} T = {fit['T']:.4f} on {len(examples)} calibration questions "
            f"(NLL there {fit['nll_before']:.4f} → {fit['nll_after']:.4f})")
    return fitted


def _save_final(session: Session, method: Method, stage: dict[str, Any]) -> None:
    """Write ``final/`` in one piece: the method's files, then stage.json with their digests (rank 0; a sharded
    model's LoRA weights are gathered whole first, by every rank)."""
    with sharding.full_weights(session.model, session.params):
        if not distributed.is_main():
            return
        kept = "the checkpoint is kept: free some space and rerun the same command to save it again"
        with saving(session.paths.final, kept), _io.atomic_dir(session.paths.final) as folder:
            method.save(folder)
            _io.write_json(folder / STAGE_FILE, stage | {"files": file_digests(folder)})


def check_final(folder: Path) -> dict[str, Any]:
    """Check every file of a run's ``final/`` against the digests in its stage.json and return the stage record.

    Raises FileNotFoundError or ValueError naming a missing or damaged file. A ``final/`` saved before digests
    were recorded is checked only for a readable stage.json.
    """
    remedy = (f"; delete {folder} (and summary.json beside it) and rerun the same `varlora train` command to save "
              "it again from the checkpoint")
    stage_path = folder / STAGE_FILE
    try:
        stage = json.loads(stage_path.read_text())
        if not isinstance(stage, dict):
            raise ValueError(f"expected a JSON object, got {type(stage).__name__}")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{stage_path} is missing: the run has not finished training") from err
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{stage_path} is truncated or corrupted ({err}){remedy}") from err
    verify_digests(folder, stage.get("files", {}), remedy)
    return stage


def evaluate_run(session: Session, method: Method, task_name: str | None = None, log: Log = print,
                 memory: PeakMemory | None = None) -> tuple[list[Prediction], dict[str, Any]]:
    """Evaluate the final method on ``task_name`` (default: the training task; others are out of distribution),
    save the rows and probabilities, and return the predictions and the evaluation's record (the content of
    ``eval/<task>.json``: rows, seconds, peak memory). With ``memory``, the peak memory of the evaluation is
    measured and saved with the rows."""
    task_name = task_name or session.config.data.task
    examples, scorer = session.eval_split(task_name)
    if memory is not None:
        memory.reset()
    started = time.perf_counter()
    predictions = method.predict(examples, scorer)
    predictions = [finish(p, session.config.eval.n_bins)
                   for p in predictions + calibration.apply_layer(predictions, _calibration_layer(session))]
    seconds = time.perf_counter() - started
    peak = memory.read() if memory is not None else None
    record = _save_predictions(session, task_name, predictions, seconds, peak,
                               memory.kind if memory is not None else None)
    _log_rows(task_name, record["predictions"], len(examples), log)
    return predictions, record


def _calibration_layer(session: Session) -> dict[str, Any]:
    """The calibration layer the run fitted after training ({} where it has none), from ``final/stage.json``."""
    stage = session.paths.final / STAGE_FILE
    return json.loads(stage.read_text()).get("calibration_layer", {}) if stage.is_file() else {}


def _log_rows(task_name: str, rows: list[dict[str, Any]], n: int, log: Log) -> None:
    for row in rows:
        m = row["metrics"]
        log(f"{task_name:>16} {row['label']:>16}: acc {m['acc']:5.1f}%  ece {m['ece']:5.1f}%  "
            f"nll {m['nll']:.3f}  brier {m['brier']:.3f}  (n={n}, ece bins={m['n_bins']})")


def evaluation_fingerprint(session: Session) -> str | None:
    """SHA-256 of ``final/stage.json`` (which holds the digest of every other file of ``final/``) and of the
    run's config (its data and evaluation protocol included), or None before ``final/`` exists: an
    ``eval/<task>.json`` that carries it was made from exactly this posterior by exactly this protocol."""
    stage = session.paths.final / STAGE_FILE
    if not stage.is_file():
        return None
    digest = hashlib.sha256(stage.read_bytes())
    digest.update(json.dumps(session.config.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()


def _saved_evaluation(session: Session, task_name: str) -> dict[str, Any] | None:
    """The ``eval/<task>.json`` of an evaluation that finished before a restart, if it carries this run's
    fingerprint, its peak memory, and the digest of the probabilities file beside it; else None (evaluate
    again). Files written before fingerprints existed are never taken."""
    fingerprint = evaluation_fingerprint(session)
    try:
        saved = json.loads(session.paths.eval_json(task_name).read_text())
        fresh = (fingerprint is not None and saved.get("fingerprint") == fingerprint
                 and saved.get("peak_eval_bytes") is not None
                 and saved.get("probs_sha256") == file_sha256(session.paths.eval_probs(task_name)))
    except (OSError, ValueError, AttributeError):  # missing, torn, or not a JSON object
        return None
    return saved if fresh else None


def prediction_row(p: Prediction) -> dict[str, Any]:
    """How a prediction is described in eval/<task>.json and summary.json."""
    return {"label": p.label, "method": p.method, "tau": p.tau, "n_samples": p.n_samples,
            "forward_passes": p.forward_passes, "metrics": p.metrics}


def _save_predictions(session: Session, task_name: str, predictions: list[Prediction], seconds: float,
                      peak_bytes: int | None, memory_kind: str | None) -> dict[str, Any]:
    """Write ``eval/<task>.probs.safetensors`` and ``eval/<task>.json`` (on the main process) and return the
    JSON's content (without the probabilities' digest on the other processes, which write nothing)."""
    c = session.config
    record = {
        "task": task_name,
        "train_task": c.data.task,
        "scoring": c.data.scoring,
        "n_examples": len(predictions[0].labels),
        "eval_seconds": seconds,
        "peak_eval_bytes": peak_bytes,
        "memory_kind": memory_kind,
        "fingerprint": evaluation_fingerprint(session),
        "predictions": [prediction_row(p) for p in predictions],
    }
    if not distributed.is_main():
        return record
    tensors = {"labels": predictions[0].labels.contiguous()}
    for p in predictions:
        tensors[f"probs/{p.label}"] = p.probs.contiguous()
        if p.sample_probs is not None:
            tensors[f"sample_probs/{p.label}"] = p.sample_probs.contiguous()
    kept = "final/ is kept: free some space and rerun the same command to evaluate again"
    with saving(session.paths.eval_probs(task_name), kept), \
            _io.atomic_path(session.paths.eval_probs(task_name)) as tmp:
        save_file(tensors, str(tmp))
    record["probs_sha256"] = file_sha256(session.paths.eval_probs(task_name))
    with saving(session.paths.eval_json(task_name), kept):
        _io.write_json(session.paths.eval_json(task_name), record)
    return record


def load_run(run_dir: str | Path, config: RunConfig | None = None) -> tuple[Session, Method]:
    """A finished run's session and method, restored from ``final/`` (``config`` may override evaluation)."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.exists():
        raise ConfigError(f"{paths.root} is not a run folder (no config.json)")
    config = config or RunConfig.load(paths.config)
    check_final(paths.final)
    session = setup(config, paths.root, need_train=False)
    method = build_method(session)
    with sharding.full_weights(session.model, session.params):  # every rank loads the whole adapter
        method.load(paths.final)
    return session, method


def train_run(config: RunConfig, run_dir: str | Path, log: Log = print, reuse: str | Path | None = None
              ) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; return its summary. A finished run is only re-read.

    ``reuse``: for a post-hoc method, a run folder of its ``posthoc_of`` method whose adapter to start from
    (used only if that run is finished and its config matches this one's, the method aside).
    """
    conflict = get_method(config.method.name).checkpointing_conflict
    if config.model.gradient_checkpointing and get_method(config.method.name).trains and conflict:
        raise ConfigError(f"invalid model.gradient_checkpointing=True for method {config.method.name!r}: "
                          f"{conflict}; train it without gradient checkpointing")
    paths = RunPaths(Path(run_dir))
    log = distributed.main_only(log)
    distributed.check_on_main(ConfigError, _prepare_run_dir, config, paths)
    summary_path = paths.root / "summary.json"
    if distributed.broadcast_object(summary_path.exists()):
        log(f"{paths.root} is complete; reading its results")
        return json.loads(summary_path.read_text())
    method_cls = get_method(config.method.name)
    if distributed.active() and not method_cls.supports_distributed:
        raise ConfigError(f"method {config.method.name!r} runs in one process only; launch it without torchrun")
    session = setup(config, paths.root)
    for task_name in config.eval.ood_tasks:  # checked and tokenised before training too
        session.eval_split(task_name)
    for report in session.truncation.values():
        log(report.describe())
    method = build_method(session)
    method.setup()
    memory = PeakMemory(next(iter(session.params.values())).device)
    stage_path = paths.final / STAGE_FILE
    if distributed.broadcast_object(stage_path.is_file()):
        log(f"{paths.final} is complete; evaluating it")
        stage = check_final(paths.final)
        with sharding.full_weights(session.model, session.params):
            method.load(paths.final)
    else:
        stage = _train_or_reuse(session, method, Path(reuse) if reuse else None, memory, log)
        _save_final(session, method, stage)
    results, rows, eval_seconds, peak_eval = {}, {}, {}, 0
    memory_kinds = [stage.get("memory_kind", UNNAMED_MEMORY_KIND)]
    for task_name in [config.data.task, *config.eval.ood_tasks]:
        saved = distributed.broadcast_object(_saved_evaluation(session, task_name) if distributed.is_main() else None)
        if saved is not None:
            log(f"{session.paths.eval_json(task_name)} was evaluated before the restart; reading it")
            _log_rows(task_name, saved["predictions"], saved["n_examples"], log)
        else:
            _, saved = evaluate_run(session, method, task_name, log, memory)
        task_rows, eval_seconds[task_name] = saved["predictions"], saved["eval_seconds"]
        peak_eval = max(peak_eval, saved["peak_eval_bytes"])
        memory_kinds.append(saved.get("memory_kind") or UNNAMED_MEMORY_KIND)
        results[task_name] = {row["label"]: row["metrics"] for row in task_rows}
        rows[task_name] = [{k: v for k, v in row.items() if k != "metrics"} for row in task_rows]
    cost = {k: stage[k] for k in ("train_seconds", "fit_seconds", "peak_train_bytes", "peak_fit_bytes",
                                  "extra_param_bytes", "optimizer_state_bytes")}
    cost |= {"eval_seconds": eval_seconds, "peak_eval_bytes": peak_eval, "memory_kind": weakest(memory_kinds),
             "lora_param_bytes": sum(p.numel() * p.element_size() for p in session.params.values()),
             "device": str(next(iter(session.params.values())).device)}
    summary = {"run_dir": str(paths.root), "method": config.method.name, "task": config.data.task,
               "seed": config.train.seed, "steps": method.total_steps, "train_seconds": stage["train_seconds"],
               "trained_in": stage["trained_in"], "posthoc": stage["posthoc"], "n_train": len(session.train_examples),
               "n_eval": len(session.val_examples), "results": results, "rows": rows, "cost": cost,
               "truncation": {label: report.to_dict() for label, report in session.truncation.items()},
               "processes": distributed.world_size(), "sharded": sharding.is_sharded(session.model)}
    if distributed.is_main():
        with saving(summary_path, "final/ and eval/ are kept: free some space and rerun the same command"):
            _io.write_json(summary_path, summary)
    distributed.barrier()
    return summary
