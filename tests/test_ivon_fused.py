"""The fused fp32 CPU kernels: the same update as the torch path, a standard-normal generator, a safe build."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from varlora import IVON
from varlora.optim import _cpu_kernels
from varlora.optim import _functional as F

requires_kernels = pytest.mark.skipif(not _cpu_kernels.available(),
                                      reason=f"no fused kernels here: {_cpu_kernels.build_error()}")


def model32(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g)
    return x.to(dtype), torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin(), x[:, 3] - x[:, 4]], 1).to(dtype)


def groups(model: nn.Module) -> list[dict]:
    """Groups that exercise every branch of the kernels: weight decay on and off, price and gradsq,
    clipping active and off, debias off, lerp weights on both sides of 1/2."""
    first, second = model[0], model[2]
    return [
        {"params": [first.weight], "weight_decay": 0.0, "clip_radius": 0.05},
        {"params": [first.bias], "hess_approx": "gradsq", "debias": False, "hess_init": 0.3, "beta1": 0.3},
        {"params": list(second.parameters()), "ess": 50.0, "beta2": 0.99, "rescale_lr": False, "lr": 0.02,
         "clip_radius": math.inf},
    ]


def train(fused: bool, mc_samples: int, steps: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, IVON]:
    """``steps`` steps fed the same noise whatever the path."""
    model = model32(dtype=dtype)
    opt = IVON(groups(model), lr=0.05, ess=200.0, weight_decay=1e-2, beta2=0.999, mc_samples=mc_samples,
               stats_every=1, fused=fused)
    x, y = data(dtype)
    noise_gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for _ in range(mc_samples):
            noise = [torch.randn(p.shape, generator=noise_gen).to(dtype) for p in model.parameters()]
            with opt.sampled_params(train=True, noise=noise):
                nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def state_of(model: nn.Module, opt: IVON) -> list[torch.Tensor]:
    return [t for p in model.parameters() for t in (p.detach(), opt.state[p]["hess"], opt.state[p]["momentum"])]


@requires_kernels
@pytest.mark.parametrize("mc_samples", [1, 3])
def test_fused_kernels_match_the_torch_path_to_rounding(mc_samples):
    fused_model, fused_opt = train(True, mc_samples, 12)
    torch_model, torch_opt = train(False, mc_samples, 12)
    assert fused_opt._fused(list(fused_model.parameters())) and not torch_opt._fused(list(torch_model.parameters()))
    for a, b in zip(state_of(fused_model, fused_opt), state_of(torch_model, torch_opt), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fused_stats, torch_stats = fused_opt.last_step_stats, torch_opt.last_step_stats
    assert 0.0 < torch_stats["clip_fraction"] < 1.0
    assert fused_stats["clip_fraction"] == pytest.approx(torch_stats["clip_fraction"], abs=2 / 80)
    assert fused_stats["hess_mean"] == pytest.approx(torch_stats["hess_mean"], rel=1e-5)


@requires_kernels
def test_fused_evaluation_sample_is_mean_plus_scaled_sigma_noise():
    model, opt = train(True, 1, 3)
    means = [p.detach().clone() for p in model.parameters()]
    stds = [opt.posterior_std(p) for p in model.parameters()]
    eps = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(means)]
    with opt.sampled_params(tau=0.3, noise=eps):
        for p, m, s, e in zip(model.parameters(), means, stds, eps, strict=True):
            torch.testing.assert_close(p.detach(), m + math.sqrt(0.3) * s * e, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(p.detach(), m) for p, m in zip(model.parameters(), means, strict=True))


@requires_kernels
def test_fp64_takes_the_torch_path():
    fused_model, fused_opt = train(True, 1, 4, torch.float64)
    torch_model, torch_opt = train(False, 1, 4, torch.float64)
    for a, b in zip(state_of(fused_model, fused_opt), state_of(torch_model, torch_opt), strict=True):
        assert torch.equal(a, b)


@requires_kernels
def test_bf16_runs_fused_exactly_the_phases_that_touch_only_fp32(monkeypatch):
    """The documented rule: noise and update fused (fp32 buffers, fp32 master mean), perturbation and gradient
    accumulation on the torch path (they touch the bf16 parameters and gradients)."""
    calls = []
    for name in ("fill_normal", "perturb", "accumulate", "update"):
        original = getattr(_cpu_kernels, name)
        monkeypatch.setattr(_cpu_kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = model32(dtype=torch.bfloat16)
    opt = IVON(groups(model), lr=0.05, ess=200.0, fused=True, generator=torch.Generator().manual_seed(0))
    x, y = data(torch.bfloat16)
    with opt.sampled_params(train=True):
        nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert set(calls) == {"fill_normal", "update"} and opt.state_dict()["ivon"]["noise_path"] == "fused"
    fused_model, _ = train(True, 1, 4, torch.bfloat16)
    torch_model, _ = train(False, 1, 4, torch.bfloat16)
    for a, b in zip(fused_model.parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)  # the same update to rounding


@requires_kernels
def test_fused_generator_is_standard_normal():
    n = 1 << 20
    z = torch.empty(n)
    _cpu_kernels.fill_normal(z, 12345)
    z64 = z.double()
    assert abs(z64.mean()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(z64.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z64**3).mean()) < 5 * math.sqrt(15 / n)  # skewness, var(z^3) = 15
    assert abs((z64**4).mean() - 3) < 5 * math.sqrt(96 / n)  # kurtosis, var(z^4) = 96
    # Kolmogorov-Smirnov distance to the normal CDF: 1.63/sqrt(n) is the 1% critical value
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (torch.special.ndtr(z64.sort().values) - ecdf).abs().max()
    assert ks < 1.63 / math.sqrt(n)
    assert (z64.abs() > 3).double().mean() == pytest.approx(0.0027, rel=0.05)
    # no correlation between neighbours, nor between the two normals of a Box-Muller pair (16 lanes apart)
    for lag in (1, 16, 32):
        assert abs(torch.corrcoef(torch.stack([z64[:-lag], z64[lag:]]))[0, 1]) < 5 / math.sqrt(n)
    # z^2 of a pair is exponential in their sum: a Box-Muller pair must not share its radius visibly
    sq = z64.view(-1, 32)
    assert abs(torch.corrcoef(torch.stack([sq[:, :16].flatten() ** 2, sq[:, 16:].flatten() ** 2]))[0, 1]) < 0.01


@requires_kernels
def test_fused_generator_depends_on_the_seed_alone():
    a, b, c, short = torch.empty(1000), torch.empty(1000), torch.empty(1000), torch.empty(37)
    _cpu_kernels.fill_normal(a, 1)
    _cpu_kernels.fill_normal(b, 1)
    _cpu_kernels.fill_normal(c, 2)
    _cpu_kernels.fill_normal(short, 1)
    assert torch.equal(a, b) and not torch.equal(a[:8], c[:8])
    assert torch.equal(short, a[:37])  # a shorter draw is a prefix of a longer one


@requires_kernels
def test_fused_fill_normal_is_independent_of_threads(monkeypatch):
    draws = []
    for n in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
        parts = [torch.empty(100_000), torch.empty(200_000)]
        F.fill_normal_(parts, torch.Generator().manual_seed(0), fused=True)
        draws.append(torch.cat(parts))
    assert torch.equal(draws[0], draws[1])
    assert len({round(float(c[:4].sum()), 6) for c in draws[0].view(8, -1)}) == 8  # 8 distinct substreams


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A private cache folder and an empty in-process cache; the real build is restored afterwards."""
    monkeypatch.setenv("VARLORA_CACHE", str(tmp_path / "cache"))
    _cpu_kernels._build.cache_clear()
    yield tmp_path / "cache" / "kernels"
    monkeypatch.undo()
    _cpu_kernels._build.cache_clear()


@requires_kernels
def test_kernels_are_built_once_into_the_cache(fresh_build):
    assert _cpu_kernels.available()
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    stamp = built[0].stat().st_mtime_ns
    _cpu_kernels._build.cache_clear()
    assert _cpu_kernels.available() and list(fresh_build.iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_without_a_compiler_fused_true_raises_and_auto_falls_back(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    assert not _cpu_kernels.available() and "no-such-cc" in _cpu_kernels.build_error()
    model = model32()
    with pytest.raises(_cpu_kernels.KernelBuildError, match="no C compiler 'no-such-cc'"):
        IVON(model.parameters(), lr=0.1, ess=10.0, fused=True)
    results = []
    for fused in (None, False):
        model = model32()
        opt = IVON(model.parameters(), lr=0.1, ess=10.0, fused=fused, generator=torch.Generator().manual_seed(0))
        x, y = data()
        with pytest.warns(UserWarning, match="without its fused CPU kernels") if fused is None else nullcontext():
            with opt.sampled_params(train=True):
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_a_failing_compiler_is_reported_with_its_message(fresh_build, monkeypatch, tmp_path):
    fake = tmp_path / "badcc"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
                    "echo 'fatal: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(_cpu_kernels.KernelBuildError, match="(?s)failed.*fatal: broken"):
        _cpu_kernels.load()
    assert not fresh_build.exists() or not any(p.suffix == ".so" for p in fresh_build.iterdir())


def test_invalid_fused_option_is_refused():
    with pytest.raises(ValueError, match="Invalid fused: 'yes'"):
        IVON(model32().parameters(), lr=0.1, ess=10.0, fused="yes")


@requires_kernels
def test_an_unwritable_cache_is_reported_with_the_way_out(fresh_build, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VARLORA_CACHE", str(blocker / "cache"))
    with pytest.raises(_cpu_kernels.KernelBuildError, match="set \\$VARLORA_CACHE to a writable folder"):
        _cpu_kernels.load()


# ------------------------------------------------------------------------------------------ noise path


def trained(fused, steps=2):
    model = model32()
    opt = IVON(model.parameters(), lr=0.1, ess=10.0, fused=fused, generator=torch.Generator().manual_seed(0))
    x, y = data()
    for _ in range(steps):
        with opt.sampled_params(train=True):
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


@requires_kernels
@pytest.mark.parametrize("saved", [True, False])
def test_noise_path_is_recorded_and_followed_by_an_automatic_optimizer(saved):
    model, opt = trained(saved)
    state = opt.state_dict()
    assert state["ivon"]["noise_path"] == ("fused" if saved else "torch")
    _, resumed = trained(None, steps=0)
    resumed.load_state_dict(state)
    assert resumed._noise_path == state["ivon"]["noise_path"]
    assert trained(None, steps=0)[1].state_dict()["ivon"]["noise_path"] is None  # nothing drawn yet


def test_a_fused_state_dict_without_a_compiler_refuses_then_fused_false_resumes_with_a_warning(fresh_build,
                                                                                                monkeypatch):
    _, opt = trained(False)
    state = opt.state_dict()
    state["ivon"] = {**state["ivon"], "noise_path": "fused"}  # as saved on a machine with the kernels
    monkeypatch.setenv("CC", "no-such-cc")
    _cpu_kernels._build.cache_clear()
    _, auto = trained(None, steps=0)
    with pytest.raises(RuntimeError, match=r"(?s)fused kernels' generator.*IVON\(\.\.\., fused=False\)"):
        auto.load_state_dict(state)
    _, explicit = trained(False, steps=0)
    with pytest.warns(UserWarning, match="continues on the 'torch' path"):
        explicit.load_state_dict(state)
    assert explicit.state_dict()["ivon"]["noise_path"] == "torch"
    bad = {**state, "ivon": {**state["ivon"], "noise_path": "gpu"}}
    with pytest.raises(ValueError, match="Invalid noise_path in the state dict: 'gpu'"):
        explicit.load_state_dict(bad)


# ----------------------------------------------------------------------------------- build portability


def test_arch_flags_per_architecture():
    assert _cpu_kernels.arch_flag_candidates("x86_64", "Linux") == ["-march=native"]
    assert _cpu_kernels.arch_flag_candidates("aarch64", "Linux")[0] == "-mcpu=native"
    assert _cpu_kernels.arch_flag_candidates("arm64", "Darwin") == ["-mcpu=native", "-mcpu=apple-m1"]
    assert _cpu_kernels.arch_flag_candidates("ppc64le", "Linux") == ["-mcpu=native"]


def test_flags_keep_only_what_the_compiler_accepts_silently(tmp_path):
    fake = tmp_path / "pickycc"  # accepts -mcpu=native silently, warns about -march=, rejects -fopenmp-simd
    fake.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -march=*) echo "warning: -march" >&2;; '
                    "-fopenmp-simd) exit 1;; esac; done\nexit 0\n")
    fake.chmod(0o755)
    chosen = _cpu_kernels.flags(str(fake), "riscv64", "Linux")
    assert chosen == (*_cpu_kernels.BASE_FLAGS, "-mcpu=native")
    none = tmp_path / "plaincc"  # takes no tuning flag at all: a portable build
    none.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -m*|-f*simd) exit 1;; esac; done\nexit 0\n')
    none.chmod(0o755)
    assert _cpu_kernels.flags(str(none), "x86_64", "Linux") == tuple(_cpu_kernels.BASE_FLAGS)


@requires_kernels
def test_kernels_without_glibc_vector_math_agree(fresh_build):
    """-DVL_NO_LIBMVEC (scalar libm): the generator gives the same values to rounding."""
    scalar = _cpu_kernels._compile_and_load(vector_math=False)
    _cpu_kernels._declare(scalar)
    a, b = torch.empty(4096), torch.empty(4096)
    _cpu_kernels.fill_normal(a, 99)
    scalar.vl_fill_normal(b.data_ptr(), b.numel(), 99)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    assert len(list(fresh_build.glob("*.so"))) == 2  # its own build, beside the vector one


@requires_kernels
def test_threaded_kernels_equal_single_threaded_ones(monkeypatch):
    monkeypatch.setattr(_cpu_kernels, "MIN_PER_THREAD", 100)
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        g = torch.Generator().manual_seed(0)
        shapes = [(37,), (50, 11), (300,)]
        means, gsum, hsum, mom = ([torch.randn(s, generator=g) for s in shapes] for _ in range(4))
        hess = [torch.rand(s, generator=g) + 0.1 for s in shapes]
        count = _cpu_kernels.update(means, gsum, hsum, mom, hess, num_samples=2, hess_scale=0.5, beta1=0.9,
                                    beta2=0.99, weight_decay=1e-2, radius=0.3, bias_correction=0.5, lr=0.1,
                                    price=True)
        results.append((count, [t.clone() for t in means + mom + hess]))
    assert results[0][0] == results[1][0] > 0
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
