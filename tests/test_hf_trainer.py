"""IVONTrainer: IVON under transformers.Trainer, against IVON's own loop, and killed and resumed from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback, TrainingArguments

from conftest import TINY_VOCAB, assert_identical, tiny_llama
from varlora import IVON
from varlora.integrations import IVONTrainer

IVON_OPTIONS = dict(lr=0.05, ess=1e3, hess_init=0.1, beta2=0.99, clip_radius=0.1, weight_decay=1e-3,
                    stats_every=1)  # statistics on every step: the tests read them
N_EXAMPLES, LENGTH = 16, 12


def _model(dropout: float):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(7)
    return get_peft_model(tiny_llama(seed=3), config)


def _dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, TINY_VOCAB, (N_EXAMPLES, LENGTH), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def _args(out, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=5, dataloader_num_workers=0, disable_tqdm=True,
    )
    return TrainingArguments(**(options | overrides))


def _trainer(out, dropout: float = 0.1, mc_samples: int = 1, cls=IVONTrainer, **overrides) -> IVONTrainer:
    model = _model(dropout)
    optimizer = IVON([p for p in model.parameters() if p.requires_grad], mc_samples=mc_samples, **IVON_OPTIONS)
    return cls(model=model, args=_args(out, **overrides), train_dataset=_dataset(), optimizers=(optimizer, None))


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


class _Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


class _KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Killed


@pytest.mark.parametrize("mc_samples", [1, 2])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, mc_samples):
    """LoRA dropout on, 2 micro-batches per step, clipping on: a run killed after its step-3 checkpoint and
    resumed by a fresh Trainer ends bit for bit where the uninterrupted run does, optimizer state included."""
    whole = _trainer(tmp_path / "whole", mc_samples=mc_samples)
    whole.train()

    killed = _trainer(tmp_path / "killed", mc_samples=mc_samples, save_strategy="steps", save_steps=3)
    killed.add_callback(_KillAfterSave(3))
    with pytest.raises(_Killed):
        killed.train()
    resumed = _trainer(tmp_path / "killed", mc_samples=mc_samples, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-3"))

    assert resumed.state.global_step == whole.state.global_step == 6
    assert_identical(_lora(resumed), _lora(whole))
    assert_identical(resumed.optimizer.state_dict(), whole.optimizer.state_dict())
    assert whole.optimizer.state_dict()["ivon"]["num_steps"] == 6
    # and training moved the weights
    assert not all(torch.equal(a, b) for a, b in zip(_lora(whole).values(), _lora(_trainer(tmp_path / "x")).values(),
                                                      strict=True))


class _InOrder(IVONTrainer):
    """Batches in dataset order, so that a hand-written loop can see the same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


@pytest.mark.parametrize("mc_samples", [1, 3])
def test_equals_ivons_own_loop(tmp_path, mc_samples):
    """2 micro-batches of 2 per step and S samples: each g_s is the gradient of the step's 4 examples at one θ_s,
    clipped to max_grad_norm inside the sample: IVON's own loop with the 4 examples in one batch."""
    max_grad_norm = 0.05
    trainer = _trainer(tmp_path, dropout=0.0, mc_samples=mc_samples, cls=_InOrder, max_grad_norm=max_grad_norm,
                       max_steps=4)
    trainer.train()

    model = _model(0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    ivon = IVON(params, mc_samples=mc_samples, **IVON_OPTIONS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ivon, lambda step: max(0.0, (4 - step) / 4))
    torch.manual_seed(5)
    data = _dataset()
    model.train()
    for step in range(4):
        batch = {k: torch.stack([ex[k] for ex in data[4 * step: 4 * step + 4]]) for k in data[0]}
        for noise in [ivon.draw_noise() for _ in range(mc_samples)]:
            with ivon.sampled_params(train=True, noise=noise, max_grad_norm=max_grad_norm):
                model(**batch).loss.backward()
        ivon.step()
        scheduler.step()
        assert ivon.last_step_stats["grad_norm"] > max_grad_norm  # the clipping acts

    got = _lora(trainer)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.detach(), rtol=1e-4, atol=1e-6)
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 4
    assert all(row["grad_norm"] > max_grad_norm and 0.0 <= row["ivon_clip_fraction"] <= 1.0 for row in rows)


def test_rejects_another_optimizer(tmp_path):
    model = _model(0.0)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    trainer = IVONTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), optimizers=(adamw, None))
    with pytest.raises(TypeError, match="IVONTrainer needs an IVON optimizer, got AdamW"):
        trainer.train()
