"""``IVONTrainer``: Hugging Face ``transformers.Trainer`` driving :class:`varlora.IVON`.

``Trainer`` runs one ``training_step`` (forward and backward) per micro-batch, clips the gradient, then calls
``optimizer.step()``; IVON needs each forward and backward inside a weight sample
(:meth:`~varlora.IVON.sampled_params`) and consumes the gradient when the sample ends, so plain ``Trainer`` would
compute every gradient at the mean and its clipping would act on nothing. :class:`IVONTrainer` overrides
``training_step`` only; checkpoints need nothing extra, since :meth:`IVON.state_dict` holds the whole optimizer
state (Hessian, momentum, step counts, noise generators) and ``Trainer`` saves it in ``optimizer.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from varlora.optim import IVON

__all__ = ["IVONTrainer", "unwrap_ivon"]


def unwrap_ivon(optimizer: object) -> IVON:
    """The :class:`IVON` inside ``optimizer`` (itself, or wrapped by accelerate's ``AcceleratedOptimizer``).

    ``TypeError`` naming the optimizer's type otherwise.
    """
    inner = optimizer
    while not isinstance(inner, IVON) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, IVON):
        raise TypeError(
            f"IVONTrainer needs an IVON optimizer, got {type(inner).__name__}: pass "
            "optimizers=(IVON(trainable_params, ...), None)"
        )
    return inner


@dataclass
class _Window:
    """The samples of one optimizer step, open across its micro-batches."""

    noises: list[list[Tensor]]  # per sample s: its ε_s, one tensor per sampled parameter
    grads: list[list[Tensor | None]]  # per sample s: the gradient accumulated at θ_s so far, per parameter


class IVONTrainer(Trainer):
    r"""``transformers.Trainer`` whose optimizer is :class:`varlora.IVON`.

    Pass the optimizer built on the trainable parameters: ``IVONTrainer(model, args, ...,
    optimizers=(IVON(params, lr=..., ess=...), None))`` (the learning-rate schedule of ``args`` applies to
    IVON's ``lr``; ``args.learning_rate`` and ``args.weight_decay`` are not used, IVON's ``weight_decay`` is
    its prior precision :math:`\delta`). Everything else is ``Trainer``'s.

    **One optimizer step.** ``Trainer`` groups ``args.gradient_accumulation_steps`` micro-batches per step and
    scales each micro-batch loss so that the accumulated gradient is that of the step's mean loss. At the first
    micro-batch IVON draws ``mc_samples`` noises :math:`\epsilon_1..\epsilon_S` (:meth:`IVON.draw_noise`);
    every micro-batch is then run forward and backward once at each sample
    :math:`\theta_s = m + \sigma\odot\epsilon_s` (``S`` passes per micro-batch), and the gradient of each sample
    is accumulated separately over the micro-batches. So :math:`g_s` is the gradient of the whole step's loss at
    one :math:`\theta_s`, exactly as in IVON's own loop with the step's examples in one batch (up to float
    summation order). After the last micro-batch, each :math:`g_s` is clipped to ``args.max_grad_norm`` (norm
    over all sampled parameters, when > 0) and consumed, and ``Trainer`` calls ``optimizer.step()``. The returned
    (logged) loss is the mean over the samples. Memory: ``S`` gradient and noise buffers of the trainable
    parameters; time: ``S`` forward and backward passes per micro-batch, as in IVON's own loop.

    **Gradient clipping.** ``Trainer`` clips after the micro-batches, when the gradients have been consumed: its
    own clipping finds none. ``args.max_grad_norm`` is applied here instead, inside each sample, and the logged
    ``grad_norm`` is IVON's mean pre-clip norm over the step's samples (absent without clipping). The logs also
    get ``ivon_clip_fraction``, ``ivon_sigma_mean`` and ``ivon_hess_mean`` (:attr:`IVON.last_step_stats`).

    **Checkpoints.** ``Trainer`` checkpoints at step boundaries, where no sample is open, and saves
    ``optimizer.state_dict()``; IVON's includes its step count and noise generators, so
    ``train(resume_from_checkpoint=...)`` continues as the uninterrupted run does.

    Not supported: fp16 mixed precision with a gradient scaler (``ValueError``: the gradients would be consumed
    scaled; use bf16 or fp32). Several processes are untested here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(
                "IVONTrainer does not support fp16 mixed precision (a GradScaler): IVON would consume scaled "
                "gradients; use bf16=True or full precision"
            )
        self._window: _Window | None = None  # the open step's samples, between its first and last micro-batch

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """``Trainer.create_optimizer``, checked to be (or wrap) an :class:`IVON` (``TypeError`` otherwise)."""
        optimizer = super().create_optimizer(model)
        unwrap_ivon(optimizer)
        return optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Tensor | Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Forward and backward of one micro-batch at each of the step's samples; after the step's last
        micro-batch, clip and consume each sample's gradient."""
        ivon = unwrap_ivon(self.optimizer)
        params = [p for group in ivon.param_groups for p in group["params"] if p.requires_grad]
        if self._window is None:
            noises = [ivon.draw_noise() for _ in range(ivon.mc_samples)]
            self._window = _Window(noises, [[None] * len(params) for _ in noises])
        window = self._window
        try:
            losses = []
            for s, noise in enumerate(window.noises):
                for p, grad in zip(params, window.grads[s], strict=True):
                    p.grad = grad
                with ivon.sampled_params(noise=noise):  # θ_s; gradients accumulate, nothing is consumed yet
                    losses.append(super().training_step(model, inputs, num_items_in_batch))
                window.grads[s] = [p.grad for p in params]
            for p in params:
                p.grad = None
            if self.accelerator.sync_gradients:  # the step's last micro-batch: optimizer.step() comes next
                self._window = None
                self._consume(ivon, params, window)
        except BaseException:
            self._window = None
            for p in params:
                p.grad = None
            raise
        return torch.stack(losses).mean()

    def _consume(self, ivon: IVON, params: list[Tensor], window: _Window) -> None:
        """Clip and consume the gradient of each sample of the step (one training context each)."""
        max_norm = self.args.max_grad_norm
        clip = float(max_norm) if max_norm is not None and max_norm > 0 else None
        for noise, grads in zip(window.noises, window.grads, strict=True):
            with ivon.sampled_params(train=True, noise=noise, max_grad_norm=clip):
                for p, grad in zip(params, grads, strict=True):
                    p.grad = grad

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log`` with IVON's diagnostics on training rows (those of the last step that computed them,
        see ``IVON(stats_every=...)``); ``grad_norm`` is IVON's pre-clip norm."""
        if "loss" in logs:
            stats = unwrap_ivon(self.optimizer).last_step_stats
            logs = dict(logs)
            logs.pop("grad_norm", None)  # Trainer's, measured after the gradients were consumed: 0
            if stats.get("grad_norm") is not None:
                logs["grad_norm"] = stats["grad_norm"]
            for key in ("clip_fraction", "sigma_mean", "hess_mean"):
                if stats.get(key) is not None:
                    logs[f"ivon_{key}"] = stats[key]
        super().log(logs, start_time)
