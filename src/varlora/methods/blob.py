"""``blob``: Bayesian Low-Rank Adaptation by Backpropagation (BLoB, Wang et al., NeurIPS 2024).

Posterior: on every LoRA layer, A ~ N(M, σ²) element-wise with σ = ρ² (M is the LoRA A weight, ρ a trainable
tensor shaped like it, initialised ρ ~ U(ε/√2, ε)); B is deterministic. Prior: N(0, β²). The forward pass
samples A by flipout (:mod:`varlora.methods._flipout`: one ΔA = σ ⊙ ε per forward, per-token Rademacher signs),
as a forward hook on peft's ``lora_A`` linears, so any peft LoRA model works and its adapter files are unchanged.

Training step i, as the reference code (Wang-ML-Lab/bayesian-peft, ``modelwrappers/blob.py``) does it:

1. NLL phase, exactly a MAP step (:func:`varlora.methods.adamw.adamw_step`): the batch-mean cross-entropy with
   one flipout sample, backward, clip the A/B gradients to ``train.max_grad_norm``, AdamW(``blob.lr``) step on
   A and B. ρ is not in this optimizer; its NLL gradient is kept for phase 2.
2. KL phase: the A gradients are cleared; π_i · KL(q ‖ p) is back-propagated (closed form, summed over every
   A, :func:`~varlora.methods._flipout.gaussian_kl`); SGD(``blob.kl_lr``) steps A (on π ∇KL) and ρ (on
   ∇NLL + π ∇KL). π_i is :func:`~varlora.methods._blob_math.kl_weight` (Blundell weights cycling with the
   step over a period M, or uniform 1/M).

Both learning rates follow the run's linear schedule (warm-up, then decay to 0). The reference's separate
optimizer for the KL means A feels the prior only through SGD, never through AdamW's normalisation.
With ρ = 0 the flipout term is exactly zero and the KL's gradient does not reach ρ, so with the KL step off
(``kl_lr`` 0, or π underflowing to 0) a BLoB step *is* an AdamW step.

Noise: training draws from the method's own ``torch.Generator`` (saved in checkpoints, so a resumed run draws
the same noise, and dropout masks are those an AdamW run would draw); prediction from a generator seeded with
``eval.seed``, so re-evaluating a saved run reproduces its metrics.

Prediction, two rows: ``blob`` averages the probabilities of ``eval.n_samples`` sampled forwards (N = 10 in
the paper); ``blob@mean`` is one forward at A = M (the paper's "N = 0", ``n_samples = 0``).
Files: ``final/blob.safetensors`` holds ρ by LoRA module name (ε and β in its metadata), beside the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from varlora import _io
from varlora.config import check, option
from varlora.evaluate import deterministic_prediction, sampled_prediction
from varlora.methods._blob_math import KLWeighting, kl_period, kl_weight
from varlora.methods._flipout import BlobPosterior
from varlora.methods.adamw import AdamWArgs, adamw_step, build_adamw
from varlora.methods.base import Method, Prediction, StepResult, register
from varlora.methods.training import linear_scheduler, optimizer_state_bytes, restore, snapshot, tensor_bytes

__all__ = ["BLoBArgs", "BLoB", "BLOB_FILE"]

BLOB_FILE = "blob.safetensors"
# Offsets that keep BLoB's streams apart from the global RNG, which is seeded with train.seed itself.
_RHO_SEED_OFFSET = 0xB10B
_NOISE_SEED_OFFSET = 0xB10C


@dataclass
class BLoBArgs:
    """BLoB (Wang et al. 2024): mean-field Gaussian on LoRA A (σ = ρ²), flipout, KL to N(0, β²).

    The paper's values (Llama-2-7B, 5000 steps): lr 1e-4, kl_lr 0.01, init_eps 0.05, prior_std 0.2, Blundell
    weights with dataset rescaling, γ 8. The default lr is the CPU AdamW preset's, for 100-step runs.
    """

    lr: float = option("AdamW learning rate of the means (LoRA A and B) on the NLL", default=1e-3)
    weight_decay: float = option("AdamW decoupled weight decay of the means", default=0.0)
    kl_lr: float = option("SGD learning rate of the KL step (on A and rho); 0 turns it off", default=0.01)
    init_eps: float = option("rho ~ U(eps/sqrt(2), eps) at init, sigma = rho^2", default=0.05)
    prior_std: float = option("prior std beta: p(A) = N(0, beta^2)", default=0.2)
    kl_weighting: KLWeighting = option("KL weight pi_i: 'blundell' (2^i/(2^(M+1)-1), cycling) or 'uniform' (1/M)",
                                       default="blundell")
    kl_period: int = option("period M of the KL weights in steps; 0: from the data (batches per epoch, or "
                            "dataset rescaling)", default=0)
    dataset_rescaling: bool = option("with kl_period 0: M = floor(100 N^(pi/gamma) / batch) as the reference "
                                     "code, instead of batches per epoch", default=True)
    gamma: float = option("gamma of the dataset rescaling", default=8.0)

    def __post_init__(self) -> None:
        check(self.lr > 0, "blob.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "blob.weight_decay", self.weight_decay, "must be >= 0")
        check(self.kl_lr >= 0, "blob.kl_lr", self.kl_lr, "must be >= 0")
        check(self.init_eps > 0, "blob.init_eps", self.init_eps, "must be > 0")
        check(self.prior_std > 0, "blob.prior_std", self.prior_std, "must be > 0")
        check(self.kl_weighting in ("blundell", "uniform"), "blob.kl_weighting", self.kl_weighting,
              "must be 'blundell' or 'uniform'")
        check(self.kl_period >= 0, "blob.kl_period", self.kl_period, "must be >= 0 (0: from the data)")
        check(self.gamma > 0, "blob.gamma", self.gamma, "must be > 0")


@register
class BLoB(Method):
    """BLoB: AdamW on the NLL for the LoRA means, SGD on π·KL for A and ρ; sampled and mean predictions."""

    name = "blob"
    label = "blob"
    color = "C4"
    args_class = BLoBArgs
    trains = True
    supports_distributed = False
    checkpointing_conflict = ("its flipout hooks draw the noise of lora_A from their own generator in the forward "
                              "pass, and a checkpointed layer's recompute in the backward pass would draw other "
                              "noise than the forward used")

    posterior: BlobPosterior | None = None

    # ---- state --------------------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return next(iter(self.session.params.values())).device

    def _ensure_posterior(self) -> BlobPosterior:
        """Install the flipout hooks and ρ (once; also when :meth:`load` runs without :meth:`setup`)."""
        if self.posterior is None:
            init = torch.Generator().manual_seed(self.config.train.seed + _RHO_SEED_OFFSET)
            self.posterior = BlobPosterior(self.session.model, self.args.init_eps, generator=init)
        return self.posterior

    def _lora_a(self) -> list[torch.nn.Parameter]:
        post = self._ensure_posterior()
        return [post.lora_a(name).weight for name in post.names]

    @property
    def kl_period(self) -> int:
        """M, the period of the KL weights."""
        if self.args.kl_period > 0:
            return self.args.kl_period
        cfg = self.config.train
        return kl_period(len(self.session.train_examples), cfg.batch_size, self.args.dataset_rescaling,
                         self.args.gamma)

    def setup(self) -> None:
        post = self._ensure_posterior()
        params = list(self.session.params.values())
        self.optimizer = build_adamw(AdamWArgs(lr=self.args.lr, weight_decay=self.args.weight_decay), params)
        self.scheduler = linear_scheduler(self.session, self.optimizer)
        self.kl_optimizer = torch.optim.SGD([*post.rho.values(), *self._lora_a()], lr=self.args.kl_lr)
        self.kl_scheduler = linear_scheduler(self.session, self.kl_optimizer)
        self.noise = torch.Generator(device=self._device).manual_seed(self.config.train.seed + _NOISE_SEED_OFFSET)

    # ---- training -----------------------------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        post = self._ensure_posterior()
        lr = self.optimizer.param_groups[0]["lr"]
        params = list(self.session.params.values())
        self.kl_optimizer.zero_grad(set_to_none=True)  # ρ's gradient starts from zero
        with post.using("sample", self.noise):
            nll = adamw_step(self.session, self.session.batch(step), params, self.optimizer)
        self.scheduler.step()
        for p in self._lora_a():  # A's NLL gradient was AdamW's; the SGD step sees only π ∇KL on A
            p.grad = None
        pi = kl_weight(step, self.kl_period, self.args.kl_weighting)
        kl = post.kl(self.args.prior_std)
        (pi * kl).backward()
        self.kl_optimizer.step()
        self.kl_scheduler.step()
        self.kl_optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        sigma = torch.cat([post.std(n).detach().flatten() for n in post.names])
        return StepResult(nll, {"lr": lr, "kl": float(kl.detach()), "kl_weight": pi, "sigma_mean": float(sigma.mean()),
                                "sigma_max": float(sigma.max())})

    def state_dict(self) -> dict[str, Any]:
        post = self._ensure_posterior()
        return {"params": snapshot(self.session.params), "rho": snapshot(post.named_rho()),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl_optimizer": self.kl_optimizer.state_dict(), "kl_scheduler": self.kl_scheduler.state_dict(),
                "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        post = self._ensure_posterior()
        restore(self.session.params, state["params"])
        restore(post.named_rho(), state["rho"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_optimizer.load_state_dict(state["kl_optimizer"])
        self.kl_scheduler.load_state_dict(state["kl_scheduler"])
        self.noise.set_state(state["noise"])

    # ---- saving -------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        super().save(folder)
        post = self._ensure_posterior()
        tensors = {name: rho.detach().float().cpu().contiguous() for name, rho in post.named_rho().items()}
        metadata = {"init_eps": repr(self.args.init_eps), "prior_std": repr(self.args.prior_std),
                    "sigma": "rho ** 2"}
        with _io.atomic_path(Path(folder) / BLOB_FILE) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def saved_std(cls, final: Path) -> dict[str, torch.Tensor] | None:
        """σ = ρ² of every LoRA A (B is deterministic in BLoB, so it has none), from ``final/blob.safetensors``."""
        path = Path(final) / BLOB_FILE
        if not path.is_file():
            return None
        rho, _ = _io.read_safetensors(path)
        return {f"{name}.lora_A.weight": r.square() for name, r in rho.items()}

    def load(self, folder: Path) -> None:
        super().load(folder)
        post = self._ensure_posterior()
        path = Path(folder) / BLOB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run has not finished training")
        saved, _ = _io.read_safetensors(path)
        rho = post.named_rho()
        missing = sorted(set(rho) - set(saved))
        if missing:
            raise ValueError(f"{path} lacks rho of LoRA layer {missing[0]!r} (saved for another model?)")
        for name, param in rho.items():
            if saved[name].shape != param.shape:
                raise ValueError(f"{path}: rho of {name!r} has shape {tuple(saved[name].shape)}, "
                                 f"the model's LoRA A {tuple(param.shape)}")
        restore(rho, saved)

    # ---- prediction ---------------------------------------------------------------------------------
    def predict(self, examples: Sequence, scorer: Any) -> list[Prediction]:
        post = self._ensure_posterior()
        noise = torch.Generator(device=self._device).manual_seed(self.config.eval.seed)
        n = self.config.eval.n_samples
        sampled = sampled_prediction(self, self.label, examples, scorer, lambda _: post.using("sample", noise), n)
        return [sampled, self.predict_at_mean(examples, scorer)]

    def predict_at_mean(self, examples: Sequence, scorer: Any) -> Prediction:
        post = self._ensure_posterior()
        with post.using("mean"):
            return deterministic_prediction(self, f"{self.label}@mean", examples, scorer, n_samples=0,
                                            forward_passes=1)

    def extra_bytes(self) -> dict[str, int]:
        post = self._ensure_posterior()
        optimizers = [o for o in (getattr(self, "optimizer", None), getattr(self, "kl_optimizer", None)) if o]
        return {"extra_param_bytes": tensor_bytes(post.rho.values()),
                "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in optimizers)}
