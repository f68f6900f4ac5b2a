"""Posterior: sampling statistics, exact restore (also on error), τ scaling, safetensors round trip."""

import math

import pytest
import torch

from varlora.posterior import Posterior


def _params():
    torch.manual_seed(0)
    return {"a": torch.nn.Parameter(torch.randn(50, 40)), "b": torch.nn.Parameter(torch.randn(30))}


def _posterior(params, scale=0.1):
    std = {n: torch.full_like(p, scale) * (1 + torch.arange(p.numel()).reshape(p.shape) % 3) for n, p in params.items()}
    hess = {n: 1.0 / (1e3 * s**2) for n, s in std.items()}
    return Posterior(std=std, hess=hess, ess=1e3, weight_decay=0.0)


def test_samples_have_the_posterior_moments_and_restore_exactly():
    params = _params()
    post = _posterior(params)
    means = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(400):
        with post.sampled(params, tau=0.25, generator=gen):
            draws.append((params["a"].detach() - means["a"]) / post.std["a"])
    z = torch.stack(draws)  # (S, 50, 40): should be N(0, tau) element-wise
    # 800k standard-normal draws scaled by sqrt(0.25): the empirical std has relative s.e. ~ 1/sqrt(2*8e5) < 1e-3.
    assert z.std().item() == pytest.approx(math.sqrt(0.25), rel=5e-3)
    assert abs(z.mean().item()) < 5e-3
    for name, p in params.items():
        assert torch.equal(p.detach(), means[name])


def test_tau_zero_is_the_mean_and_restore_on_exception():
    params = _params()
    post = _posterior(params)
    means = {n: p.detach().clone() for n, p in params.items()}
    with post.sampled(params, tau=0.0, generator=torch.Generator().manual_seed(0)):
        assert all(torch.equal(p.detach(), means[n]) for n, p in params.items())
    with pytest.raises(RuntimeError, match="boom"), post.sampled(params, 1.0, torch.Generator().manual_seed(0)):
        assert not torch.equal(params["a"].detach(), means["a"])
        raise RuntimeError("boom")
    assert all(torch.equal(p.detach(), means[n]) for n, p in params.items())


def test_same_generator_seed_gives_the_same_sample():
    params = _params()
    post = _posterior(params)
    seen = []
    for _ in range(2):
        with post.sampled(params, 1.0, torch.Generator().manual_seed(5)):
            seen.append(params["b"].detach().clone())
    assert torch.equal(seen[0], seen[1])


def test_save_load_round_trip_and_mismatch_errors(tmp_path):
    params = _params()
    post = _posterior(params)
    post.save(tmp_path)
    loaded = Posterior.load(tmp_path)
    assert loaded.ess == post.ess and loaded.weight_decay == post.weight_decay
    assert all(torch.equal(loaded.std[n], post.std[n]) and torch.equal(loaded.hess[n], post.hess[n]) for n in params)
    with pytest.raises(ValueError, match="missing"):
        loaded.check_matches({"a": params["a"]} | {"c": params["b"]})
    with pytest.raises(ValueError, match="has shape"):
        loaded.check_matches({"a": params["a"], "b": torch.nn.Parameter(torch.zeros(31))})
    with pytest.raises(ValueError, match="tau"):
        with loaded.sampled(params, 1.5, torch.Generator()):
            pass
    with pytest.raises(FileNotFoundError, match="trained with IVON"):
        Posterior.load(tmp_path / "nowhere")


def test_a_damaged_posterior_file_names_itself(tmp_path):
    (tmp_path / "posterior.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    with pytest.raises(ValueError, match="posterior.safetensors is unreadable"):
        Posterior.load(tmp_path)
