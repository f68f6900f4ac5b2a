"""Tests of varlora.IVON: validation, the single-tensor oracle, an exact posterior, each defect of the reference."""

from __future__ import annotations

import inspect
import io
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ivon_oracle
from varlora import IVON
from varlora.optim import IVON_DEFAULTS, sampling, validate_ivon_hyperparameters

DEFAULTS = dict(lr=0.05, ess=100.0, stats_every=1)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def batch(seed: int = 1, n: int = 32, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] - 2 * x[:, 1], torch.sin(x[:, 2]) + x[:, 3] ** 2], dim=1)
    return x.to(dtype), y.to(dtype)


def train(model: nn.Module, opt: IVON, steps: int, x: torch.Tensor, y: torch.Tensor) -> None:
    for _ in range(steps):
        for _ in range(opt.mc_samples):
            with opt.sampled_params(train=True):
                nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def snapshot(model: nn.Module, opt: IVON) -> dict[str, torch.Tensor]:
    """Parameters and every state tensor, cloned (state views are live)."""
    out = {f"param{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state[p].items():
            out[f"{key}{i}"] = value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(lr=float("nan")),
        dict(lr="fast"),
        dict(ess=0.0),
        dict(ess=float("inf")),
        dict(hess_init=0.0),
        dict(hess_init=-1.0),
        dict(beta1=1.0),
        dict(beta1=-0.1),
        dict(beta2=1.5),
        dict(weight_decay=-1e-4),
        dict(clip_radius=0.0),
        dict(clip_radius=float("nan")),
        dict(mc_samples=0),
        dict(mc_samples=2.0),
        dict(hess_approx="fisher"),
        dict(rescale_lr="yes"),
        dict(debias=None),
        dict(sync=1),
        dict(generator=42),
        dict(stats_every=0),
    ],
)
def test_invalid_hyperparameter_raises_value_error_naming_it(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=f"Invalid {name}: {re.escape(repr(value))}"):
        IVON(mlp().parameters(), **{**DEFAULTS, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1e-3), dict(ess=0), dict(hess_init=float("inf")), dict(beta1=1), dict(beta2=-0.5),
     dict(weight_decay=float("nan")), dict(clip_radius=-1.0), dict(mc_samples=True), dict(hess_approx=None),
     dict(rescale_lr=1), dict(lr=True)],
)
def test_validate_ivon_hyperparameters_is_the_rule_ivon_applies(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=f"Invalid {name}: {re.escape(repr(value))}"):
        validate_ivon_hyperparameters(**kwargs)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        IVON(mlp().parameters(), **{**DEFAULTS, **kwargs})
    validate_ivon_hyperparameters(lr=0.0, ess=1e6, **IVON_DEFAULTS)  # lr 0 is legal: schedules may reach it
    with pytest.raises(ValueError, match="Unknown IVON hyper-parameter: 'learning_rate'"):
        validate_ivon_hyperparameters(learning_rate=0.1)


def test_ivon_defaults_are_the_constructor_defaults():
    signature = inspect.signature(IVON.__init__).parameters
    assert {k: signature[k].default for k in IVON_DEFAULTS} == dict(IVON_DEFAULTS)
    assert IVON_DEFAULTS["beta2"] == 0.99999 and IVON_DEFAULTS["clip_radius"] == math.inf  # the reference's
    with pytest.raises(TypeError):
        IVON_DEFAULTS["beta2"] = 0.9  # type: ignore[index]


def test_invalid_group_option_raises_and_leaves_optimizer_unchanged():
    model = mlp()
    opt = IVON(model[0].parameters(), **DEFAULTS)
    with pytest.raises(ValueError, match="-3.0"):
        opt.add_param_group({"params": list(model[2].parameters()), "ess": -3.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="dtype torch.int64"):
        IVON([torch.zeros(3, dtype=torch.int64)], **DEFAULTS)


def test_invalid_sampling_arguments():
    opt = IVON(mlp().parameters(), **DEFAULTS)
    for kwargs in (
        dict(tau=-1.0),
        dict(tau=float("inf")),
        dict(tau=1.5),
        dict(train=True, tau=0.5),
        dict(max_grad_norm=0.0),
    ):
        with pytest.raises(ValueError), opt.sampled_params(**kwargs):
            pass
    with opt.sampled_params(), pytest.raises(RuntimeError, match="nested"), opt.sampled_params():
        pass


def test_step_requires_mc_samples_training_contexts():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS, mc_samples=2)
    with pytest.raises(RuntimeError, match="0 sampled_params"):
        opt.step()
    for _ in range(3):
        with opt.sampled_params(train=True):
            nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="micro-batches"):
        opt.step()
    opt.discard_samples()
    train(model, opt, 1, x, y)


# ---------------------------------------------------------------------------------------- math paths


def grouped_optimizer(model: nn.Module, **kwargs) -> IVON:
    """Three groups that differ in every per-group option."""
    first, second = model[0], model[2]
    groups = [
        {"params": [first.weight], "weight_decay": 0.0, "clip_radius": 0.05},
        {"params": [first.bias], "hess_approx": "gradsq", "debias": False, "hess_init": 0.3},
        {"params": list(second.parameters()), "ess": 50.0, "beta2": 0.99, "rescale_lr": False, "lr": 0.02},
    ]
    return IVON(groups, **{**DEFAULTS, "weight_decay": 1e-2, "beta2": 0.999, **kwargs})


@pytest.mark.parametrize("mc_samples", [1, 2])
def test_equals_the_single_tensor_oracle(mc_samples):
    """Three groups that differ in every option, 15 steps, and a parameter that misses its gradient in one sample
    of every step: each parameter's mean, h, ḡ and step count equal those of tests/ivon_oracle.py in float64."""
    x, y = batch()
    model = mlp()
    opt = grouped_optimizer(model, mc_samples=mc_samples)
    params = [p for g in opt.param_groups for p in g["params"]]
    options = [{k: g[k] for k in ("lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "clip_radius",
                                  "hess_approx", "rescale_lr", "debias")} for g in opt.param_groups]
    group_of = [i for i, g in enumerate(opt.param_groups) for _ in g["params"]]
    oracle = [ivon_oracle.new_state(p.detach(), options[gi]["hess_init"])
              for p, gi in zip(params, group_of, strict=True)]
    noise = torch.Generator().manual_seed(3)

    def loss(s: int) -> torch.Tensor:  # the last bias gets no gradient in the second sample
        if s == 1:
            return nn.functional.mse_loss(model[1](model[0](x)) @ model[2].weight.T, y)
        return nn.functional.mse_loss(model(x), y)

    def grads_at(thetas: list[torch.Tensor], s: int) -> list[torch.Tensor | None]:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, thetas)
        grads = torch.autograd.grad(loss(s), params, allow_unused=True)
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        return list(grads)

    clipped = 0
    for _ in range(15):
        eps = [[torch.randn(p.shape, generator=noise, dtype=torch.float64) for p in params]
               for _ in range(mc_samples)]
        ivon_oracle.step(oracle, [options[gi] for gi in group_of], eps, grads_at)
        for s in range(mc_samples):
            with opt.sampled_params(train=True, noise=eps[s]):
                loss(s).backward()
        opt.step()
        clipped += 0.0 < opt.last_step_stats["clip_fraction"] < 1.0
    assert clipped > 5  # the clip acts without saturating
    for p, state in zip(params, oracle, strict=True):
        torch.testing.assert_close(p.detach(), state["m"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["hess"], state["h"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["momentum"], state["g_bar"], rtol=1e-12, atol=1e-14)
        assert opt.state[p]["step"] == state["t"]


def test_sampler_draws_standard_normal_per_parameter_in_order():
    """The one sampler: one torch.randn per tensor, in order, in the state dtype, from the device's generator."""
    like = [torch.empty(300_000), torch.empty(3, 4, dtype=torch.bfloat16), torch.empty(5, dtype=torch.float64)]
    eps = sampling.standard_normal(like, torch.Generator().manual_seed(0))
    assert [e.dtype for e in eps] == [torch.float32, torch.float32, torch.float64]
    assert abs(eps[0].mean()) < 0.01 and abs(eps[0].std() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([eps[0][:-1], eps[0][1:]]))[0, 1]) < 0.01
    g = torch.Generator().manual_seed(0)
    expected = [torch.randn(t.shape, generator=g, dtype=e.dtype) for t, e in zip(like, eps, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(eps, expected, strict=True))
    by_device = sampling.standard_normal(like[:1], lambda device: torch.Generator(device).manual_seed(0))
    assert torch.equal(by_device[0], eps[0])


# --------------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converges_to_exact_mean_field_optimum_of_bayesian_linear_regression(dtype):
    r"""Linear regression, loss ℓ(θ) = mean_i (y_i − x_iᵀθ)²/2, ess λ = n, prior precision λδ.

    IVON's fixed point is the Gaussian q = N(m, diag σ²) minimising λ E_q[ℓ] + KL(q ‖ N(0, (λδ)⁻¹I)); for this
    quadratic with H = XᵀX/n it is, in closed form, m* = (H + δI)⁻¹ Xᵀy/n (the exact posterior mean) and
    σ*² = 1/(λ(diag H + δ)) (mean field: the inverse diagonal of the precision, 1.7x smaller here than the
    posterior marginal std, as the two features correlate with ρ = 0.8).

    Tolerances. For a quadratic the Price estimate ĥ = g⊙ε/σ is unbiased for diag H whatever m, with
    relative std √(2 + ρ² + (δm/σ)²)/√S ≈ 1.15 for S = 2 samples; h is its EMA. Phase 1 (β₂ = 0.99, 600
    steps = 6 time constants) converges from h₀ = 0.2 to ≈ 1; phase 2 (β₂ = 0.998, time constant
    τ = 500) forgets phase 1 over 1500 steps (3τ), then 4000 iterates (8τ) are averaged. The EMA's relative
    std is 1.15·√((1−β₂)/(1+β₂)) ≈ 3.6%, the average of 8τ of an AR(1) has std ≈ 3.6%·√(2τ/8τ) ≈ 1.8%, so σ ∝
    h^-½ is within ≈ 0.9% (measured over seeds 0-7: 0.4-1.9%); the correction term biases h by
    ½(1−β₂)·Var(ĥ)/h ≈ 0.1%. We allow 3% (3.3 standard errors), far from the 72% mean-field/marginal gap.
    The mean jitters around m* with std ≈ √(α/2)·σ ≈ 0.2σ and correlation time ≈ 1/α = 10 steps, so the
    average is within ≈ 0.01σ (measured ≤ 0.016σ); we allow 0.1σ.
    """
    torch.manual_seed(0)
    n, d, lam, delta, samples = 200, 2, 200.0, 0.01, 2
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    x = torch.randn(n, d, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + 0.5 * torch.randn(n, dtype=torch.float64)
    hess, eye = x.T @ x / n, torch.eye(d, dtype=torch.float64)
    m_star = torch.linalg.solve(hess + delta * eye, x.T @ y / n)
    sigma_star = (lam * (hess.diagonal() + delta)).rsqrt()
    sigma_marginal = torch.linalg.inv(lam * (hess + delta * eye)).diagonal().sqrt()
    assert (sigma_marginal / sigma_star).min() > 1.5  # the oracle tells mean field from the marginals

    x, y = x.to(dtype), y.to(dtype)
    theta = nn.Parameter(torch.zeros(d, dtype=dtype))
    opt = IVON(
        [theta],
        lr=0.1,
        ess=lam,
        hess_init=0.2,
        weight_decay=delta,
        beta2=0.99,
        rescale_lr=False,
        mc_samples=samples,
        generator=torch.Generator().manual_seed(0),
    )
    means, sigmas = [], []
    for t in range(600 + 1500 + 4000):
        if t == 600:
            opt.param_groups[0]["beta2"] = 0.998
        for _ in range(samples):
            with opt.sampled_params(train=True):
                (0.5 * (y - x @ theta).square().mean()).backward()
        opt.step()
        if t >= 600 + 1500:
            means.append(theta.detach().clone())
            sigmas.append(opt.posterior_std(theta))
    m, sigma = torch.stack(means).double().mean(0), torch.stack(sigmas).double().mean(0)
    torch.testing.assert_close(sigma, sigma_star, rtol=0.03, atol=0.0)
    assert ((m - m_star).abs() / sigma_star).max() < 0.1


# ------------------------------------------------------------------------------------ reference defects


def test_bf16_parameters_keep_fp32_state_and_h_moves():
    model, (x, y) = mlp(dtype=torch.bfloat16), batch(dtype=torch.bfloat16)
    # β₂ = 0.99999: β₂·h rounds back to h in bf16 (ulp 2^-8), so a bf16 state would never move
    opt = IVON(
        model.parameters(),
        lr=1e-3,
        ess=1000.0,
        hess_init=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 20, x, y)
    for p, p0 in zip(model.parameters(), before, strict=True):
        state = opt.state[p]
        assert {state[k].dtype for k in ("hess", "momentum", "mean")} == {torch.float32}
        assert (state["hess"] != 1.0).float().mean() > 0.5  # h moved
        assert torch.equal(p.detach(), state["mean"].to(torch.bfloat16))  # p holds its rounded mean
        # updates of ~lr·ρ are far below bf16 resolution but accumulate in the fp32 mean
        assert (state["mean"] != p0.float()).float().mean() > 0.5


def test_non_contiguous_parameters_train_like_contiguous_ones():
    x, y = batch()
    samples, finals = [], []
    for transpose in (False, True):
        model = mlp()
        if transpose:  # same values, transposed storage
            model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
            assert not model[0].weight.is_contiguous()
        opt = IVON(model.parameters(), **DEFAULTS, generator=torch.Generator().manual_seed(0))
        with opt.sampled_params():
            samples.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        train(model, opt, 3, x, y)
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(samples[0], samples[1])  # the noise follows the logical layout
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=1e-15)  # the forward's matmul rounds differently


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parameters_on_several_devices():
    cpu = nn.Parameter(torch.randn(5, dtype=torch.float64))
    gpu = nn.Parameter(torch.randn(7, device="cuda", dtype=torch.bfloat16))
    opt = IVON([cpu, gpu], **DEFAULTS, generator=torch.Generator().manual_seed(0))
    before = [cpu.detach().clone(), gpu.detach().clone()]
    for _ in range(3):
        with opt.sampled_params(train=True):
            assert not torch.equal(cpu, before[0]) and not torch.equal(gpu, before[1])
            (cpu.square().sum() + gpu.float().square().sum().cpu().double()).backward()
        opt.step()
    assert opt.state[gpu]["hess"].device.type == "cuda" and opt.state[gpu]["hess"].dtype == torch.float32
    assert opt.state[cpu]["hess"].dtype == torch.float64
    assert set(opt.state_dict()["ivon"]["generators"]) == {"cpu", "cuda:0"}
    mean = opt.posterior_mean(gpu).clone()  # read outside sampled_params: inside, the weights hold a sample
    with opt.sampled_params(tau=0.0):
        assert torch.equal(gpu, mean.to(torch.bfloat16))


def test_master_mean_follows_parameters_changed_from_outside():
    model, (x, y) = mlp(dtype=torch.bfloat16), batch(dtype=torch.bfloat16)
    opt = IVON(model.parameters(), **DEFAULTS)
    train(model, opt, 2, x, y)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    with opt.sampled_params(tau=0.0):
        pass
    assert torch.equal(opt.posterior_mean(model[0].weight), torch.full((6, 4), 0.5))


def test_parameter_without_gradient_is_skipped_and_frozen_ones_are_constant():
    model, (x, y) = mlp(), batch()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    opt = IVON([*model.parameters(), unused, frozen], **DEFAULTS, generator=torch.Generator().manual_seed(0))
    with opt.sampled_params(train=True):
        assert torch.equal(frozen, torch.ones(2, dtype=torch.float64))  # never perturbed
        assert not torch.equal(unused, torch.ones(3, dtype=torch.float64))  # perturbed: it requires grad
        nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.last_step_stats["skipped_params"] == 1
    assert torch.equal(unused, torch.ones(3, dtype=torch.float64)) and torch.equal(frozen, torch.ones(2).double())
    assert opt.state[unused]["step"] == 0 and torch.equal(opt.state[unused]["hess"], torch.ones(3).double())
    assert frozen not in opt.state and opt.state[model[0].weight]["step"] == 1


def test_gradient_missing_in_some_samples_counts_as_zero():
    x, y = batch()
    finals = []
    for explicit_zero in (False, True):
        model = mlp()
        opt = IVON(model.parameters(), **DEFAULTS, mc_samples=2, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            for s in range(2):
                with opt.sampled_params(train=True):
                    loss = nn.functional.mse_loss(model(x), y)
                    if s == 1:  # second sample: the last layer's bias gets no gradient (or a zero one)
                        out = model[1](model[0](x)) @ model[2].weight.T
                        loss = nn.functional.mse_loss(out, y) + (0.0 * model[2].bias.sum() if explicit_zero else 0)
                    loss.backward()
            opt.step()
        finals.append(snapshot(model, opt))
    assert_same(*finals)


def test_exception_inside_sampling_restores_weights_and_drops_the_sample():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError), opt.sampled_params(train=True):
        nn.functional.mse_loss(model(x), y).backward()
        raise KeyError("boom")
    with pytest.raises(ZeroDivisionError), opt.sampled_params(train=True, grad_transform=lambda ps: 1 / 0):
        nn.functional.mse_loss(model(x), y).backward()
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)
    assert opt._num_samples == 0 and not opt._sampling
    train(model, opt, 1, x, y)  # still usable


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tau_zero_is_exactly_the_mean_and_tau_scales_the_perturbation(dtype):
    model, (x, y) = mlp(dtype=dtype), batch(dtype=dtype)
    opt = IVON(model.parameters(), **DEFAULTS)
    train(model, opt, 2, x, y)
    mean = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(tau=0.0):
        for p, m in zip(model.parameters(), mean, strict=True):
            assert torch.equal(p, m)
    if dtype == torch.float64:
        deltas = []
        for tau in (1.0, 0.25):
            with opt.sampled_params(tau=tau, generator=torch.Generator().manual_seed(5)):
                diff = [(p - m).view(-1) for p, m in zip(model.parameters(), mean, strict=True)]
                deltas.append(torch.cat(diff))
        torch.testing.assert_close(deltas[1], 0.5 * deltas[0], rtol=1e-12, atol=1e-15)
        sigma = torch.cat([post.std.view(-1) for post in opt.posterior()])
        assert 0.5 < (deltas[0] / sigma).std() < 1.5  # the perturbation is σ⊙ε
    for p, m in zip(model.parameters(), mean, strict=True):
        assert torch.equal(p, m)


def test_evaluation_sample_with_explicit_generator_leaves_training_noise_alone():
    model, (_x, _y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS, generator=torch.Generator().manual_seed(0))
    state = opt._generator.get_state()
    thetas = []
    for _ in range(2):
        with opt.sampled_params(generator=torch.Generator().manual_seed(7)):
            thetas.append(model[0].weight.detach().clone())
    assert torch.equal(thetas[0], thetas[1]) and torch.equal(opt._generator.get_state(), state)
    assert opt._num_samples == 0


def test_gradient_clipping_hook_acts_before_consumption():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS, generator=torch.Generator().manual_seed(0))
    seen = []
    with opt.sampled_params(train=True, grad_transform=seen.extend, max_grad_norm=1e-3):
        (100 * nn.functional.mse_loss(model(x), y)).backward()
        raw = torch.cat([p.grad.view(-1) for p in model.parameters()])
    assert all(p.grad is None for p in model.parameters())  # consumed
    assert seen == list(model.parameters())
    opt.step()
    momentum = torch.cat([opt.state[p]["momentum"].view(-1) for p in model.parameters()])
    torch.testing.assert_close(momentum, 0.1 * raw * 1e-3 / raw.norm(), rtol=1e-6, atol=0)
    assert opt.last_step_stats["grad_norm"] == pytest.approx(raw.norm().item())


def test_micro_batches_inside_one_context_equal_the_full_batch():
    x, y = batch(n=32)
    finals = []
    for micro in (1, 4):
        model = mlp()
        opt = IVON(model.parameters(), **DEFAULTS, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            with opt.sampled_params(train=True):
                for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):
                    (nn.functional.mse_loss(model(xb), yb) / micro).backward()
            opt.step()
        finals.append(torch.cat([p.detach().view(-1) for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-12, atol=1e-14)


def test_closure_step_returns_mean_loss():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS, mc_samples=3)
    losses = []

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        return loss

    loss = opt.step(closure)
    assert len(losses) == 3 and torch.allclose(loss, torch.stack(losses).mean())
    assert opt.state[model[0].weight]["step"] == 1


def test_lr_scheduler_drives_the_learning_rate():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    train(model, opt, 1, x, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 2, x, y)
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), before, strict=True))
    assert opt.state[model[0].weight]["step"] == 3


# ---------------------------------------------------------------------------------------------- posterior


def test_posterior_gives_mean_and_sigma_and_reproduces_sampling():
    model, (x, y) = mlp(), batch()
    opt = grouped_optimizer(model)
    train(model, opt, 3, x, y)
    posts = list(opt.posterior())
    assert [post.param for post in posts] == list(model.parameters())
    groups = [opt.param_groups[0], opt.param_groups[1], opt.param_groups[2], opt.param_groups[2]]
    for post, group in zip(posts, groups, strict=True):
        h = opt.state[post.param]["hess"]
        torch.testing.assert_close(post.std, 1 / torch.sqrt(group["ess"] * (h + group["weight_decay"])))
        assert torch.equal(post.std, opt.posterior_std(post.param)) and post.mean is not None
    eps = [torch.randn_like(post.std) for post in posts]
    outside = [post.mean + post.std * e for post, e in zip(posts, eps, strict=True)]
    with opt.sampled_params(noise=eps):
        for p, theta in zip(model.parameters(), outside, strict=True):
            torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.posterior_std(torch.zeros(2))
    with opt.sampled_params():
        assert torch.equal(opt.posterior_std(model[0].weight), posts[0].std)
        with pytest.raises(RuntimeError, match="perturbed"):
            opt.posterior_mean(model[0].weight)
    stats = opt.last_step_stats
    all_h = torch.cat([opt.state[p]["hess"].view(-1) for p in model.parameters()])
    assert stats["hess_mean"] == pytest.approx(all_h.mean().item())
    assert stats["sigma_mean"] == pytest.approx(torch.cat([p.std.view(-1) for p in posts]).mean().item())
    assert stats["step"] == 3 and stats["num_samples"] == 1


def test_clip_fraction_matches_brute_force():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), lr=0.01, ess=100.0, clip_radius=0.05, stats_every=1,
               generator=torch.Generator().manual_seed(0))
    train(model, opt, 2, x, y)
    old = {p: (p.detach().clone(), opt.state[p]["hess"].clone()) for p in model.parameters()}
    train(model, opt, 1, x, y)
    clipped = total = 0
    for p, (m_old, _) in old.items():
        group, state = opt.param_groups[0], opt.state[p]
        b = 1 - group["beta1"] ** state["step"]
        direction = (state["momentum"] / b + group["weight_decay"] * m_old) / (state["hess"] + group["weight_decay"])
        clipped += int((direction.abs() > group["clip_radius"]).sum())
        total += p.numel()
    assert 0 < clipped < total
    # the optimizer clips (ḡ + δbm)/(h+δ) at ρb, the same up to rounding at the boundary
    assert opt.last_step_stats["clip_fraction"] == pytest.approx(clipped / total, abs=2 / total)


# ------------------------------------------------------------------------------------------ state dicts


def test_state_dict_round_trip_keeps_fp32_state_and_backfills_options():
    model = mlp(dtype=torch.bfloat16)
    x, y = batch(dtype=torch.bfloat16)
    opt = IVON(model.parameters(), **DEFAULTS)
    train(model, opt, 2, x, y)
    sd = opt.state_dict()
    assert sd["ivon"]["num_steps"] == 2 and "cpu" in sd["ivon"]["generators"]
    for group in sd["param_groups"]:  # as saved by an older version without these options
        for key in ("hess_approx", "rescale_lr", "debias"):
            del group[key]
        group["foreach"] = None  # and with an option they had
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    opt2 = IVON(model.parameters(), **DEFAULTS)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.param_groups[0]["hess_approx"] == "price" and opt2.param_groups[0]["rescale_lr"] is True
    assert "foreach" not in opt2.param_groups[0]
    for p in model.parameters():
        for key in ("hess", "momentum", "mean"):
            assert opt2.state[p][key].dtype == torch.float32  # torch.optim would cast to bf16
            assert torch.equal(opt2.state[p][key], opt.state[p][key])
    with opt.sampled_params(), pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()


RESUME_SCRIPT = """
import io, sys, torch
from torch import nn
from varlora import IVON

def setup(seed, dtype, mc_samples):
    torch.manual_seed(seed)  # different per run: loading must override everything
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, clip_radius=0.5, mc_samples=mc_samples)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t))
    return model, opt, sched

def run(model, opt, sched, first, last, dtype):
    # samples first..last-1 of a run; step() after every mc_samples samples
    g = torch.Generator().manual_seed(123)
    xs = torch.randn(64, 16, 4, generator=g).to(dtype)
    for i in range(first, last):
        x = xs[i % 64]
        with opt.sampled_params(train=True):
            nn.functional.mse_loss(model(x), torch.sin(x[:, :2])).backward()
        if (i + 1) % opt.mc_samples == 0:
            opt.step()
            sched.step()

def save(model, opt, sched):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    return buffer.getvalue()

def load(blob, model, opt, sched):
    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])

def final(model, opt):
    out = {"params": [p.detach().clone() for p in model.parameters()]}
    out["state"] = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                    for p in model.parameters()]
    out["gen"] = opt.state_dict()["ivon"]["generators"]
    return out

if __name__ == "__main__":
    ckpt, out, dtype, mc_samples, first, last = sys.argv[1:]
    dtype, mc_samples = getattr(torch, dtype), int(mc_samples)
    model, opt, sched = setup(999, dtype, mc_samples)
    load(open(ckpt, "rb").read(), model, opt, sched)
    run(model, opt, sched, int(first), int(last), dtype)
    torch.save(final(model, opt), out)
"""


def assert_same_final(a: dict, b: dict) -> None:
    for p, q in zip(a["params"], b["params"], strict=True):
        assert torch.equal(p, q)
    for s, t in zip(a["state"], b["state"], strict=True):
        assert s.keys() == t.keys()
        for key in s:
            assert (
                (torch.equal(s[key], t[key]) and s[key].dtype == t[key].dtype)
                if torch.is_tensor(s[key])
                else s[key] == t[key]
            )
    assert a["gen"].keys() == b["gen"].keys() and all(torch.equal(a["gen"][k], b["gen"][k]) for k in a["gen"])


@pytest.mark.parametrize(
    "dtype, mc_samples, cut",
    [
        (torch.float32, 1, 7),
        (torch.bfloat16, 1, 7),
        (torch.float32, 2, 7),  # cut between the samples of a step
    ],
)
def test_resume_from_state_dict_is_bitwise_identical(dtype, mc_samples, cut):
    ns: dict = {}
    exec(RESUME_SCRIPT, ns)
    total = 20
    model, opt, sched = ns["setup"](0, dtype, mc_samples)
    ns["run"](model, opt, sched, 0, cut, dtype)
    blob = ns["save"](model, opt, sched)
    ns["run"](model, opt, sched, cut, total, dtype)
    uninterrupted = ns["final"](model, opt)
    model, opt, sched = ns["setup"](1, dtype, mc_samples)
    ns["load"](blob, model, opt, sched)
    ns["run"](model, opt, sched, cut, total, dtype)
    assert_same_final(ns["final"](model, opt), uninterrupted)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    ns: dict = {}
    exec(RESUME_SCRIPT, ns)
    model, opt, sched = ns["setup"](0, torch.float32, 1)
    ns["run"](model, opt, sched, 0, 9, torch.float32)
    (tmp_path / "ckpt.pt").write_bytes(ns["save"](model, opt, sched))
    ns["run"](model, opt, sched, 9, 25, torch.float32)
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT))
    args = [str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pt"), "float32", "1", "9", "25"]
    subprocess.run([sys.executable, str(script), *args], check=True, timeout=120)
    assert_same_final(torch.load(tmp_path / "out.pt", weights_only=True), ns["final"](model, opt))


def test_private_generator_is_seeded_from_torch_seed():
    draws = []
    for seed in (0, 0, 1):
        model = mlp()
        torch.manual_seed(seed)
        opt = IVON(model.parameters(), **DEFAULTS)
        with opt.sampled_params():
            draws.append(model[0].weight.detach().clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert math.isfinite(float(draws[0].sum()))


# ------------------------------------------------------------------------------------------- statistics


def test_statistics_every_n_steps_equal_a_brute_force_reduction():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, clip_radius=0.05, stats_every=3)
    seen = []
    for step in range(1, 8):
        train(model, opt, 1, x, y)
        stats = opt.last_step_stats
        assert stats["step"] == step and stats["num_samples"] == 1
        if "hess_mean" in stats:
            seen.append(step)
            h = torch.cat([opt.state[p]["hess"].view(-1) for p in model.parameters()])
            group = opt.param_groups[0]
            assert stats["hess_mean"] == pytest.approx(h.mean().item(), rel=1e-12)
            sigma = (group["ess"] * (h + group["weight_decay"])).rsqrt()
            assert stats["sigma_mean"] == pytest.approx(sigma.mean().item(), rel=1e-12)
            assert 0.0 <= stats["clip_fraction"] <= 1.0 and stats["grad_norm"] is None
        else:
            assert not {"clip_fraction", "hess_mean", "sigma_mean", "grad_norm"} & stats.keys()
    assert seen == [1, 4, 7]


def test_statistics_read_the_state_with_one_host_sync_per_device(monkeypatch):
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS, clip_radius=0.05)
    train(model, opt, 2, x, y)
    syncs = []
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: syncs.append(_n) or _f(self, *a))
    stats = opt.last_step_stats
    monkeypatch.undo()
    assert syncs == ["tolist"] and set(stats) >= {"clip_fraction", "hess_mean", "sigma_mean", "grad_norm"}


def test_old_pickled_optimizer_gets_new_options_back_filled():
    model, (x, y) = mlp(), batch()
    opt = IVON(model.parameters(), **DEFAULTS)
    state = dict(opt.__dict__)
    for key in ("stats_every", "_grad_norms", "_sampling"):
        del state[key]
    state["param_groups"] = [{**g, "foreach": None} for g in state["param_groups"]]
    fresh = IVON.__new__(IVON)
    fresh.__setstate__(state)
    assert fresh.stats_every == 10 and fresh._grad_norms == [] and "foreach" not in fresh.param_groups[0]
    train(model, fresh, 1, x, y)  # usable


def test_a_state_dict_written_before_the_rework_still_loads():
    """tests/data/ivon_state_2026-12.pt: written by the IVON of 2026-12-07 (fused CPU kernels, flat noise buffers)
    after 3 steps. Its posterior, momentum and counters load exactly; the run continues with a warning that the
    noise differs from the uninterrupted run's."""
    saved = torch.load(Path(__file__).parent / "data" / "ivon_state_2026-12.pt", weights_only=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    model.load_state_dict(saved["model"])
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.5, beta2=0.99, clip_radius=1e-2)
    with pytest.warns(UserWarning, match="noise path 'fused'.*differs from that of the uninterrupted run"):
        opt.load_state_dict(saved["optimizer"])
    for i, p in enumerate(model.parameters()):
        old = saved["optimizer"]["state"][i]
        assert opt.state[p]["step"] == 3 and torch.equal(opt.state[p]["hess"], old["hess"])
        assert torch.equal(opt.state[p]["momentum"], old["momentum"]) and not torch.equal(old["hess"], 0.5 + 0 * p)
    assert opt.state_dict()["ivon"]["num_steps"] == 3 and "noise_path" not in opt.state_dict()["ivon"]
    train(model, opt, 2, saved["x"], saved["y"])
    assert opt.state[model[0].weight]["step"] == 5


# ------------------------------------------------------------------------------------ evaluation sampler


def test_evaluation_samples_use_the_saved_posteriors_sampler():
    """IVON's test-time sample equals perturbed_named_params over its (mean, std) with the same generator."""
    model, (x, y) = mlp(), batch()
    named = dict(sorted(model.named_parameters()))
    opt = IVON(named.values(), **DEFAULTS)  # optimizer order = sorted-name order
    train(model, opt, 3, x, y)
    names = list(named)
    stds = {n: opt.posterior_std(p) for n, p in model.named_parameters()}
    with opt.sampled_params(tau=0.5, generator=torch.Generator().manual_seed(4)):
        ours = {n: p.detach().clone() for n, p in model.named_parameters()}
    with sampling.perturbed_named_params(named, stds, tau=0.5,
                                         generator=torch.Generator().manual_seed(4)):
        shared = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(ours[n], shared[n]) for n in names)
