"""The ``varlora`` command line: train, eval, predict, demo, experiment, tasks, methods.

Options of ``train`` are generated from the config dataclasses (``--<group>.<field>``, help from the
field's metadata; every registered method's section is a group, e.g. ``--ivon.lr``, ``--ensemble.members``),
and a recipe file (YAML or JSON, the layout of ``config.json``) can set them first:
``varlora train --config recipes/arc_easy_ivon.yaml --train.steps 50 --run-dir runs/x``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from varlora.config import MODEL_ENV, ConfigError, RunConfig, all_groups

__all__ = ["main", "build_parser", "config_from_args"]


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _number_or(number: type, words: list[str]):
    def parse(text: str):
        if text in words:
            return text
        try:
            return number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or one of {words}, got {text!r}") from None

    return parse


def _optional(parse):
    def parse_optional(text: str):
        return None if text.lower() in ("none", "null") else parse(text)

    return parse_optional


def _argument_spec(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a dataclass field annotation."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        words = [w for a in inner if get_origin(a) is Literal for w in get_args(a)]
        if words:  # a number or a word, e.g. `float | Literal["auto"]`
            number = next(a for a in inner if get_origin(a) is not Literal)
            return {"type": _number_or(number, words), "metavar": f"{number.__name__.upper()}|{'|'.join(words)}"}
        spec = _argument_spec(inner[0])
        spec["type"] = _optional(spec["type"])
        return spec
    if origin is Literal:
        return {"type": str, "choices": list(get_args(annotation))}
    if origin is list:
        (item,) = get_args(annotation)
        return {"type": item, "nargs": "+"}
    if annotation is bool:
        return {"type": _parse_bool, "metavar": "BOOL"}
    return {"type": annotation}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for group_name, group_cls in all_groups().items():
        group = parser.add_argument_group(group_name, group_cls.__doc__)
        hints = typing.get_type_hints(group_cls)
        for f in fields(group_cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            spec = _argument_spec(hints[f.name])
            if (group_name, f.name) == ("method", "name"):
                from varlora.methods import list_methods

                spec["choices"] = list_methods()
            group.add_argument(f"--{group_name}.{f.name}", dest=f"{group_name}.{f.name}", default=None,
                               help=f"{f.metadata.get('help', '')} (default: {default})", **spec)


def _read_recipe(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"recipe file not found: {file}")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not valid YAML ({err})") from err
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}: line {err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of sections, got {type(data).__name__}")
    return data


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Recipe file (if any), then every ``--group.field`` given on the command line on top."""
    data = _read_recipe(args.config) if getattr(args, "config", None) else {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            group, name = key.split(".", 1)
            data.setdefault(group, {})[name] = value
    return RunConfig.from_dict(data, source=getattr(args, "config", None) or "command line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varlora", description="Variational LoRA fine-tuning with IVON.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune LoRA with a method (--method.name), then evaluate (resumable)")
    train.add_argument("--run-dir", required=True, help="run folder; rerunning the same command resumes it")
    train.add_argument("--config", help="recipe file (YAML or JSON) with the sections of config.json")
    train.add_argument("--reuse", help="post-hoc methods (mc_dropout, temperature, laplace, tfb): a finished run "
                                       "folder of the method they start from (adamw) with the same config, whose "
                                       "adapter to take instead of training again")
    _add_config_options(train)

    evaluate = sub.add_parser("eval", help="reload a finished run (adapter, posterior, ...) and evaluate it")
    evaluate.add_argument("run_dir", help="a run folder written by `varlora train`")
    evaluate.add_argument("--task", action="append", help="task to evaluate on (repeatable; default: the run's)")
    evaluate.add_argument("--taus", type=float, nargs="+", help="variance scales (default: the run's)")
    evaluate.add_argument("--n-samples", type=int, help="samples of a sampled method (default: the run's)")
    evaluate.add_argument("--n-bins", type=int, help="ECE bins (default: the run's)")
    size = evaluate.add_mutually_exclusive_group()
    size.add_argument("--limit", type=int, help="evaluate N examples of each task (seed-0 subset; default: the "
                                                "run's data.eval_limit)")
    size.add_argument("--all", action="store_true", help="evaluate every example of each task's validation split")

    predict = sub.add_parser("predict", help="predict with a finished run on your own questions (JSONL in, JSONL "
                                             "out: probabilities, choice, confidence, entropy, mutual information)")
    predict.add_argument("run_dir", help="a run folder written by `varlora train`")
    predict.add_argument("--input", required=True, help='JSONL file, one {"question", "choices": [...], '
                                                        '"answer"?: 0} per line')
    predict.add_argument("--output", required=True, help="JSONL file to write, one prediction per line")
    predict.add_argument("--model", help="base model (hub id, folder or GGUF file) instead of the run's")
    predict.add_argument("--n-samples", type=int, help="samples of a sampled method (default: the run's)")
    predict.add_argument("--tau", type=float, help="IVON: posterior variance scale in [0, 1] (0: the mean)")
    predict.add_argument("--row", help="prediction row by label, e.g. ivon@mean (default: the method's sampled "
                                       "row)")
    predict.add_argument("--batch-size", type=int, help="examples per forward (default: the run's)")

    demo = sub.add_parser("demo", help="offline demo: SmolLM2-135M on ARC-Easy, AdamW vs IVON, table and plots")
    demo.add_argument("--out", default="runs/demo", help="output folder (a rerun resumes it)")
    demo.add_argument("--steps", type=int, default=None, help="override the demo's training steps")

    experiment = sub.add_parser("experiment", help="the paper's comparison over tasks and seeds (resumable)")
    experiment.add_argument("preset", help="preset name (cpu, paper) or a recipe file")
    experiment.add_argument("--out", default=None, help="runs folder (default: runs/experiment-<preset>)")
    experiment.add_argument("--results", default=None, help="report folder (default: results/experiment-<preset>)")
    experiment.add_argument("--tasks", nargs="+", help="subset of the preset's tasks")
    experiment.add_argument("--seeds", type=int, nargs="+", help="subset of the preset's seeds")
    experiment.add_argument("--variants", nargs="+", help="subset of the preset's variants (e.g. one per process)")
    experiment.add_argument("--report-only", action="store_true",
                            help="only record the finished runs and rebuild tables and plots")
    experiment.add_argument("--status", action="store_true",
                            help="only print which runs are recorded, running or pending, and the hours left")

    sub.add_parser("tasks", help="list the registered tasks")
    sub.add_parser("methods", help="list the registered uncertainty methods")
    return parser


def _cmd_train(args: argparse.Namespace) -> None:
    from varlora.train import train_run

    train_run(config_from_args(args), args.run_dir, reuse=args.reuse)


def _cmd_eval(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from varlora.run_paths import RunPaths
    from varlora.train import evaluate_run, load_run

    paths = RunPaths(Path(args.run_dir))
    if not paths.config.exists():
        raise ConfigError(f"{paths.root} is not a run folder (no config.json)")
    config = RunConfig.load(paths.config)
    overrides = {k: v for k, v in (("taus", args.taus), ("n_samples", args.n_samples), ("n_bins", args.n_bins))
                 if v is not None}
    config.eval = replace(config.eval, **overrides)
    if args.limit is not None or args.all:
        config.data = replace(config.data, eval_limit=None if args.all else args.limit)
        overrides["eval_limit"] = config.data.eval_limit
    session, method = load_run(paths.root, config)
    tasks = args.task or [config.data.task]
    saved = {t: json.loads(paths.eval_json(t).read_text()) for t in tasks if paths.eval_json(t).exists()}
    for task_name in tasks:
        predictions, _ = evaluate_run(session, method, task_name)
        if task_name in saved and not overrides:
            before = {row["label"]: row["metrics"] for row in saved[task_name].get("predictions", [])}
            same = all(before.get(p.label) == p.metrics for p in predictions)
            print(f"{task_name}: {'reproduces' if same else 'DIFFERS FROM'} the metrics saved by training "
                  f"(n={len(predictions[0].labels)})")


def _cmd_predict(args: argparse.Namespace) -> None:
    from varlora.predictor import load, write_jsonl

    predictor = load(args.run_dir, model=args.model)
    predictions = predictor.predict(Path(args.input), n_samples=args.n_samples, tau=args.tau, row=args.row,
                                    batch_size=args.batch_size)
    n = write_jsonl(predictions, args.output)
    first = predictions[0]
    answered = [p for p in predictions if p.answer is not None]
    acc = f", accuracy {100 * sum(p.prediction == p.answer for p in answered) / len(answered):.1f}% on the " \
          f"{len(answered)} with an answer" if answered else ""
    print(f"{args.output}: n={n} predictions of {first.row} (tau={first.tau}, {first.n_samples} samples){acc}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from varlora.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)


def _cmd_experiment(args: argparse.Namespace) -> None:
    from varlora.experiment import run_experiment
    from varlora.study_status import study_status

    if args.status:
        print(study_status(args.preset, out=args.out, results=args.results, tasks=args.tasks, seeds=args.seeds,
                           variants=args.variants))
        return
    run_experiment(args.preset, out=args.out, results=args.results, tasks=args.tasks, seeds=args.seeds,
                   report_only=args.report_only, variants=args.variants)


def _cmd_tasks(args: argparse.Namespace) -> None:
    from varlora.tasks import get_task, list_tasks

    for name in list_tasks():
        print(f"{name:28} {get_task(name).num_choices} choices")


def _cmd_methods(args: argparse.Namespace) -> None:
    from varlora.methods import METHODS

    for name, cls in METHODS.items():
        kind = "post-hoc on " + cls.posthoc_of if cls.posthoc_of else ("trains" if cls.trains else "no training")
        print(f"{name:14} {kind:20} {(cls.__doc__ or '').strip().splitlines()[0]}")


@contextlib.contextmanager
def _shared_folder_defaults() -> Iterator[None]:
    """The command line, unlike the library, looks in the project's ``../shared`` (:func:`varlora.tasks.shared_dir`):
    inside the block ``$VARLORA_DATA_DIR`` defaults to ``../shared/data`` and ``$VARLORA_MODEL`` to the demo GGUF
    there, where those exist and the variables are unset."""
    from varlora.tasks import DATA_DIR_ENV, shared_dir

    defaults = {}
    if (shared := shared_dir()) is not None:
        model = Path("..", "shared", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")  # as the recipes name it
        if (shared / "data").is_dir():
            defaults[DATA_DIR_ENV] = str(shared / "data")
        if model.is_file():
            defaults[MODEL_ENV] = str(model)
    added = {k: v for k, v in defaults.items() if not os.environ.get(k)}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def main(argv: list[str] | None = None) -> int:
    with _shared_folder_defaults():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "demo": _cmd_demo,
               "experiment": _cmd_experiment, "tasks": _cmd_tasks, "methods": _cmd_methods}[args.command]
    if args.command in ("train", "experiment"):
        from varlora import distributed

        distributed.init()  # several processes under torchrun; nothing otherwise
    try:
        handler(args)
    # ConfigError, DataError, ModelLoadError and damaged-file errors are ValueErrors; SaveError (a full disk) and
    # FileNotFoundError are OSErrors; FloatingPointError is a diverged training loss. Each names what failed.
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"varlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
