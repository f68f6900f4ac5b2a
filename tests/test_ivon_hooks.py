"""IVON's API for loops run by frameworks: begin_sample/end_sample and draw_noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_ivon import assert_same, batch, mlp, snapshot
from varlora import IVON

OPTIONS = dict(lr=0.05, ess=100.0, hess_init=0.5, beta2=0.99, mc_samples=2)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def test_begin_end_equals_the_context():
    x, y = batch(dtype=torch.float32)
    runs = []
    for explicit in (False, True):
        torch.manual_seed(3)
        model = mlp(dtype=torch.float32)
        opt = IVON(model.parameters(), **OPTIONS)
        for _ in range(3):
            for _ in range(opt.mc_samples):
                if explicit:
                    opt.begin_sample(train=True, max_grad_norm=0.5)
                    _loss(model, x, y).backward()
                    opt.end_sample()
                else:
                    with opt.sampled_params(train=True, max_grad_norm=0.5):
                        _loss(model, x, y).backward()
            opt.step()
        runs.append(snapshot(model, opt))
    assert_same(*runs)


def test_discarded_sample_restores_and_does_not_count():
    model = mlp()
    opt = IVON(model.parameters(), **OPTIONS)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    opt.begin_sample(train=True)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    _loss(model, x, y).backward()
    opt.end_sample(discard=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(RuntimeError, match="after 0 sampled_params"):
        opt.step()


def test_begin_end_misuse_raises():
    opt = IVON(mlp().parameters(), **OPTIONS)
    with pytest.raises(RuntimeError, match="without an open begin_sample"):
        opt.end_sample()
    opt.begin_sample()
    with pytest.raises(RuntimeError, match="while a sample is open"):
        opt.begin_sample()
    with pytest.raises(RuntimeError, match="inside sampled_params"):
        opt.state_dict()
    opt.end_sample()
    with opt.sampled_params(), pytest.raises(RuntimeError, match="while a sample is open"):
        opt.begin_sample()


def test_draw_noise_is_the_sample_and_resumes():
    model = mlp()
    model[0].bias.requires_grad_(False)  # not sampled: draw_noise skips it
    opt = IVON(model.parameters(), **OPTIONS)
    opt.draw_noise()  # the noise generator is created, and seeded, on the first draw
    saved = opt.state_dict()
    eps = opt.draw_noise()
    sampled = [p for p in model.parameters() if p.requires_grad]
    assert [e.shape for e in eps] == [p.shape for p in sampled]
    assert all(e.dtype == torch.float64 for e in eps)
    means = [p.detach().clone() for p in sampled]
    stds = [opt.posterior_std(p) for p in sampled]
    with opt.sampled_params(noise=eps):
        for p, m, s, e in zip(sampled, means, stds, eps, strict=True):
            torch.testing.assert_close(p.detach(), m + s * e, rtol=0, atol=1e-12)
    opt.load_state_dict(saved)  # the noise stream is part of the state
    again = opt.draw_noise()
    assert all(torch.equal(a, b) for a, b in zip(eps, again, strict=True))
    assert not torch.equal(opt.draw_noise()[0], eps[0])
