"""Scores of the K choices of multiple-choice examples under a causal LM, trainable with cross-entropy.

A scorer turns examples into a batch (``collate``) and a batch into choice logits s of shape (B, K)
(``choice_logits``); p(choice k) = softmax(s)_k and the training loss is CE(s, y). Two protocols:

- letter: s_k = z[a_k], z the LM logits at the last prompt position and a_k the token id of answer k as the
  tokenizer encodes it right after the prompt (it must be exactly one token).
- cloze: s_k = (1 / n_k)^[normalize] * sum_{t=1..n_k} log p(c_{k,t} | x_k, c_{k,<t}), with c_k the n_k tokens
  of the continuation of choice k after its context x_k; ``length_normalize`` makes it the mean per token.

Batches are left-padded with explicit ``position_ids`` (cumulative sum of the attention mask), so a padded
row scores exactly as the same example alone. When the K choices share their context (ARC, OBQA, MMLU,
BoolQ), the cloze scorer runs each context once with a KV cache, repeats the cache K times and runs all
continuations in a second forward; gradients flow through both. Otherwise (WinoGrande partial evaluation)
each (context, continuation) pair is one sequence. Full-vocabulary logits are only computed at the
positions that predict a scored token (``logits_to_keep``).

Too-long inputs: a reading passage is shortened from its end first (the question and the answer cue stay);
whatever is still too long is cut from the left of the prompt / context, after the BOS token if the
tokenizer adds one. The answer cue and the continuations are never cut.

A run tokenises each split once, before training (:meth:`Scorer.prepare`): every example is encoded and
checked, the rows that cannot be scored (a continuation that encodes to no tokens or leaves no room for its
context, an answer that is not one token) are all reported together with their file and line
(:class:`UnscorableDataError`), and the :class:`TruncationReport` says how many examples lost tokens to
``max_length`` and how many. ``collate`` then reads the prepared encodings; other examples are encoded when
they are collated, identically.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from varlora.sharding import is_sharded
from varlora.tasks import Example, Task

__all__ = ["AnswerTokenError", "ClozeScorer", "LetterScorer", "Mode", "Scorer", "TruncationReport",
           "UnscorableDataError", "UnscorableError", "make_scorer"]

Mode = Literal["letter", "cloze"]
_SHORTEN_TRIES = 3  # re-tokenising a shortened passage can shift a token at its edges: retry, then cut
_LISTED = 20  # rows an UnscorableDataError spells out; the rest are counted


class UnscorableError(ValueError):
    """An example the scorer cannot score. The message names the row's file and line (its id where the example
    was not read from a file) and the reason."""

    def __init__(self, example: Example, reason: str, field: str | None = None) -> None:
        self.example, self.reason, self.field = example, reason, field
        where = f"example {example.id!r}" if example.source is None else \
            f"{example.source}, line {example.line} (example {example.id!r})"
        super().__init__(where + (f", field {field!r}" if field else "") + f": {reason}")


class AnswerTokenError(UnscorableError):
    """An answer string does not encode to exactly one token after its prompt."""


class UnscorableDataError(ValueError):
    """Every row of a split that cannot be scored (``errors``, the first ones listed in the message), found
    before training starts rather than at the step that first draws one."""

    def __init__(self, split: str, errors: list[UnscorableError], n_examples: int, protocol: str) -> None:
        self.split, self.errors = split, errors
        listed = "".join(f"\n  {err}" for err in errors[:_LISTED])
        more = f"\n  ... and {len(errors) - _LISTED} more" if len(errors) > _LISTED else ""
        super().__init__(f"{len(errors)} of the {n_examples} rows of {split} cannot be scored ({protocol}); fix "
                         f"or remove them:{listed}{more}")


@dataclass(frozen=True)
class TruncationReport:
    """How many examples of a split were cut to fit ``max_length``, and by how much.

    ``tokens_cut`` holds, per truncated example in split order, the number of tokens its prompt (cloze: its
    longest-cut context) lost: the length of the full encoding less the length the model reads.
    """

    split: str
    n_examples: int
    max_length: int
    tokens_cut: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """The record kept in a run's summary.json."""
        cut = self.tokens_cut
        return {"examples": self.n_examples, "max_length": self.max_length, "truncated": len(cut),
                "tokens_cut": {"total": sum(cut), "mean": statistics.fmean(cut) if cut else 0.0,
                               "median": statistics.median(cut) if cut else 0, "max": max(cut, default=0)}}

    def describe(self) -> str:
        """One line for the run's log."""
        cut = self.tokens_cut
        if not cut:
            return f"{self.split}: {self.n_examples} examples, none truncated (max_length {self.max_length})"
        return (f"{self.split}: {len(cut)} of {self.n_examples} examples truncated to max_length {self.max_length}, "
                f"by {statistics.fmean(cut):.1f} tokens on average (median {statistics.median(cut):g}, "
                f"max {max(cut)}, total {sum(cut)})")


def _clip(text: str, n: int = 40) -> str:
    """``repr(text)``, its middle elided past ``n`` characters (error messages quote a row's text)."""
    return repr(text) if len(text) <= n else f"{text[: n // 2]!r}...{text[-n // 2 :]!r}"


def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding: 0, 1, ... from each row's first real token. (B, T)"""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    """Pad token lists to one width; returns (ids, attention mask), both (len(rows), width) int64."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _to_model_device(model: torch.nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, by transformers' current name for it
    (``is_activation_checkpointing``; the old ``is_gradient_checkpointing`` warns on every read)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Scorer(ABC):
    """Common part of both protocols: tokenisation, truncation of passages, labels.

    ``tokenizer`` is a Hugging Face tokenizer (its padding side does not matter; pad id: ``pad_token_id``,
    else ``eos_token_id``, else 0). ``max_length`` bounds every model input, in tokens.
    """

    mode: ClassVar[Mode]

    def __init__(self, tokenizer: Any, task: Task, max_length: int = 512) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self._prepared: dict[Example, tuple[Any, int]] = {}  # example -> (encoding, tokens cut), by prepare()
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        self.prefix: list[int] = full[: starts[0]] if starts else []  # BOS (and the like) the tokenizer adds
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.pad_id: int = pad

    @property
    def num_choices(self) -> int:
        """K, the width of the choice logits: the task's largest number of choices."""
        return self.task.num_choices

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def prepare(self, examples: Sequence[Example], split: str) -> TruncationReport:
        """Tokenise ``examples`` once for the run and check that every one can be scored.

        The encodings are kept: :meth:`encode` and :meth:`collate` read them instead of tokenising again.
        Raises :class:`UnscorableDataError` listing every row that cannot be scored (``split`` names the rows'
        set in its message); returns the split's :class:`TruncationReport`.
        """
        errors, cuts = [], []
        for ex in examples:
            if ex not in self._prepared:
                try:
                    self._check_choice_count(ex)
                    self._prepared[ex] = self._fit(ex)
                except UnscorableError as err:
                    errors.append(err)
                    continue
            cuts.append(self._prepared[ex][1])
        if errors:
            raise UnscorableDataError(split, errors, len(examples), f"{self.mode} scoring, max_length "
                                      f"{self.max_length}")
        return TruncationReport(split, len(examples), self.max_length, tuple(c for c in cuts if c))

    def encode(self, example: Example) -> Any:
        """The tokens of ``example`` fitted to ``max_length`` (letter: (prompt ids, one answer id per choice);
        cloze: [(context ids, continuation ids)] per choice): the ones :meth:`prepare` made, else encoded now."""
        prepared = self._prepared.get(example)
        return prepared[0] if prepared is not None else self._fit(example)[0]

    @abstractmethod
    def _fit(self, example: Example) -> tuple[Any, int]:
        """(:meth:`encode`'s value, the number of tokens truncation cut from it); raises
        :class:`UnscorableError` for an example that cannot be scored."""

    def _shorten_passage(self, example: Example, n_tokens: int) -> Example:
        """The example with ``n_tokens`` fewer tokens at the end of its passage."""
        ids = self._encode([example.passage or ""])[0]
        return replace(example, passage=self.tokenizer.decode(ids[: max(len(ids) - n_tokens, 0)]))

    def _check_choices(self, examples: list[Example]) -> None:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        for ex in examples:
            self._check_choice_count(ex)

    def _check_choice_count(self, example: Example) -> None:
        if len(example.choices) > self.num_choices:
            raise UnscorableError(example, f"{len(example.choices)} choices, more than {self.task.name}'s "
                                  f"num_choices = {self.num_choices}", "choices")

    @staticmethod
    def _labels(examples: list[Example]) -> Tensor:
        return torch.tensor([ex.label for ex in examples], dtype=torch.long)

    @abstractmethod
    def collate(self, examples: list[Example]) -> dict[str, Tensor]:
        """Tokenised, padded batch of ``examples``; always holds ``labels`` (B,)."""

    @abstractmethod
    def choice_logits(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Differentiable scores (B, K) on the model's device (the batch is moved there), float32 (float64
        for a float64 model); -inf for missing choices."""


class LetterScorer(Scorer):
    """The published letter protocol. Batch: ``input_ids``/``attention_mask`` (B, T) left-padded,
    ``answer_ids`` (B, K) (-1 for missing choices), ``labels`` (B,)."""

    mode = "letter"

    def _fit(self, example: Example) -> tuple[tuple[list[int], list[int]], int]:
        """(prompt token ids, one answer token id per choice), fitted to ``max_length``; tokens cut."""
        budget = self.max_length - len(self.prefix)
        prompt, answers = self.task.letter_prompt(example)
        ids = self._encode([prompt])[0]
        full = len(ids)
        for _ in range(_SHORTEN_TRIES):
            if len(ids) <= budget or not example.passage:
                break
            example = self._shorten_passage(example, len(ids) - budget)
            prompt, answers = self.task.letter_prompt(example)
            ids = self._encode([prompt])[0]
        kept = ids[-budget:]
        return (self.prefix + kept, self._answer_ids(example, prompt, ids, answers)), full - len(kept)

    def _answer_ids(self, example: Example, prompt: str, prompt_ids: list[int],
                    answers: tuple[str, ...]) -> list[int]:
        """The one token each answer adds when appended to the prompt: encode(prompt + answer)[-1]."""
        out = []
        for answer, ids in zip(answers, self._encode([prompt + a for a in answers]), strict=True):
            if ids[: len(prompt_ids)] != prompt_ids or len(ids) != len(prompt_ids) + 1:
                extra = self.tokenizer.convert_ids_to_tokens(ids[len(prompt_ids) - 1 :])
                raise AnswerTokenError(
                    example,
                    f"answer {answer!r} is not exactly one token after the prompt (...{prompt[-20:]!r}): the "
                    f"prompt's last token and the answer encode to {extra}. The letter protocol needs "
                    "single-token answers; use the cloze protocol with this tokenizer."
                )
            out.append(ids[-1])
        return out

    def collate(self, examples: list[Example]) -> dict[str, Tensor]:
        self._check_choices(examples)
        encoded = [self.encode(ex) for ex in examples]
        input_ids, attention_mask = _pad([ids for ids, _ in encoded], self.pad_id, left=True)
        answer_ids = torch.full((len(examples), self.num_choices), -1, dtype=torch.long)
        for i, (_, answers) in enumerate(encoded):
            answer_ids[i, : len(answers)] = torch.tensor(answers)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "answer_ids": answer_ids,
            "labels": self._labels(examples),
        }

    def choice_logits(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        batch = _to_model_device(model, batch)
        mask = batch["attention_mask"]
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=False,
            logits_to_keep=1,
        )
        z = _at_least_fp32(out.logits[:, -1])  # (B, V)
        answers = batch["answer_ids"]  # (B, K)
        return z.gather(1, answers.clamp_min(0)).masked_fill(answers < 0, float("-inf"))


class ClozeScorer(Scorer):
    """Log-likelihood of each choice's continuation.

    Batch: ``context_ids``/``context_mask`` (R, Lc) left-padded, with R = B when every example's choices
    share one context (shared-prefix path) and R = B*K otherwise (one sequence per pair);
    ``continuation_ids``/``continuation_mask`` (B*K, Tc) right-padded, row b*K + k for choice k of example b;
    ``choice_mask`` (B, K) bool; ``labels`` (B,). ``share_prefix=False`` always builds per-pair batches.
    """

    mode = "cloze"

    def __init__(
        self,
        tokenizer: Any,
        task: Task,
        max_length: int = 512,
        length_normalize: bool = True,
        share_prefix: bool = True,
    ) -> None:
        super().__init__(tokenizer, task, max_length)
        self.length_normalize, self.share_prefix = length_normalize, share_prefix

    def _fit(self, example: Example) -> tuple[list[tuple[list[int], list[int]]], int]:
        """(context ids, continuation ids) per choice, contexts fitted to ``max_length`` minus the longest
        continuation; tokens cut.

        A continuation is split off the joint encoding of context + continuation when that starts with the
        context's encoding (as lm-eval-harness does; it keeps SentencePiece spaces right), else encoded alone.
        """
        pairs = self._encode_pairs(self.task.cloze_pairs(example), example)
        full = [len(ctx) for ctx, _ in pairs]
        for _ in range(_SHORTEN_TRIES):
            excess = max(len(ctx) for ctx, _ in pairs) - self._context_budget(pairs, example)
            if excess <= 0 or not example.passage:
                break
            example = self._shorten_passage(example, excess)
            pairs = self._encode_pairs(self.task.cloze_pairs(example), example)
        budget = self._context_budget(pairs, example)
        cut = max(n - len(ctx[-budget:]) for n, (ctx, _) in zip(full, pairs, strict=True))
        return [(self.prefix + ctx[-budget:], cont) for ctx, cont in pairs], cut

    def _context_budget(self, pairs: list[tuple[list[int], list[int]]], example: Example) -> int:
        k = max(range(len(pairs)), key=lambda i: len(pairs[i][1]))
        longest = len(pairs[k][1])
        budget = self.max_length - len(self.prefix) - longest
        if budget < 1:
            raise UnscorableError(
                example,
                f"the continuation of choice {k} ({_clip(self.tokenizer.decode(pairs[k][1]))}) is {longest} tokens "
                f"long and leaves no room for its context within max_length = {self.max_length}",
            )
        return budget

    def _encode_pairs(
        self, pairs: list[tuple[str, str]], example: Example
    ) -> list[tuple[list[int], list[int]]]:
        contexts = list(dict.fromkeys(ctx for ctx, _ in pairs))
        context_ids = dict(zip(contexts, self._encode(contexts), strict=True))
        joint = self._encode([ctx + cont for ctx, cont in pairs])
        out = []
        for (ctx, cont), whole in zip(pairs, joint, strict=True):
            ids = context_ids[ctx]
            if whole[: len(ids)] == ids and len(whole) > len(ids):
                cont_ids = whole[len(ids) :]
            else:
                cont_ids = self._encode([cont])[0]
            if not cont_ids:
                raise UnscorableError(example, f"the continuation of choice {len(out)} ({_clip(cont)}) encodes to "
                                      "no tokens, so it has no likelihood to score")
            out.append((ids, cont_ids))
        return out

    def collate(self, examples: list[Example]) -> dict[str, Tensor]:
        self._check_choices(examples)
        K = self.num_choices
        encoded = [self.encode(ex) for ex in examples]
        shared = self.share_prefix and K > 1 and all(all(c == p[0][0] for c, _ in p) for p in encoded)
        contexts, continuations = [], []
        for pairs in encoded:
            padded = pairs + [(pairs[0][0], [])] * (K - len(pairs))  # missing choices: empty, masked out
            contexts += [pairs[0][0]] if shared else [ctx for ctx, _ in padded]
            continuations += [cont for _, cont in padded]
        context_ids, context_mask = _pad(contexts, self.pad_id, left=True)
        continuation_ids, continuation_mask = _pad(continuations, self.pad_id, left=False)
        choice_mask = torch.tensor([[k < len(p) for k in range(K)] for p in encoded])
        return {
            "context_ids": context_ids,
            "context_mask": context_mask,
            "continuation_ids": continuation_ids,
            "continuation_mask": continuation_mask,
            "choice_mask": choice_mask,
            "labels": self._labels(examples),
        }

    def choice_logits(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        batch = _to_model_device(model, batch)
        ctx, ctx_mask = batch["context_ids"], batch["context_mask"]
        cont, cont_mask = batch["continuation_ids"], batch["continuation_mask"]
        choice_mask = batch["choice_mask"]
        B, K = choice_mask.shape
        if ctx.shape[0] != B * K and model.training and _checkpointing(model):
            # checkpointed models run without a KV cache: expand to one sequence per pair
            ctx, ctx_mask = ctx.repeat_interleave(K, 0), ctx_mask.repeat_interleave(K, 0)
        if ctx.shape[0] != B * K and cont.shape[1] == 1 and is_sharded(model):
            # FSDP2: the continuations' forward all-gathers, so every rank runs it, also when its batch's
            # continuations are one token each: a padding column, masked and not scored, leaves the scores as they are
            cont, cont_mask = F.pad(cont, (0, 1)), F.pad(cont_mask, (0, 1))
        if ctx.shape[0] == B * K:
            logits = self._pair_logits(model, ctx, ctx_mask, cont, cont_mask)
        else:
            logits = self._shared_logits(model, ctx, ctx_mask, cont, cont_mask, K)
        # logits[:, t] predicts cont[:, t]; cross-entropy is -log p, pads ignored  (B*K, Tc)
        target = cont.masked_fill(cont_mask == 0, -100)
        nll = F.cross_entropy(_at_least_fp32(logits).flatten(0, 1), target.flatten(), reduction="none")
        logp = -nll.view(cont.shape)
        score = logp.sum(-1)
        if self.length_normalize:
            score = score / cont_mask.sum(-1).clamp_min(1)
        return score.view(B, K).masked_fill(~choice_mask, float("-inf"))

    @staticmethod
    def _pair_logits(
        model: torch.nn.Module, ctx: Tensor, ctx_mask: Tensor, cont: Tensor, cont_mask: Tensor
    ) -> Tensor:
        """One sequence per pair: [left-padded context | continuation without its last token]. (B*K, Tc, V)"""
        Tc = cont.shape[1]
        ids = torch.cat([ctx, cont[:, :-1]], 1)
        mask = torch.cat([ctx_mask, cont_mask[:, :-1]], 1)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=False,
            logits_to_keep=Tc,
        )
        return out.logits

    @staticmethod
    def _shared_logits(
        model: torch.nn.Module, ctx: Tensor, ctx_mask: Tensor, cont: Tensor, cont_mask: Tensor, K: int
    ) -> Tensor:
        """Contexts once (B rows), KV cache repeated K times, continuations (B*K rows). (B*K, Tc, V)"""
        Tc = cont.shape[1]
        out = model(
            input_ids=ctx,
            attention_mask=ctx_mask,
            position_ids=_positions(ctx_mask),
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits.repeat_interleave(K, 0)  # predicts each continuation's first token  (B*K, 1, V)
        if Tc == 1:
            return first
        cache = getattr(out, "cache", None)
        if cache is None:
            raise RuntimeError(
                f"{type(model).__name__} returned no KV cache (transformers >= 5.24 needed for `cache=`); "
                "use share_prefix=False"
            )
        cache.batch_repeat_interleave(K)
        mask = torch.cat([ctx_mask.repeat_interleave(K, 0), cont_mask[:, :-1]], 1)  # (B*K, Lc + Tc - 1)
        start = ctx_mask.sum(-1).repeat_interleave(K)  # first position of each continuation  (B*K,)
        positions = start[:, None] + torch.arange(Tc - 1, device=start.device)
        rest = model(
            input_ids=cont[:, :-1],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=0,
        )
        return torch.cat([first, rest.logits], 1)


def make_scorer(
    mode: Mode,
    tokenizer: Any,
    task: Task,
    max_length: int = 512,
    length_normalize: bool = True,
    share_prefix: bool = True,
) -> Scorer:
    """A :class:`LetterScorer` or :class:`ClozeScorer`; ``length_normalize``, ``share_prefix``: cloze only."""
    if mode == "letter":
        return LetterScorer(tokenizer, task, max_length)
    if mode == "cloze":
        return ClozeScorer(tokenizer, task, max_length, length_normalize, share_prefix)
    raise ValueError(f"mode must be 'letter' or 'cloze', got {mode!r}")
