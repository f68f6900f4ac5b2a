"""BLoB: the flipout LoRA variant, its closed-form KL and the KL reweighting (the method itself: test_blob_method)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_llama
from varlora.methods._blob_math import kl_period, kl_weight
from varlora.methods._flipout import BlobPosterior, FixedFlipout, gaussian_kl, lora_a_modules


def tiny_peft(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    model = get_peft_model(tiny_llama(seed, dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model


def ids(batch: int = 2, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- KL -------------------------------------------------------------------------------------------------
def test_gaussian_kl_equals_closed_form():
    torch.manual_seed(0)
    mu = torch.randn(4, 7, dtype=torch.float64)
    sigma = torch.rand(4, 7, dtype=torch.float64) * 0.3 + 0.01
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(torch.zeros_like(mu), 0.2)).sum()
    torch.testing.assert_close(gaussian_kl(mu, sigma, 0.2), expected, rtol=1e-12, atol=1e-12)
    # by hand, one element
    m, s, b = 0.3, 0.05, 0.2
    assert gaussian_kl(torch.tensor([m]), torch.tensor([s]), b).item() == pytest.approx(
        math.log(b / s) + (s * s + m * m) / (2 * b * b) - 0.5, rel=1e-6)


def test_gaussian_kl_at_zero_variance_is_finite_and_ignores_sigma():
    mu = torch.tensor([0.1, -0.2], requires_grad=True)
    rho = torch.zeros(2, requires_grad=True)
    kl = gaussian_kl(mu, rho.square(), 0.2)
    kl.backward()
    assert torch.isfinite(kl)
    assert torch.equal(rho.grad, torch.zeros(2))
    torch.testing.assert_close(mu.grad, (mu / 0.04).detach())


def test_posterior_kl_sums_over_every_lora_a():
    model = tiny_peft()
    post = BlobPosterior(model, init_eps=0.05, generator=torch.Generator().manual_seed(0))
    expected = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(module.weight.double(), post.rho_of(name).double() ** 2),
            torch.distributions.Normal(0.0, 0.2)).sum()
        for name, module in lora_a_modules(model).items())
    assert len(post.names) == 4  # q_proj, v_proj in 2 layers
    torch.testing.assert_close(post.kl(0.2), expected)


# ---- the layer variant ----------------------------------------------------------------------------------
def test_rho_init_is_seeded_and_in_range():
    model = tiny_peft()
    a = BlobPosterior(model, init_eps=0.05, generator=torch.Generator().manual_seed(3))
    a.remove()
    b = BlobPosterior(model, init_eps=0.05, generator=torch.Generator().manual_seed(3))
    for name in a.names:
        rho = a.rho_of(name)
        assert rho.shape == lora_a_modules(model)[name].weight.shape
        assert rho.min() >= 0.05 / math.sqrt(2) and rho.max() <= 0.05
        assert torch.equal(rho, b.rho_of(name))
    assert len(list(b.parameters())) == len(b.names)  # only ρ: the model's weights are not registered here


def test_mean_mode_is_plain_lora_and_model_state_dict_unchanged():
    model = tiny_peft()
    x = ids()
    keys = set(model.state_dict())
    plain = model(x).logits
    post = BlobPosterior(model, init_eps=0.05)
    assert set(model.state_dict()) == keys  # ρ lives outside the model: save_pretrained is untouched
    with post.using("mean"):
        torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=0)
    with post.using("sample", torch.Generator().manual_seed(0)):
        assert not torch.allclose(model(x).logits, plain)
    post.remove()
    torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=0)


def test_sampling_is_reproducible_from_its_generator_and_leaves_global_rng_alone():
    model = tiny_peft()
    post = BlobPosterior(model, init_eps=0.05)
    x = ids()
    torch.manual_seed(123)
    with post.using("sample", torch.Generator().manual_seed(7)):
        first = model(x).logits
        second = model(x).logits  # a new ΔA and new signs per forward
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    with post.using("sample", torch.Generator().manual_seed(7)):
        again = model(x).logits
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_flipout_term_matches_formula():
    """The hook's extra output is ((x ⊙ r) ΔAᵀ ⊙ t) with ΔA = σ ⊙ ε, the draws in the documented order."""
    model = tiny_peft()
    post = BlobPosterior(model, init_eps=0.2, generator=torch.Generator().manual_seed(0))
    name = post.names[0]
    lora_a = lora_a_modules(model)[name]
    x = torch.randn(2, 3, lora_a.in_features)
    with post.using("sample", torch.Generator().manual_seed(5)):
        out = lora_a(x)
    g = torch.Generator().manual_seed(5)
    sigma = post.rho_of(name).detach() ** 2
    delta = sigma * torch.randn(sigma.shape, generator=g)
    r = torch.empty(x.shape).bernoulli_(0.5, generator=g) * 2 - 1
    t = torch.empty(2, 3, sigma.shape[0]).bernoulli_(0.5, generator=g) * 2 - 1
    expected = x @ lora_a.weight.detach().T + ((x * r) @ delta.T) * t
    torch.testing.assert_close(out.detach(), expected)


def test_flipout_per_token_variance_matches_mean_field_gaussian():
    """Monte Carlo oracle: each output of A x has variance Σⱼ σₖⱼ² xⱼ² under A ~ N(M, σ²) (tokens of one
    forward share ΔA, so the draws come from many forwards)."""
    model = tiny_peft()
    post = FixedFlipout(model)
    name = post.names[0]
    lora_a = lora_a_modules(model)[name]
    sigma = torch.rand(lora_a.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    post.set_std({n: (sigma if n == name else torch.zeros(1)) for n in post.names})
    x = torch.randn(1, lora_a.in_features, generator=torch.Generator().manual_seed(2)).expand(20, -1)
    with torch.no_grad(), post.using("sample", torch.Generator().manual_seed(3)):
        draws = torch.stack([lora_a(x) for _ in range(2000)]).reshape(-1, sigma.shape[0])  # per-token draws
    mean = x[0] @ lora_a.weight.detach().T
    var = (sigma.square() * x[0].square()).sum(1)
    torch.testing.assert_close(draws.mean(0), mean, atol=4 * (var / draws.shape[0]).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(draws.var(0), var, rtol=0.05, atol=0)


def test_dropout_mask_is_shared_by_mean_and_noise():
    """With LoRA dropout, the noise term uses the same dropped input as A x (peft drops before lora_A)."""
    model = tiny_peft(dropout=0.5).train()
    post = FixedFlipout(model)
    post.set_std({n: torch.zeros(1) for n in post.names})  # σ = 0: the hook adds exactly zero
    x = ids()
    torch.manual_seed(0)
    with post.using("sample", torch.Generator().manual_seed(0)):
        hooked = model(x).logits
    post.remove()
    torch.manual_seed(0)
    assert torch.equal(model(x).logits, hooked)  # same dropout masks: the hook drew only from its generator


def test_gradients_reach_rho_only_when_sampling():
    model = tiny_peft()
    post = BlobPosterior(model, init_eps=0.05)
    x = ids()
    with post.using("sample", torch.Generator().manual_seed(0)):
        model(x).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in post.rho.values())
    post.zero_grad(set_to_none=True)
    with post.using("mean"):
        model(x).logits.square().mean().backward()
    assert all(p.grad is None for p in post.rho.values())


def test_no_lora_layers_is_an_error():
    with pytest.raises(ValueError, match="no peft LoRA linear layers"):
        BlobPosterior(tiny_llama(), init_eps=0.05)


def test_using_rejects_unknown_mode():
    post = FixedFlipout(tiny_peft())
    with pytest.raises(ValueError, match="mode"), post.using("noise"):  # type: ignore[arg-type]
        pass


# ---- KL reweighting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("period", [1, 3, 50, 700, 2000])
def test_blundell_weights_match_the_paper_and_cycle(period):
    exact = [Fraction(2**i, 2 ** (period + 1) - 1) for i in range(1, period + 1)]
    got = [kl_weight(step, period) for step in range(period)]
    for g, e in zip(got, exact, strict=True):
        assert g == pytest.approx(float(e), rel=1e-15, abs=1e-300)  # subnormals underflow to 0
    assert math.fsum(got) == pytest.approx(1 - 1 / (2 ** (period + 1) - 1), rel=1e-12)
    assert kl_weight(period, period) == got[0] and kl_weight(2 * period - 1, period) == got[-1]


def test_uniform_weight_and_period():
    assert kl_weight(17, 50, "uniform") == 1 / 50
    assert kl_period(200, 4, dataset_rescaling=False) == 50
    assert kl_period(201, 4, dataset_rescaling=False) == 51
    assert kl_period(2251, 4, dataset_rescaling=True) == int(100 * 2251 ** (math.pi / 8) / 4)  # ARC-E: 518
    with pytest.raises(ValueError, match="kind"):
        kl_weight(0, 5, "cosine")  # type: ignore[arg-type]
