"""The predictive API: load a finished run and predict on your own multiple-choice questions.

>>> import varlora
>>> model = varlora.load("runs/arc_easy-ivon")
>>> p = model.predict("Which gas do plants absorb?", choices=["oxygen", "carbon dioxide", "helium"])
>>> p.choice, p.confidence, p.entropy, p.mutual_information
>>> rows = model.predict("questions.jsonl", n_samples=20, tau=0.5)   # or a list of dicts / Examples

No task data is read: the run folder gives the config, the adapter and whatever the method saved (posterior,
temperature, ...); the base model comes from the run's config or from ``model=``. The examples are scored
with the run's prompt template and scoring protocol, and each gets the probabilities of the chosen
prediction row (averaged and per sample), the predicted choice and its probability, the predictive entropy
H(p̄) and the mutual information H(p̄) − (1/S) Σₛ H(pₛ) (0 for a deterministic row), in nats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from varlora.config import ConfigError, RunConfig
from varlora.metrics import mutual_information, predictive_entropy
from varlora.prediction import Prediction
from varlora.tasks import Example, PromptTemplate, Task
from varlora.tasks.formats import Where, parse_generic, read_jsonl
from varlora.tasks.registry import JSONL_PREFIX
from varlora.tasks.templates import TEMPLATES

__all__ = ["ExamplePrediction", "Predictor", "load", "read_examples", "write_jsonl"]

Inputs = str | os.PathLike[str] | Mapping[str, Any] | Example | Iterable[Mapping[str, Any] | Example]


@dataclass
class ExamplePrediction:
    """The prediction for one example (probabilities in choice order; entropies in nats).

    Attributes:
        id, question, choices: the example (ids made up as ``input-<n>`` when not given).
        answer: the true choice when the input gave one, else None.
        probs: (K,) the predictive p̄ = (1/S) Σₛ pₛ.
        sample_probs: (S, K) per-sample probabilities pₛ of a sampled row, else None.
        prediction: argmax p̄, the predicted choice's index; ``choice`` its text; ``confidence`` = max p̄.
        entropy: H(p̄). mutual_information: H(p̄) − (1/S) Σₛ H(pₛ) (0.0 without samples).
        row, method, tau, n_samples: the prediction row used (e.g. ``ivon`` at τ = 1 with 10 samples).
    """

    id: str
    question: str
    choices: list[str]
    answer: int | None
    probs: list[float]
    sample_probs: list[list[float]] | None
    prediction: int
    choice: str
    confidence: float
    entropy: float
    mutual_information: float
    row: str
    method: str
    tau: float | None
    n_samples: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (one line of ``varlora predict``'s output)."""
        return asdict(self)


@dataclass(frozen=True, eq=False, repr=False)
class _PromptTask(Task):
    """A task without data: the run's prompt template over ``num_choices`` choices, for given examples."""

    name: str
    template: PromptTemplate
    num_choices: int

    def source(self, split, data_dir=None) -> str:
        return f"{self.name}: examples given to Predictor.predict"

    def _load(self, split, data_dir):
        raise ValueError(f"{self.name} has no data on disk: pass the examples to Predictor.predict")


def _template_of(task_name: str) -> PromptTemplate:
    """The run task's prompt template, found without reading its data (bring-your-own data: multiple choice)."""
    if task_name.startswith(JSONL_PREFIX):
        return TEMPLATES["multiple_choice"]
    from varlora.tasks import get_task

    return get_task(task_name).template


def _parse(record: Mapping[str, Any], where: Where) -> tuple[Example, bool]:
    """A bring-your-own record (``answer`` optional, ``passage`` and ``id`` allowed) and whether it had an
    answer."""
    if not isinstance(record, Mapping):
        raise where.error(None, f"expected a mapping with question and choices, got {type(record).__name__}")
    has_answer = "answer" in record
    example = parse_generic(record if has_answer else {**record, "answer": 0}, where)
    passage = record.get("passage")
    if passage is not None and not isinstance(passage, str):
        raise where.error("passage", f"expected str, got {type(passage).__name__}")
    return replace(example, passage=passage), has_answer


def read_examples(inputs: Inputs, choices: Sequence[str] | None = None) -> tuple[list[Example], list[bool], bool]:
    """(examples, which had an answer, whether ``inputs`` was a single example) for :meth:`Predictor.predict`."""
    if choices is not None:
        if not isinstance(inputs, str):
            raise TypeError(f"choices= goes with a question string, got {type(inputs).__name__}")
        inputs = {"question": inputs, "choices": list(choices)}
    if isinstance(inputs, Example):
        return [inputs], [True], True
    if isinstance(inputs, Mapping):
        example, has_answer = _parse(inputs, Where("input", 1, "input"))
        return [example], [has_answer], True
    if isinstance(inputs, str | os.PathLike):
        path = Path(inputs).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file: give a JSONL file of examples, or a question with "
                                    "choices=[...]")
        parsed = [_parse(record, where) for where, record in read_jsonl(path, path.stem)]
    else:
        parsed = []
        for n, item in enumerate(inputs, start=1):
            parsed.append((item, True) if isinstance(item, Example) else _parse(item, Where("input", n, "input")))
    if not parsed:
        raise ValueError("no examples to predict on")
    return [e for e, _ in parsed], [a for _, a in parsed], False


class Predictor:
    """A finished run, ready to predict: made by :func:`load`.

    Attributes:
        config: the run's config (``model.name`` replaced when ``load`` got ``model=``).
        method: the restored :class:`varlora.methods.Method`.
        session: its :class:`varlora.session.Session` (model, LoRA parameters, tokenizer; no task data).
    """

    def __init__(self, session, method) -> None:
        self.session, self.method, self.config = session, method, session.config
        self.template = _template_of(self.config.data.task)

    def __repr__(self) -> str:
        return f"Predictor({str(self.session.paths.root)!r}, method={self.method.name!r})"

    def scorer(self, num_choices: int):
        """The run's scorer (protocol, max length, normalisation) for examples of up to ``num_choices``."""
        from varlora.session import scorer_for

        task = _PromptTask(f"{self.config.data.task} (prompts only)", self.template, num_choices)
        return scorer_for(self.config, self.session.tokenizer, task)

    def predict_rows(self, examples: Sequence[Example], *, n_samples: int | None = None, tau: float | None = None,
                     batch_size: int | None = None) -> list[Prediction]:
        """Every prediction row of the method on ``examples`` (:meth:`Method.predict`), with ``n_samples``,
        ``tau`` (the only τ evaluated) and ``batch_size`` overriding the run's ``eval`` section for this call."""
        if not examples:
            raise ValueError("no examples to predict on")
        overrides = {k: v for k, v in (("n_samples", n_samples), ("batch_size", batch_size)) if v is not None}
        if tau is not None:
            overrides["taus"] = [tau]
        saved = self.config.eval
        try:
            self.config.eval = replace(saved, **overrides)  # validated by EvalArgs.__post_init__
        except ConfigError as err:
            raise ValueError(str(err)) from err
        try:
            scorer = self.scorer(max(len(ex.choices) for ex in examples))
            return self.method.predict(list(examples), scorer)
        finally:
            self.config.eval = saved

    def predict(self, inputs: Inputs, choices: Sequence[str] | None = None, *, n_samples: int | None = None,
                tau: float | None = None, row: str | None = None, batch_size: int | None = None
                ) -> ExamplePrediction | list[ExamplePrediction]:
        """Predict on a question (``inputs`` a string, with ``choices``), one example (a dict in the
        bring-your-own format ``{"question", "choices", "answer"?, "id"?, "passage"?}`` or an
        :class:`~varlora.tasks.Example`), a list of them, or a JSONL file of them (a path).

        Args:
            n_samples: samples of a sampled predictive (default: the run's ``eval.n_samples``).
            tau: IVON's posterior variance scale τ ∈ [0, 1] (0: at the mean); picks that row.
            row: the prediction row by label (e.g. ``ivon@mean``, ``blob@mean``); default: the row with ``tau``
                if given, else the method's first sampled row, else its first row.
            batch_size: examples per forward (default: the run's ``eval.batch_size``).

        Returns:
            One :class:`ExamplePrediction` for a single question or example, else a list in input order.
        """
        examples, answered, single = read_examples(inputs, choices)
        rows = self.predict_rows(examples, n_samples=n_samples, tau=tau, batch_size=batch_size)
        chosen = _choose(rows, row, tau, self.method.name)
        out = _per_example(chosen, examples, answered)
        return out[0] if single else out


def _choose(rows: list[Prediction], label: str | None, tau: float | None, method: str) -> Prediction:
    if label is not None:
        found = [p for p in rows if p.label == label]
        if not found:
            raise ValueError(f"method {method!r} has no row {label!r}; its rows: {[p.label for p in rows]}")
        return found[0]
    if tau is not None:
        found = [p for p in rows if p.tau is not None and p.tau == float(tau)]
        if not found:
            raise ValueError(f"method {method!r} has no variance scale tau (its rows: {[p.label for p in rows]})")
        return found[0]
    return next((p for p in rows if p.sample_probs is not None), rows[0])


def _per_example(p: Prediction, examples: Sequence[Example], answered: Sequence[bool]) -> list[ExamplePrediction]:
    probs = p.probs.double()  # (N, K)
    entropy = predictive_entropy(probs)  # (N,)
    mi = mutual_information(p.sample_probs) if p.sample_probs is not None else torch.zeros(len(examples))
    out = []
    for i, ex in enumerate(examples):
        k = len(ex.choices)
        pi = probs[i, :k]
        best = int(pi.argmax())
        samples = None if p.sample_probs is None else p.sample_probs[:, i, :k].double().tolist()
        out.append(ExamplePrediction(
            id=ex.id, question=ex.question, choices=list(ex.choices), answer=ex.label if answered[i] else None,
            probs=pi.tolist(), sample_probs=samples, prediction=best, choice=ex.choices[best],
            confidence=float(pi[best]), entropy=float(entropy[i]), mutual_information=float(mi[i]),
            row=p.label, method=p.method, tau=p.tau, n_samples=p.n_samples))
    return out


def load(run_dir: str | os.PathLike[str], *, model: str | None = None, device: str | torch.device | None = None
         ) -> Predictor:
    """A finished run (``varlora train``'s folder) restored for prediction, reading no task data.

    Args:
        run_dir: the run folder (``config.json`` and ``final/``).
        model: the base model (a hub id, folder or GGUF file) instead of the run's ``model.name``, e.g. when
            the run was trained on another machine; it must be the model the adapter was trained on.
        device: where to put the model (default: as training does, the local accelerator or the CPU).
    """
    from varlora.methods import build_method
    from varlora.run_paths import RunPaths
    from varlora.session import setup

    paths = RunPaths(Path(run_dir))
    if not paths.config.exists():
        raise ConfigError(f"{paths.root} is not a run folder (no config.json)")
    config = RunConfig.load(paths.config)
    if model is not None:
        config.model = replace(config.model, name=str(model))
    if not paths.final.is_dir():
        raise FileNotFoundError(f"{paths.final} is missing: the run has not finished training")
    session = setup(config, paths.root, need_data=False)
    if device is not None:
        session.model.to(device)
    method = build_method(session)
    method.load(paths.final)
    session.model.eval()
    return Predictor(session, method)


def write_jsonl(predictions: Iterable[ExamplePrediction], path: str | os.PathLike[str]) -> int:
    """Write one JSON object per prediction; returns how many."""
    lines = [json.dumps(p.to_dict()) + "\n" for p in predictions]
    Path(path).write_text("".join(lines), encoding="utf-8")
    return len(lines)

