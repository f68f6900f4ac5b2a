"""Kronecker-factored Laplace approximation over LoRA weights (Laplace-LoRA, Yang et al., ICLR 2024).

The core of the ``laplace`` method, independent of the harness: it needs only a function ``model_fn(batch)``
returning choice logits f of shape (B, K) (softmax likelihood over the K choices), the LoRA ``nn.Linear``
layers (no bias) whose weights get the posterior, and ``batch["labels"]``.

Curvature (K-FAC of the exact GGN, "expand" treatment of weight sharing). A LoRA layer with weight
W (out, in) sees many token positions t per example n, with input a_{n,t} and output gradient g_{n,t}. For the
softmax likelihood the loss Hessian in f is Λ = diag(p) − p pᵀ = L Lᵀ with columns L_c = √p_c (e_c − p), so one
backward pass per class c of v = L_c gives g_{n,t,c}, and the GGN block of W is approximated by

    GGN_W ≈ G ⊗ A,   G = Σ_{n,t,c} g gᵀ   (out, out),   A = (1 / T) Σ_{n,t} a aᵀ   (in, in),

with T the number of (non-padding) positions summed over (Eschenhagen et al., NeurIPS 2023, "expand"; for one
position per example this is the usual K-FAC with A averaged over the N examples, as in laplace-torch). W is
flattened row-major, so vec(W) index o·in + i; the Kronecker factor order (G, A) is laplace-torch's.

Posterior. Precision P = G ⊗ A + δ I per layer (δ the scalar prior precision, shared by all layers), kept as
eigendecompositions G = Q_G diag(λ_G) Q_Gᵀ, A = Q_A diag(λ_A) Q_Aᵀ: P's eigenvalues are λ_G λ_Aᵀ + δ.

Prior precision by the Laplace marginal likelihood (MacKay; laplace-torch's ``log_marginal_likelihood``):

    log Z(δ) = log p(D | θ*) − ½ [Σ log(λ_G λ_Aᵀ + δ) − P log δ + δ ‖θ*‖²],

with P the number of weights and θ* the MAP LoRA weights. Its derivative in δ is
½ [Σ λ/(δ(λ + δ)) − ‖θ*‖²], strictly decreasing in δ, so log Z has one maximum; :meth:`KronLaplace.
optimize_prior_precision` finds it by a grid in log δ refined by golden-section search (laplace-torch runs
100 Adam steps on log δ instead; same objective). At the maximum MacKay's fixed point holds:
Σ λ/(λ + δ) = δ ‖θ*‖² (effective number of parameters).

Predictive: the linearised (GLM) model f(x) ~ N(f*(x), J Σ Jᵀ), J = ∂f/∂θ at θ*, computed per layer in the
eigenbasis: J̃ = Q_Gᵀ J_W Q_A, (J Σ Jᵀ)_{kl} = Σ_{W} Σ_{o,i} J̃_k[o,i] J̃_l[o,i] / (λ_G[o] λ_A[i] + δ).
Per-example Jacobians come from the same hooks (J_W = Σ_t g_t a_tᵀ over the example's positions), with one
backward pass per class. Then either probit, softmax(f / √(1 + π/8 diag(JΣJᵀ))), or Monte Carlo: the mean of
softmax over samples of f.

Precision and placement. The factors are summed in the weights' dtype promoted to at least float32 (float32 for a
bf16 or float32 model, float64 for a float64 one), on the weights' device when they fit there
(:func:`factor_device`), and decomposed there; the posterior stays where the model is (:meth:`KronLaplace.to`), so
neither the curvature pass nor an evaluation batch copies a factor between host and device. The scalar quantities
of the prior fit (log Z, γ) are always float64, from a float64 copy of the eigenvalues.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KronLaplace", "LinkApprox", "Subset", "factor_device", "fit_kron_laplace", "glm_moments", "glm_probs",
           "lora_layers", "validation_prior_precision"]

Batch = Mapping[str, Tensor]
ModelFn = Callable[[Batch], Tensor]
Subset = Literal["all", "last_layer"]
LinkApprox = Literal["probit", "mc"]

_LORA_NAME = re.compile(r"\.lora_[AB]\.[^.]+$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_MISSING = -1e4  # finite stand-in for the -inf logits of missing choices: softmax gives exactly 0 there


def lora_layers(model: nn.Module, subset: Subset = "all") -> dict[str, nn.Linear]:
    """The trainable LoRA ``nn.Linear`` layers (``lora_A`` and ``lora_B``) of a peft model, by module name.

    ``subset="last_layer"``: the LoRA layers of ``lm_head`` if it is adapted, else those of the last
    transformer block (the highest ``layers.<i>`` index) that has any.
    """
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and _LORA_NAME.search(name) and m.weight.requires_grad
    }
    if not layers:
        raise ValueError("the model has no trainable LoRA layers (lora_A / lora_B nn.Linear modules)")
    for name, m in layers.items():
        if m.bias is not None and m.bias.requires_grad:
            raise ValueError(f"LoRA layer {name} has a trainable bias; the Kronecker posterior covers weights only")
    if subset == "all":
        return layers
    if subset != "last_layer":
        raise ValueError(f"subset must be 'all' or 'last_layer', got {subset!r}")
    head = {n: m for n, m in layers.items() if ".lm_head." in n}
    if head:
        return head
    indexed = {n: int(mt.group(1)) for n in layers if (mt := _LAYER_INDEX.search(n))}
    if not indexed:
        raise ValueError("last_layer: no LoRA layer under lm_head or under a numbered transformer block")
    last = max(indexed.values())
    return {n: layers[n] for n, i in indexed.items() if i == last}


# ---- capturing layer inputs and outputs -----------------------------------------------------------------
class _Capture:
    """Forward hooks keeping, for each call of each layer, its input (detached) and its output tensor."""

    def __init__(self, layers: Mapping[str, nn.Linear]) -> None:
        self.layers = layers
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
        self._handles: list = []

    def _hook(self, name: str, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.calls[name].append((inputs[0].detach(), output))

    def __enter__(self) -> _Capture:
        self._handles = [m.register_forward_hook(partial(self._hook, n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def records(self) -> list[tuple[str, Tensor, Tensor]]:
        """(layer name, input, output) of every call, in a fixed order."""
        return [(name, x, out) for name, calls in self.calls.items() for x, out in calls]


def _rows(x: Tensor) -> Tensor:
    """(rows, positions, features): a (rows, d) input is one position per row."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _position_mask(batch: Batch, rows: int, positions: int) -> Tensor | None:
    """The batch's 2-D ``*mask`` tensor of shape (rows, positions), if exactly one fits; None otherwise."""
    fits = [
        v for k, v in batch.items()
        if k.endswith("mask") and isinstance(v, Tensor) and v.dim() == 2 and tuple(v.shape) == (rows, positions)
    ]
    if len(fits) == 1 or (fits and all(torch.equal(fits[0], f) for f in fits[1:])):
        return fits[0]
    return None


def _finite(f: Tensor) -> tuple[Tensor, Tensor]:
    """Logits with missing choices (-inf) replaced by a large finite negative, and the mask of present ones."""
    present = torch.isfinite(f)
    return f.masked_fill(~present, _MISSING), present


# ---- fitting --------------------------------------------------------------------------------------------
@dataclass
class KronLaplace:
    """A Kronecker-factored Laplace posterior over the weights of named Linear layers.

    Attributes:
        eig: per layer, (λ_G (out,), Q_G (out, out), λ_A (in,), Q_A (in, in)), eigenvalues ≥ 0, in the dtype and on
            the device the factors were summed in (:meth:`to` moves them).
        map_sq_norm: ‖θ*‖², the squared norm of the MAP weights of these layers.
        n_params: P, the number of weights.
        n_data: N, the training examples the curvature was summed over.
        log_lik: log p(D | θ*), the summed log-likelihood of those examples at the MAP.
        prior_precision: δ.
    """

    eig: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]
    map_sq_norm: float
    n_params: int
    n_data: int
    log_lik: float
    prior_precision: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_factors(
        cls,
        factors: Mapping[str, tuple[Tensor, Tensor]],
        weights: Mapping[str, Tensor],
        n_data: int,
        log_lik: float,
        prior_precision: float = 1.0,
    ) -> KronLaplace:
        """From Kronecker factors (G, A) per layer and the MAP weights (out, in) of the same layers; the
        eigendecompositions are computed in the factors' dtype on their device."""
        eig = {}
        for name, (G, A) in factors.items():
            lg, qg = torch.linalg.eigh(G)
            la, qa = torch.linalg.eigh(A)
            # contiguous: a reloaded posterior has the same memory layout, hence bit-identical matmuls
            eig[name] = (lg.clamp_min(0), qg.contiguous(), la.clamp_min(0), qa.contiguous())
        sq = float(sum(weights[n].detach().double().pow(2).sum().cpu() for n in factors))
        n_params = sum(weights[n].numel() for n in factors)
        return cls(eig, sq, n_params, n_data, float(log_lik), float(prior_precision))

    def eigenvalues(self, name: str) -> Tensor:
        """λ_G λ_Aᵀ (out, in): the eigenvalues of layer ``name``'s G ⊗ A, arranged like its weight (the
        posterior's dtype and device)."""
        lg, _, la, _ = self.eig[name]
        return lg[:, None] * la[None, :]

    def _eigenvalues64(self, name: str) -> Tensor:
        """:meth:`eigenvalues` in float64 on the host, copied once: the prior fit evaluates log Z ~100 times."""
        if name not in self._cache:
            lg, _, la, _ = self.eig[name]
            self._cache[name] = lg.double().cpu()[:, None] * la.double().cpu()[None, :]
        return self._cache[name]

    def to(self, device: torch.device | str) -> KronLaplace:
        """This posterior with its eigendecompositions on ``device`` (the model's: the predictive multiplies
        them with the layers' activations and gradients)."""
        eig = {n: tuple(t.to(device) for t in e) for n, e in self.eig.items()}
        return KronLaplace(eig, self.map_sq_norm, self.n_params, self.n_data, self.log_lik, self.prior_precision)

    def log_marglik(self, prior_precision: float | Tensor | None = None) -> Tensor:
        """log Z(δ) (see the module docstring); ``prior_precision`` may be a 1-D tensor of values."""
        delta = torch.as_tensor(self.prior_precision if prior_precision is None else prior_precision,
                                dtype=torch.float64)
        d = delta.reshape(-1, 1)  # (D, 1)
        logdet = sum(torch.log(self._eigenvalues64(n).reshape(1, -1) + d).sum(-1) for n in self.eig)  # (D,)
        value = self.log_lik - 0.5 * (logdet - self.n_params * torch.log(d[:, 0]) + d[:, 0] * self.map_sq_norm)
        return value.reshape(delta.shape)

    def optimize_prior_precision(self, log_lo: float = -20.0, log_hi: float = 25.0, n_grid: int = 91) -> float:
        """Set δ to the maximiser of :meth:`log_marglik` (unique; grid over ln δ ∈ [log_lo, log_hi], then
        golden-section search between the best point's neighbours) and return it."""
        grid = torch.linspace(log_lo, log_hi, n_grid, dtype=torch.float64)
        best = int(self.log_marglik(grid.exp()).argmax())
        lo, hi = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, n_grid - 1)])
        inv_phi = (math.sqrt(5) - 1) / 2

        def value(t: float) -> float:
            return float(self.log_marglik(math.exp(t)))

        c, d = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        fc, fd = value(c), value(d)
        while hi - lo > 1e-10:
            if fc > fd:
                hi, d, fd = d, c, fc
                c = hi - inv_phi * (hi - lo)
                fc = value(c)
            else:
                lo, c, fc = c, d, fd
                d = lo + inv_phi * (hi - lo)
                fd = value(d)
        self.prior_precision = math.exp((lo + hi) / 2)
        return self.prior_precision

    def effective_params(self, prior_precision: float | None = None) -> float:
        """γ = Σ λ / (λ + δ): MacKay's effective number of parameters (= δ ‖θ*‖² at the optimal δ)."""
        delta = self.prior_precision if prior_precision is None else prior_precision
        return float(sum((lam / (lam + delta)).sum() for lam in map(self._eigenvalues64, self.eig)))

    # ---- saving ---------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, (lg, qg, la, qa) in self.eig.items():
            out |= {f"{name}.eigvals_G": lg, f"{name}.eigvecs_G": qg, f"{name}.eigvals_A": la,
                    f"{name}.eigvecs_A": qa}
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {"map_sq_norm": repr(self.map_sq_norm), "n_params": str(self.n_params), "n_data": str(self.n_data),
                "log_lik": repr(self.log_lik), "prior_precision": repr(self.prior_precision),
                "layers": ",".join(self.eig)}

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> KronLaplace:
        names = metadata["layers"].split(",")
        eig = {n: tuple(tensors[f"{n}.{k}"] for k in ("eigvals_G", "eigvecs_G", "eigvals_A", "eigvecs_A"))
               for n in names}
        return cls(eig, float(metadata["map_sq_norm"]), int(metadata["n_params"]), int(metadata["n_data"]),
                   float(metadata["log_lik"]), float(metadata["prior_precision"]))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.eig.values() for t in e)


def factor_dtype(layers: Mapping[str, nn.Linear]) -> torch.dtype:
    """The dtype the factors are summed in: the weights' promoted to at least float32."""
    return torch.promote_types(next(iter(layers.values())).weight.dtype, torch.float32)


def factor_device(layers: Mapping[str, nn.Linear], dtype: torch.dtype) -> torch.device:
    """Where the factors of ``layers`` are summed: the weights' device, unless that is a GPU on which the factors
    (out² + in² entries per layer in ``dtype``) would take more than half of the free memory; then the host, which
    receives each batch's contribution once per layer."""
    device = next(iter(layers.values())).weight.device
    if device.type != "cuda":
        return device
    need = sum(m.out_features**2 + m.in_features**2 for m in layers.values()) * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    return device if need <= free // 2 else torch.device("cpu")


def fit_kron_factors(
    model_fn: ModelFn, layers: Mapping[str, nn.Linear], batches: Iterable[Batch], dtype: torch.dtype | None = None
) -> tuple[dict[str, tuple[Tensor, Tensor]], int, float]:
    """K-FAC factors (G, A) of the exact GGN of the summed softmax cross-entropy, per layer, with the number of
    examples and their summed log-likelihood. One forward and K backward passes per batch. The factors are
    summed in ``dtype`` (default :func:`factor_dtype`) on :func:`factor_device`."""
    dtype = factor_dtype(layers) if dtype is None else dtype
    home = factor_device(layers, dtype)
    G = {n: torch.zeros(m.out_features, m.out_features, dtype=dtype, device=home) for n, m in layers.items()}
    A = {n: torch.zeros(m.in_features, m.in_features, dtype=dtype, device=home) for n, m in layers.items()}
    positions = dict.fromkeys(layers, 0.0)
    n_data, log_lik = 0, torch.zeros((), dtype=torch.float64)
    for batch in batches:
        with torch.enable_grad(), _Capture(layers) as cap:
            f, _ = _finite(model_fn(batch))  # (B, K)
        records = cap.records()
        y = batch["labels"].to(f.device)
        log_lik = log_lik - F.cross_entropy(f.detach().double(), y, reduction="sum").cpu()
        for name, x, _ in records:
            a = _rows(x).to(dtype)  # (rows, T, in)
            mask = _position_mask(batch, a.shape[0], a.shape[1])
            if mask is not None:
                a = a * mask.to(a.device, a.dtype)[..., None]
                positions[name] += float(mask.sum())
            else:
                positions[name] += a.shape[0] * a.shape[1]
            A[name] += torch.einsum("rti,rtj->ij", a, a).to(home)
        p = f.detach().softmax(-1)  # (B, K)
        K = f.shape[1]
        outputs = [out for _, _, out in records]
        for c in range(K):
            if not bool((p[:, c] > 0).any()):
                continue
            v = p[:, c : c + 1].sqrt() * (F.one_hot(torch.tensor(c), K).to(p) - p)  # column c of √Λ  (B, K)
            grads = torch.autograd.grad(f, outputs, grad_outputs=v, retain_graph=c < K - 1, allow_unused=True)
            for (name, _, _), g in zip(records, grads, strict=True):
                if g is not None:
                    g = _rows(g).to(dtype)  # (rows, T, out)
                    G[name] += torch.einsum("rto,rtp->op", g, g).to(home)
        n_data += f.shape[0]
    factors = {n: (G[n], A[n] / max(positions[n], 1.0)) for n in layers}
    return factors, n_data, float(log_lik)


def fit_kron_laplace(
    model_fn: ModelFn, layers: Mapping[str, nn.Linear], batches: Iterable[Batch], prior_precision: float = 1.0,
    optimize: bool = True, dtype: torch.dtype | None = None,
) -> KronLaplace:
    """Fit the K-FAC posterior of ``layers`` on ``batches`` (factors in ``dtype``, :func:`fit_kron_factors`) and
    (``optimize``) its prior precision by marginal likelihood."""
    factors, n_data, log_lik = fit_kron_factors(model_fn, layers, batches, dtype)
    weights = {n: m.weight for n, m in layers.items()}
    la = KronLaplace.from_factors(factors, weights, n_data, log_lik, prior_precision)
    if optimize:
        la.optimize_prior_precision()
    return la


_MC_CHUNK = 4096  # logit draws per chunk of the Monte Carlo predictive


# ---- predictive -----------------------------------------------------------------------------------------
def glm_moments(
    model_fn: ModelFn, layers: Mapping[str, nn.Linear], la: KronLaplace, batch: Batch,
    prior_precisions: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean f* (B, K) (-inf for missing choices) and covariance J Σ Jᵀ (B, K, K) of the linearised logits,
    float64 on the CPU. One forward and K backward passes; the Jacobians are in the posterior's dtype, on the
    model's device (where the posterior should be: :meth:`KronLaplace.to`), and the covariance is summed in float64
    there and copied to the host once.

    ``prior_precisions``: D values of δ; the covariance is then (D, B, K, K), one per δ, from the same Jacobians
    (the validation fit of δ, :func:`validation_prior_precision`)."""
    with torch.enable_grad(), _Capture(layers) as cap:
        raw = model_fn(batch)
    f, present = _finite(raw)
    B, K = f.shape
    records = [(n, x, out) for n, x, out in cap.records() if n in la.eig]
    dtype = next(iter(la.eig.values()))[1].dtype
    tilde_a = []
    for name, x, _ in records:
        a = _rows(x).to(dtype)  # (rows, T, in)
        if a.shape[0] % B:
            raise ValueError(f"layer {name}: {a.shape[0]} rows is not a multiple of the batch size {B}")
        qa = la.eig[name][3].to(a.device)
        tilde_a.append((a @ qa).reshape(B, -1, a.shape[-1]))  # (B, S, in), rows of one example adjacent
    Jt = {n: torch.zeros(K, B, *la.eigenvalues(n).shape, dtype=dtype, device=f.device) for n in la.eig}
    outputs = [out for _, _, out in records]
    for k in range(K):
        v = F.one_hot(torch.tensor(k), K).to(f).expand(B, K)
        grads = torch.autograd.grad(f, outputs, grad_outputs=v, retain_graph=k < K - 1, allow_unused=True)
        for (name, _, _), at, g in zip(records, tilde_a, grads, strict=True):
            if g is not None:
                g = _rows(g).to(dtype) @ la.eig[name][1].to(g.device)  # (rows, T, out)
                Jt[name][k] += torch.einsum("bso,bsi->boi", g.reshape(B, -1, g.shape[-1]), at)
    deltas = [la.prior_precision] if prior_precisions is None else list(prior_precisions)
    var = torch.zeros(len(deltas), B, K, K, dtype=torch.float64, device=f.device)
    for name, jt in Jt.items():
        lam = la.eigenvalues(name).to(jt.device)  # (out, in)
        for d, delta in enumerate(deltas):
            var[d] += torch.einsum("kboi,oi,lboi->bkl", jt, 1.0 / (lam + delta), jt).double()
    mean = f.detach().double().masked_fill(~present, float("-inf"))
    return mean.cpu(), (var[0] if prior_precisions is None else var).cpu()


def glm_probs(
    mean: Tensor, var: Tensor, link: LinkApprox = "probit", n_samples: int = 10,
    generator: torch.Generator | None = None, keep: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Predictive probabilities (B, K) of f ~ N(mean, var), and for ``"mc"`` the per-sample ones of the first
    ``keep`` draws (default: all ``n_samples``), (keep, B, K).

    probit: softmax(mean / √(1 + π/8 diag(var))) (laplace-torch's multi-class probit). mc: mean over S draws
    of softmax(f), f = mean + V √w ε with var = V diag(w) Vᵀ, ε ~ N(0, I) from ``generator`` (CPU, float64),
    drawn in chunks so that S = 100,000 (the Laplace-LoRA reference's count) needs no (S, B, K) tensor.
    """
    if link == "probit":
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8 * var.diagonal(dim1=-2, dim2=-1))
        return torch.softmax(mean * kappa, -1), None
    if link != "mc":
        raise ValueError(f"link must be 'probit' or 'mc', got {link!r}")
    keep = n_samples if keep is None else keep
    if not 1 <= keep <= n_samples:
        raise ValueError(f"keep must be in [1, n_samples = {n_samples}], got {keep}")
    present = torch.isfinite(mean)
    w, V = torch.linalg.eigh(var)
    root = V * w.clamp_min(0).sqrt()[:, None, :]  # (B, K, K)
    centre = mean.masked_fill(~present, 0.0)
    total, kept, done = torch.zeros_like(centre), [], 0
    while done < n_samples:
        size = min(max(_MC_CHUNK, keep), n_samples - done)
        eps = torch.randn((size, *mean.shape), generator=generator, dtype=torch.float64)  # (S, B, K)
        f = centre + torch.einsum("bkj,sbj->sbk", root, eps)
        sample_probs = torch.softmax(f.masked_fill(~present, float("-inf")), -1)
        total += sample_probs.sum(0)
        if done < keep:
            kept.append(sample_probs[: keep - done])
        done += size
    return total / n_samples, torch.cat(kept)


def validation_prior_precision(
    model_fn: ModelFn, layers: Mapping[str, nn.Linear], la: KronLaplace, batches: Iterable[Batch],
    grid: Sequence[float], link: LinkApprox = "mc", n_samples: int = 10_000, seed: int = 0,
) -> tuple[float, Tensor]:
    """Set δ to the value of ``grid`` whose GLM predictive (``link``; ``n_samples`` draws seeded by ``seed``, the
    same draws for every δ) has the lowest NLL on the labelled ``batches`` (held-out data, never evaluated: the
    Laplace-LoRA reference's ``optimize_prior_precision(method='CV', link_approx='mc')`` on 20% of the training
    split held out), and return it with the mean NLL at every grid point (D,). One forward and K backward passes
    per batch, whatever the grid's size. Ties go to the larger δ (the predictive closer to the MAP's)."""
    grid = [float(d) for d in grid]
    if not grid or min(grid) <= 0:
        raise ValueError(f"grid must hold prior precisions > 0, got {grid}")
    nll, n = torch.zeros(len(grid), dtype=torch.float64), 0
    for batch in batches:
        mean, var = glm_moments(model_fn, layers, la, batch, prior_precisions=grid)  # (B, K), (D, B, K, K)
        y = batch["labels"].cpu()
        for d in range(len(grid)):
            probs, _ = glm_probs(mean, var[d], link, n_samples, torch.Generator().manual_seed(seed), keep=1)
            nll[d] -= probs[torch.arange(len(y)), y].clamp_min(1e-300).log().sum()
        n += len(y)
    if not n:
        raise ValueError("validation_prior_precision: no held-out examples")
    nll /= n
    best = max(range(len(grid)), key=lambda d: (-float(nll[d]), grid[d]))
    la.prior_precision = grid[best]
    return la.prior_precision, nll
