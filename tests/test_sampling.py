"""The shared test-time sampler: θ = m + √τ σ⊙ε in sorted-name order, exact restore, τ in [0, 1]."""

from __future__ import annotations

import math

import pytest
import torch

from varlora.optim.sampling import perturbed_named_params, perturbed_params


def named(seed: int = 0) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in (("b", (3, 4)), ("a", (5,)))}
    stds = {n: torch.rand(p.shape, generator=g) + 0.1 for n, p in params.items()}
    return params, stds


def test_sample_is_mean_plus_scaled_noise_drawn_in_sorted_name_order():
    params, stds = named()
    means = {n: p.detach().clone() for n, p in params.items()}
    oracle_gen = torch.Generator().manual_seed(3)
    eps = {n: torch.randn(params[n].shape, generator=oracle_gen, dtype=torch.float32) for n in sorted(params)}
    with perturbed_named_params(params, stds, tau=0.25, generator=torch.Generator().manual_seed(3)):
        for n, p in params.items():
            assert torch.equal(p.detach(), means[n] + (math.sqrt(0.25) * stds[n]) * eps[n])
    assert all(torch.equal(p.detach(), means[n]) for n, p in params.items())


def test_tau_zero_is_the_mean_but_consumes_the_same_draws():
    params, stds = named()
    means = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(1)
    with perturbed_named_params(params, stds, tau=0.0, generator=gen):
        assert all(torch.equal(p.detach(), means[n]) for n, p in params.items())
    after_zero = gen.get_state()
    gen = torch.Generator().manual_seed(1)
    with perturbed_named_params(params, stds, tau=1.0, generator=gen):
        pass
    assert torch.equal(gen.get_state(), after_zero)


def test_restores_on_error_and_checks_its_arguments():
    params, stds = named()
    means = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(RuntimeError), perturbed_named_params(params, stds, tau=1.0,
                                                             generator=torch.Generator().manual_seed(0)):
        raise RuntimeError
    assert all(torch.equal(p.detach(), means[n]) for n, p in params.items())
    for tau in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="Invalid tau"), perturbed_named_params(
            params, stds, tau=tau, generator=torch.Generator()
        ):
            pass
    with pytest.raises(ValueError, match="no std for the parameters \\['b'\\]"):
        perturbed_named_params(params, {"a": stds["a"]}, tau=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="exactly one of generator and noise"), perturbed_params(
        list(params.values()), list(stds.values()), tau=1.0
    ):
        pass


def test_bf16_parameters_with_fp32_means_are_rounded_once():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    mean = torch.tensor([1.001, 2.002])
    std = torch.tensor([0.5, 0.25])
    eps = torch.tensor([1.0, -2.0])
    with perturbed_params([p], [std], tau=1.0, noise=[eps], means=[mean]):
        assert torch.equal(p.detach(), (mean + std * eps).to(torch.bfloat16))
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
