"""Equivalence with the reference implementation ``ivon-opt`` 0.1.3 (GPLv3+, a test-only dependency).

Both optimizers see the same data and the same noise: the reference draws ε per parameter group with
``torch.randn`` and returns the perturbation σ⊙ε from ``_sample_params``; we record it there and feed
ε = (σ⊙ε)/σ to ``varlora.IVON`` through ``sampled_params(noise=...)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varlora import IVON

ivon = pytest.importorskip("ivon")

STEPS = 100


def model_and_groups(seed: int = 0) -> tuple[nn.Module, list[dict]]:
    """An MLP in three groups. ``hess_init`` values are exact in float32: the reference builds h₀ with
    ``torch.as_tensor(hess_init)``, which rounds it to float32 even for float64 parameters (0.3 becomes
    0.3 + 1.2e-8), a difference our float64 state does not have."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    groups = [  # every per-group option of the reference differs between groups
        {"params": [model[0].weight, model[0].bias], "lr": 0.05, "clip_radius": 0.02},
        {"params": [model[2].weight], "ess": 300.0, "hess_init": 0.375, "weight_decay": 1e-2, "beta1": 0.8},
        {"params": [model[2].bias, *model[4].parameters()], "beta2": 0.995, "weight_decay": 0.0, "lr": 0.02},
    ]
    return model, groups


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2]), x[:, 3] - x[:, 4]], dim=1)
    return x, y


@pytest.mark.parametrize(
    "mc_samples, rescale_lr, debias, hess_approx",
    [
        (1, True, True, "price"),
        (1, False, True, "price"),
        (3, True, True, "price"),
        (3, False, False, "price"),
        (3, True, True, "gradsq"),
    ],
)
def test_matches_reference_for_100_steps(mc_samples, rescale_lr, debias, hess_approx):
    kwargs = dict(
        lr=0.03,
        ess=200.0,
        hess_init=0.5,
        beta2=0.999,
        weight_decay=1e-3,
        mc_samples=mc_samples,
        clip_radius=0.1,
        rescale_lr=rescale_lr,
        debias=debias,
        hess_approx=hess_approx,
    )
    ref_model, ref_groups = model_and_groups()
    our_model, our_groups = model_and_groups()
    ref = ivon.IVON(ref_groups, **kwargs)
    ours = IVON(our_groups, **kwargs, stats_every=1)
    x, y = data()

    perturbations: list[torch.Tensor] = []
    sample_params = ref._sample_params

    def recording_sample_params():
        param_avg, noise = sample_params()
        perturbations.append(noise)
        return param_avg, noise

    ref._sample_params = recording_sample_params
    torch.manual_seed(0)  # the reference's noise source
    batches = torch.Generator().manual_seed(2)
    clipped_steps = 0
    for _ in range(STEPS):
        for _ in range(mc_samples):
            idx = torch.randint(0, 64, (16,), generator=batches)
            xb, yb = x[idx], y[idx]
            with ref.sampled_params(train=True):
                ref.zero_grad()
                nn.functional.mse_loss(ref_model(xb), yb).backward()
            # ε of each of our parameters, from the reference's perturbation σ⊙ε of its group
            eps, offset = [], 0
            for ref_group, our_group in zip(ref.param_groups, ours.param_groups, strict=True):
                sigma = (ref_group["ess"] * (ref_group["hess"] + ref_group["weight_decay"])).rsqrt()
                group_eps = perturbations[-1][offset : offset + ref_group["numel"]] / sigma
                offset += ref_group["numel"]
                sizes = [p.numel() for p in our_group["params"]]
                eps += [e.view_as(p) for e, p in zip(group_eps.split(sizes), our_group["params"], strict=True)]
            with ours.sampled_params(train=True, noise=eps):
                nn.functional.mse_loss(our_model(xb), yb).backward()
        ref.step()
        ours.step()
        clipped_steps += 0.0 < ours.last_step_stats["clip_fraction"] < 1.0

    assert clipped_steps > STEPS // 2  # the clip radius is active, not saturated
    for ref_group, our_group in zip(ref.param_groups, ours.param_groups, strict=True):
        params = our_group["params"]
        mean = torch.cat([p.detach().view(-1) for p in params])
        hess = torch.cat([ours.state[p]["hess"].view(-1) for p in params])
        momentum = torch.cat([ours.state[p]["momentum"].view(-1) for p in params])
        ref_mean = torch.cat([p.detach().view(-1) for p in ref_group["params"]])
        for ours_t, ref_t in ((mean, ref_mean), (hess, ref_group["hess"]), (momentum, ref_group["momentum"])):
            assert (ours_t - ref_t).abs().max() < 1e-10
        assert not torch.equal(hess, torch.full_like(hess, ref_group["hess_init"]))  # h moved
    assert ours.state[our_model[0].weight]["step"] == ref.current_step == STEPS
