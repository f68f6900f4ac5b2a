"""TFB: the SVD reparameterisation and the σ search (the method itself: test_tfb_method)."""

from __future__ import annotations

import pytest
import torch

from varlora.methods._tfb_math import row_std, search_sigma, svd_reparameterise


def test_svd_reparameterisation_keeps_the_update_and_makes_noise_isotropic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 9, generator=g, dtype=torch.float64)
    b = torch.randn(6, 4, generator=g, dtype=torch.float64)
    a_rot, b_rot, d = svd_reparameterise(a, b)
    torch.testing.assert_close(b_rot @ a_rot, b @ a)
    torch.testing.assert_close(b_rot.T @ b_rot, torch.diag(d.double() ** 2))  # B′ = U diag(d): orthogonal columns
    # noise on A′ with row std σ_q / dᵢ is σ_q U Z on the update
    sigma_q = 0.03
    std = row_std(d, sigma_q, a.shape[1]).double()
    z = torch.randn(4, 9, generator=g, dtype=torch.float64)
    u = b_rot / d.double()
    torch.testing.assert_close(b_rot @ (std * z), sigma_q * u @ z, rtol=1e-6, atol=1e-9)


def test_rank_deficient_b_gets_zero_std_on_its_null_rows():
    b = torch.zeros(5, 3)
    b[:, 0] = torch.arange(5.0)
    _, b_rot, d = svd_reparameterise(torch.randn(3, 4), b)
    std = row_std(d, 0.1, 4)
    assert torch.isfinite(std).all()
    assert (std[d == 0] == 0).all() and (std[d > 0] > 0).all()


def _grid_answer(change, lo, hi, tolerance, n=20001):
    grid = torch.linspace(lo, hi, n, dtype=torch.float64).tolist()
    passing = [s for s in grid if change(s) <= tolerance]
    return max(passing) if passing else None


@pytest.mark.parametrize("boundary", [0.0123, 0.05, 0.1999, 0.5])
def test_search_returns_largest_sigma_within_tolerance(boundary):
    lo, hi, steps = 0.001, 0.2, 8

    def change(sigma):  # a smooth increasing anchor-set change crossing the tolerance at `boundary`
        return 0.003 * (sigma / boundary) ** 2

    result = search_sigma(change, lo, hi, steps, tolerance=0.003)
    assert change(result.sigma) <= 0.003
    expected = _grid_answer(change, lo, hi, 0.003)
    if boundary >= hi:
        assert result.sigma == hi and len(result.trace) == 1
    else:
        assert expected - (hi - lo) / 2**steps <= result.sigma <= expected
        assert len(result.trace) == steps + 1
        # the next bracket point above the answer fails: the answer is the largest tried σ that passes
        assert all(s <= result.sigma for s, v in result.trace if v <= 0.003)
        assert any(result.sigma < s <= result.sigma + (hi - lo) / 2**steps + 1e-15
                   for s, v in result.trace if v > 0.003)


def test_search_returns_lo_when_nothing_passes():
    result = search_sigma(lambda s: 1.0, 0.001, 0.2, 5, tolerance=0.01)
    assert result.sigma == 0.001
    assert [s for s, _ in result.trace][:2] == [0.2, pytest.approx(0.1005)]


def test_search_validates_its_range():
    with pytest.raises(ValueError, match="lo < hi"):
        search_sigma(lambda s: 0.0, 0.2, 0.1, 5, 0.01)
