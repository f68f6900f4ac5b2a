r"""IVON: the Improved Variational Online Newton optimizer (Shen et al., ICML 2024, arXiv:2402.17641).

:class:`IVON` is a drop-in replacement for the reference implementation ``ivon-opt`` 0.1.3 (same constructor
arguments, same update, same ``sampled_params`` usage) without its known defects: the optimizer state is kept
in fp32 (fp64 for fp64 parameters) whatever the parameter dtype, parameters may live on several devices and
may miss a gradient, sampling always restores the weights, the step counters and noise generators are part of
the ``state_dict``, gradients can be clipped or unscaled before they are consumed, and the posterior is
accessible. The math lives in :mod:`varlora.optim._functional`.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import ParamsT

from varlora.optim import _cpu_kernels, sampling
from varlora.optim import _functional as F

__all__ = ["IVON", "IVON_DEFAULTS", "NOISE_PATHS", "OWN_STATE_KEY", "ParamPosterior", "validate_ivon_hyperparameters"]

HESS_APPROXES = ("price", "gradsq")
#: How the optimizer draws its CPU fp32 training noise (recorded in the state dict, see ``IVON``).
NOISE_PATHS = ("fused", "torch")

#: The key of the optimizer's own entries (step and sample counters, generator states, noise path) in its
#: state dict, beside torch.optim's "state" and "param_groups"; saved checkpoints use it, so it never changes
#: (an on-disk key, not a branch on a method: whoever reads those entries uses this name).
OWN_STATE_KEY = "ivon"

#: The defaults of IVON's optional hyper-parameters: those of the reference implementation (``ivon-opt``) and
#: of the paper's Algorithm 1, so that ``IVON`` is a drop-in replacement. ``lr`` and ``ess`` have none.
#: Recipes for short LoRA runs choose other values on purpose (see ``varlora.config``).
IVON_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "hess_init": 1.0,
        "beta1": 0.9,
        "beta2": 0.99999,
        "weight_decay": 1e-4,
        "mc_samples": 1,
        "hess_approx": "price",
        "clip_radius": math.inf,
        "rescale_lr": True,
        "debias": True,
    }
)

# Per-group options that may be missing from groups of older checkpoints, with the value they then take.
_BACKFILL: dict[str, Any] = {"hess_approx": "price", "rescale_lr": True, "debias": True, "foreach": None}


class ParamPosterior(NamedTuple):
    """The mean-field Gaussian posterior of one parameter: :math:`q(\\theta) = \\mathcal N(m, \\sigma^2)`."""

    param: Tensor
    """The parameter itself (holds the mean, rounded to its dtype, outside ``sampled_params``)."""
    mean: Tensor
    """:math:`m` in the state dtype (fp32, fp64 for fp64 parameters); a live tensor: clone it to keep it."""
    std: Tensor
    """:math:`\\sigma = 1/\\sqrt{\\lambda (h + \\delta)}`, a fresh tensor in the state dtype."""


@dataclass
class _OpenSample:
    """Bookkeeping of the ``sampled_params`` context that is open."""

    train: bool
    params: list[Tensor]  # the sampled parameters, in optimizer order
    groups: list[int]  # index of each parameter's group
    backups: list[Tensor] | None  # per parameter: its value before the perturbation; None when τ = 0
    noises: list[Tensor] | None  # per parameter: η = ε/√(h+δ); None when τ = 0


class _DiscardedSample(Exception):
    """Thrown into a ``sampled_params`` context by ``end_sample(discard=True)``: exit as if the body raised."""


def _state_dtype(p: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones."""
    return torch.promote_types(p.dtype, torch.float32)


def _mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (SplitMix64), uncorrelated with streams seeded by them."""
    mask = (1 << 64) - 1
    x = 0x5EED_1A7E_0F_1B0D
    for v in values:
        z = ((x ^ (v & mask)) + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x >> 1


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)") from None


def _in(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    if not ok(_real(name, value)):
        raise ValueError(f"Invalid {name}: {value!r} ({rule})")


def _fail(name: str, value: Any, rule: str) -> None:
    raise ValueError(f"Invalid {name}: {value!r} ({rule})")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected a bool)")


_RULES: dict[str, Callable[[Any], None]] = {
    "lr": lambda v: _in("lr", v, lambda x: 0.0 <= x < math.inf, "must be finite and >= 0"),
    "ess": lambda v: _in("ess", v, lambda x: 0.0 < x < math.inf, "must be finite and > 0"),
    "hess_init": lambda v: _in("hess_init", v, lambda x: 0.0 < x < math.inf, "must be finite and > 0"),
    "beta1": lambda v: _in("beta1", v, lambda x: 0.0 <= x < 1.0, "must be in [0, 1)"),
    "beta2": lambda v: _in("beta2", v, lambda x: 0.0 <= x <= 1.0, "must be in [0, 1]"),
    "weight_decay": lambda v: _in("weight_decay", v, lambda x: 0.0 <= x < math.inf, "must be finite and >= 0"),
    "clip_radius": lambda v: _in("clip_radius", v, lambda x: x > 0.0, "must be > 0, inf for no clipping"),
    "mc_samples": lambda v: None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1
    else _fail("mc_samples", v, "must be an int >= 1"),
    "hess_approx": lambda v: None
    if v in HESS_APPROXES
    else _fail("hess_approx", v, f"expected one of {HESS_APPROXES}"),
    "rescale_lr": lambda v: _flag("rescale_lr", v),
    "debias": lambda v: _flag("debias", v),
}


def validate_ivon_hyperparameters(**kwargs: Any) -> None:
    """Raise ``ValueError`` naming the first invalid IVON hyper-parameter and its value (``Invalid beta1: 1.0
    (must be in [0, 1))``); the one definition of their valid ranges, used by :class:`IVON` for its arguments
    and every parameter group.

    Accepts any subset of ``lr`` (finite, >= 0: a schedule may decay it to 0), ``ess`` (finite, > 0),
    ``hess_init`` (finite, > 0), ``beta1`` ([0, 1)), ``beta2`` ([0, 1]), ``weight_decay`` (finite, >= 0),
    ``clip_radius`` (> 0, ``inf`` for none), ``mc_samples`` (int >= 1), ``hess_approx`` (one of
    ``"price"``, ``"gradsq"``), ``rescale_lr`` and ``debias`` (bools); an unknown name is a ``ValueError``
    too. Defaults of the optional ones: :data:`IVON_DEFAULTS`.
    """
    for name, value in kwargs.items():
        rule = _RULES.get(name)
        if rule is None:
            raise ValueError(f"Unknown IVON hyper-parameter: {name!r} (expected one of {sorted(_RULES)})")
        rule(value)


def _check_options(opts: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid per-group option."""
    validate_ivon_hyperparameters(**{k: opts[k] for k in _RULES if k in opts})
    if opts["foreach"] is not None and not isinstance(opts["foreach"], bool):
        raise ValueError(f"Invalid foreach: {opts['foreach']!r} (expected None or a bool)")


class IVON(torch.optim.Optimizer):
    r"""Improved Variational Online Newton (IVON), a mean-field Gaussian variational learner.

    IVON learns a posterior :math:`q(\theta) = \mathcal N(m, \mathrm{diag}(\sigma^2))` over the parameters at
    roughly the cost of Adam. The parameters hold the mean :math:`m`; the optimizer holds a diagonal Hessian
    estimate :math:`h` and a gradient momentum :math:`\bar g`, and
    :math:`\sigma = 1/\sqrt{\lambda (h + \delta)}`. Shen et al., "Variational Learning is Effective for Large
    Deep Networks", ICML 2024, arXiv:2402.17641 (Algorithm 1); the reference implementation is ``ivon-opt``.

    .. math::
       \begin{aligned}
         &\textbf{input}: \alpha \text{ (lr)},\ \lambda \text{ (ess)},\ h_0 \text{ (hess\_init)},\
            \beta_1 \text{ (beta1)},\ \beta_2 \text{ (beta2)},\ \delta \text{ (weight\_decay)},\
            S \text{ (mc\_samples)},\ \rho \text{ (clip\_radius)},\ \ell \text{ (mini-batch mean loss)} \\
         &\textbf{initialise}: m \leftarrow \theta_0,\quad h \leftarrow h_0,\quad \bar g \leftarrow 0,\quad
            \alpha' \leftarrow \alpha\,(h_0 + \delta) \text{ if rescale\_lr else } \alpha \\
         &\textbf{for}\ t = 1, 2, \ldots \\
         &\quad \sigma \leftarrow 1 / \sqrt{\lambda\,(h + \delta)} \\
         &\quad \textbf{for}\ s = 1, \ldots, S
            \quad(\text{one } \texttt{sampled\_params(train=True)} \text{ context each}) \\
         &\qquad \epsilon_s \sim \mathcal N(0, I),\quad \theta_s \leftarrow m + \sigma \odot \epsilon_s,\quad
            g_s \leftarrow \nabla_\theta \ell(\theta_s) \\
         &\quad \hat g \leftarrow \tfrac1S \textstyle\sum_s g_s \\
         &\quad \hat h \leftarrow \tfrac1S \textstyle\sum_s g_s \odot (\theta_s - m) / \sigma^2
            = \tfrac1S \sum_s g_s \odot \epsilon_s / \sigma
            \quad(\text{"price"};\ \text{"gradsq"}:
            \hat h \leftarrow \tfrac{\lambda}{S} \sum_s g_s \odot g_s) \\
         &\quad \bar g \leftarrow \beta_1 \bar g + (1 - \beta_1)\,\hat g \\
         &\quad h \leftarrow \beta_2 h + (1 - \beta_2)\,\hat h
            + \tfrac12 (1 - \beta_2)^2\,(h - \hat h)^2 / (h + \delta) \\
         &\quad b \leftarrow 1 - \beta_1^t \text{ if debias else } 1 \\
         &\quad m \leftarrow m - \alpha' \,\mathrm{clip}\big((\bar g / b + \delta\, m) / (h + \delta),\
            -\rho,\ \rho\big) \\
         &\textbf{return}\ m,\ \sigma
       \end{aligned}

    All products, quotients and the clip are element-wise; the last term of the :math:`h` update keeps
    :math:`h + \delta > 0`; :math:`t` counts the updates of each parameter.

    Usage (the reference's)::

        opt = IVON(model.parameters(), lr=0.1, ess=len(train_set))
        for x, y in loader:
            for _ in range(opt.mc_samples):
                with opt.sampled_params(train=True):
                    loss_fn(model(x), y).backward()
            opt.step()

    **Samples, micro-batches and the gradient.** Each ``sampled_params(train=True)`` context draws one sample
    :math:`\theta_s` and, when it exits, consumes the gradients accumulated in ``p.grad`` as :math:`g_s`;
    ``step()`` expects exactly ``mc_samples`` such contexts since the previous step (``RuntimeError``
    otherwise) and averages them. Gradients are reset to ``None`` when a training context is entered and after
    they are consumed, so each sample starts from zero and nothing leaks into the next one. Several
    ``backward()`` calls inside one context accumulate, at the same :math:`\theta_s`, the gradient of several
    micro-batches: scale each micro-batch loss so that ``p.grad`` ends up the gradient of the *mean* loss
    :math:`\ell` (``loss / n_micro`` for equal micro-batches), as with any optimizer. Because gradients are
    consumed at context exit, gradient clipping and AMP unscaling after the context would see nothing: pass
    ``grad_transform`` and/or ``max_grad_norm`` to :meth:`sampled_params`, which run on the sample's gradients
    just before they are consumed (see there).

    **Parameters without a gradient.** Parameters with ``requires_grad=False`` are constants: never perturbed
    nor updated. A parameter that requires grad but gets ``p.grad is None`` in some samples of a step gets a
    zero gradient for those samples (the loss did not depend on it there); if it gets no gradient in any
    sample of the step it is skipped, like ``torch.optim`` does: its mean, state and step count stay as they
    are.

    **Precision, memory and devices.** ``hess``, ``momentum`` and the gradient sums are kept in fp32 (fp64 for fp64
    parameters). Parameters in bf16/fp16 also get an fp32 master copy of their mean (``state["mean"]``) which the
    updates act on and which the parameter holds rounded; if the parameter is changed from outside (e.g. loading
    weights), the master copy is re-synchronised from it at the next sampling. Besides ``hess`` and ``momentum`` the
    optimizer keeps two workspace buffers per parameter, reused every step (the saved mean and the noise during a
    sample, then the gradient sums until ``step()``): it holds 4 floats per parameter against AdamW's 2 (plus 1
    temporary) and allocates nothing per step. Per (group, device, dtype) each of these is one flat buffer, which the
    foreach path updates in a few large kernels. Parameters may live on several devices; noise for each device comes
    from a generator on that device.

    **Noise.** ``generator`` (a :class:`torch.Generator`) is the source of all noise; with ``None`` the
    optimizer creates private generators seeded from ``torch.initial_seed()`` when noise is first drawn (mixed
    with the rank when ``sync`` is on, so that ranks draw different noise). Generators for further devices are
    seeded from the first. Their states are part of :meth:`state_dict`, so a resumed run draws the same noise.
    On CPU a training draw is split into :data:`~varlora.optim._functional.NOISE_STREAMS` fixed substreams
    seeded from the generator, which lets it run on several threads (see
    :func:`~varlora.optim._functional.fill_normal_`). The substreams of fp32 noise (that of fp32, bf16 and fp16
    parameters) come either from torch's generator or from the fused kernels' vectorised one: other values,
    the same distribution. This *noise path* (``"fused"`` or ``"torch"``) is chosen at the first such draw
    (``"fused"`` when ``fused`` is not False and the kernels build) and kept; it is part of
    :meth:`state_dict`, and :meth:`load_state_dict` continues on the saved path. If that is impossible (a
    ``"fused"`` state dict, ``fused=None`` and no C compiler here) it raises ``RuntimeError``; the way
    through is ``IVON(..., fused=False)``, which resumes on torch's generator with a ``UserWarning`` (as does
    any explicit ``fused`` that contradicts the saved path): the run then continues with other noise.

    **Distributed.** With ``sync=True`` and an initialised default process group, every rank draws its own
    noise and, at ``step()``, the gradient sums :math:`\sum_s g_s` and Hessian sums are all-reduced and
    divided by the total number of samples: the ranks act as MC samples (:math:`S` = ranks × ``mc_samples``)
    and all ranks apply the same update. Run the backward under ``DistributedDataParallel.no_sync()`` (or
    without DDP), so that each rank's gradient is that of its own sample. With ``sync=False`` nothing is
    communicated: under ordinary DDP (gradients averaged in ``backward``) every rank then must draw the same
    noise, which ``generator=None`` gives (the seed is not mixed with the rank).

    Args:
        params: parameters or parameter groups (dicts); every option below except ``mc_samples``, ``sync``
            and ``generator`` can be set per group.
        lr: learning rate :math:`\alpha` (>= 0).
        ess: effective sample size :math:`\lambda` (> 0), usually the size of the training set or larger.
        hess_init: initial Hessian :math:`h_0` (> 0). Default: 1.0.
        beta1: momentum coefficient :math:`\beta_1` in [0, 1). Default: 0.9.
        beta2: Hessian averaging coefficient :math:`\beta_2` in [0, 1]. Default: 0.99999.
        weight_decay: :math:`\delta` (>= 0), the precision of the Gaussian prior
            :math:`\mathcal N(0, 1/(\lambda \delta))`. Default: 1e-4.
        mc_samples: samples :math:`S` per step (>= 1). Default: 1.
        hess_approx: ``"price"`` (reparametrisation estimator, the paper's) or ``"gradsq"`` (the reference's
            squared-gradient alternative, :math:`\hat h = \lambda\,\overline{g^2}`). Default: ``"price"``.
        clip_radius: :math:`\rho` (> 0), element-wise bound on the preconditioned update. Default: ``inf``.
        rescale_lr: multiply the learning rate by :math:`h_0 + \delta`. Default: True.
        debias: divide the momentum by :math:`1 - \beta_1^t`. Default: True.
        sync: all-reduce the estimates across ranks (see above). Default: False.
        foreach: use the ``torch._foreach_*`` path; ``None`` picks it (it is faster on CPU and GPU).
        generator: the noise source; ``None`` for private, deterministically seeded generators.
        fused: use the compiled one-pass CPU kernels (:mod:`~varlora.optim._cpu_kernels`, built on first use
            with the system C compiler, run on ``torch.get_num_threads()`` threads) instead of the ``torch``
            paths: the same update to rounding, faster than the foreach path at 1 and 2 threads
            (``benchmarks/optimizer_step.py``), and the fused noise path (see **Noise**). ``None``: when the
            kernels build (otherwise the torch paths, with a warning); ``True``: raise
            :class:`~varlora.optim._cpu_kernels.KernelBuildError` if they do not; ``False``: never. The rule
            for each phase of a step is one: it runs fused iff every tensor it touches is a contiguous fp32
            CPU tensor. So fp32 CPU parameters run fused throughout; for bf16/fp16 CPU parameters the noise
            (fp32) and the update (fp32 state and master mean) run fused while the perturbation and the
            gradient accumulation (which touch the bf16 tensors) take the torch path; fp64 and GPU parameters
            take the torch paths.
        stats_every: compute the statistics of :attr:`last_step_stats` on steps 1, N+1, 2N+1, ... (N >= 1).
            Default: 10.

    Beyond ``torch.optim``: :meth:`sampled_params` (training and evaluation samples), :meth:`posterior`,
    :meth:`posterior_mean` and :meth:`posterior_std` (the posterior, e.g. to save it or sample outside the
    optimizer), :attr:`last_step_stats` (diagnostics to log), :meth:`discard_samples`, and for loops run by a
    framework :meth:`begin_sample`/:meth:`end_sample` and :meth:`draw_noise` (see
    :class:`varlora.integrations.IVONTrainer` for Hugging Face ``Trainer``).

    Differences from the reference beyond its defects: ``step()`` raises unless exactly ``mc_samples``
    training contexts preceded it, gradients are reset to ``None`` by training contexts, ``p.data`` is never
    re-pointed (the parameters are perturbed and restored in place), and ``hess_init`` is not rounded to fp32.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        ess: float,
        hess_init: float = IVON_DEFAULTS["hess_init"],
        beta1: float = IVON_DEFAULTS["beta1"],
        beta2: float = IVON_DEFAULTS["beta2"],
        weight_decay: float = IVON_DEFAULTS["weight_decay"],
        mc_samples: int = IVON_DEFAULTS["mc_samples"],
        hess_approx: str = IVON_DEFAULTS["hess_approx"],
        clip_radius: float = IVON_DEFAULTS["clip_radius"],
        rescale_lr: bool = IVON_DEFAULTS["rescale_lr"],
        debias: bool = IVON_DEFAULTS["debias"],
        sync: bool = False,
        foreach: bool | None = None,
        generator: torch.Generator | None = None,
        fused: bool | None = None,
        stats_every: int = 10,
    ) -> None:
        defaults = dict(
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            clip_radius=clip_radius,
            hess_approx=hess_approx,
            rescale_lr=rescale_lr,
            debias=debias,
            foreach=foreach,
        )
        _check_options(defaults)
        validate_ivon_hyperparameters(mc_samples=mc_samples)
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 1:
            raise ValueError(f"Invalid stats_every: {stats_every!r} (must be an int >= 1)")
        if not isinstance(sync, bool):
            raise ValueError(f"Invalid sync: {sync!r} (expected a bool)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Invalid generator: {generator!r} (expected a torch.Generator or None)")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"Invalid fused: {fused!r} (expected None or a bool)")
        if fused:
            _cpu_kernels.load()  # KernelBuildError now rather than at the first step
        self.fused = fused
        self.stats_every = stats_every
        self._warned_unfused = False
        self._noise_path: str | None = None  # NOISE_PATHS entry, fixed at the first CPU fp32 training draw
        self.mc_samples = mc_samples
        self.sync = sync
        self._generator = generator  # the user's generator, None for private ones
        self._generators: dict[str, torch.Generator] = {}  # noise source per device, keyed by str(device)
        if generator is not None:
            self._generators[str(generator.device)] = generator
        self._sample: _OpenSample | None = None  # the open sampled_params context
        self._explicit_sample: AbstractContextManager[None] | None = None  # the context begin_sample() entered
        # per (group, device, dtype): the parameters, and backup and noise buffers reused from step to step
        self._workspace: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        self._num_samples = 0  # training samples consumed since the last step
        self._num_steps = 0  # step() calls so far
        self._grad_norms: list[Tensor] = []  # pre-clip gradient norms of this step's samples (max_grad_norm)
        self._raw_stats: dict[str, Any] = {}  # what the last step measured, on device, finished lazily
        self._stats: dict[str, Any] | None = None  # last_step_stats, once computed
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its options are validated (``ValueError``) after defaults are filled in."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_options(group)
            for p in group["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise ValueError(f"IVON needs real floating-point parameters, got one of dtype {p.dtype}")
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _BACKFILL.items():
                group.setdefault(key, value)
        for key, value in (
            ("mc_samples", 1),
            ("sync", False),
            ("fused", None),
            ("stats_every", 10),
            ("_noise_path", None),
            ("_warned_unfused", False),
            ("_generator", None),
            ("_sample", None),
            ("_explicit_sample", None),
            ("_num_samples", 0),
            ("_num_steps", 0),
            ("_raw_stats", {}),
            ("_stats", None),
        ):
            self.__dict__.setdefault(key, value)
        self.__dict__.setdefault("_generators", {})
        self.__dict__.setdefault("_workspace", {})
        self.__dict__.setdefault("_grad_norms", [])

    # ------------------------------------------------------------------------------------------------ state

    def _sampled(self) -> list[tuple[int, Tensor]]:
        """(group index, parameter) of every parameter that is sampled and trained: those requiring grad."""
        return [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.requires_grad]

    def _init_states(self, sampled: list[tuple[int, Tensor]]) -> list[dict[str, Any]]:
        """The state of each sampled parameter, created on first use.

        ``hess`` and ``momentum`` of the parameters initialised together (per group, device and dtype) are
        views into one flat buffer each, so that the foreach path can update them with single kernels.
        """
        missing = [(gi, p) for gi, p in sampled if "hess" not in self.state[p]]
        for (gi, *_), idx in self._buckets([p for _, p in missing], [gi for gi, _ in missing]).items():
            params = [missing[i][1] for i in idx]
            _, hess = self._arena(params, fill=self.param_groups[gi]["hess_init"])
            _, momentum = self._arena(params, fill=0.0)
            for p, h, mom in zip(params, hess, momentum, strict=True):
                state = self.state[p]
                state["step"] = 0  # updates applied to this parameter (t of the bias correction)
                state["hess"] = h  # h: the diagonal Hessian estimate of the per-example loss
                state["momentum"] = mom  # ḡ: the gradient momentum
        states = []
        for _, p in sampled:
            state = self.state[p]
            if _state_dtype(p) != p.dtype:
                mean = state.get("mean")
                if mean is None:
                    # m at full precision for a bf16/fp16 parameter, which holds it rounded
                    state["mean"] = p.detach().to(_state_dtype(p), copy=True)
                elif not torch.equal(p.detach(), mean.to(p.dtype)):  # p was changed from outside
                    mean.copy_(p.detach())
            states.append(state)
        return states

    @staticmethod
    def _arena(params: list[Tensor], fill: float | None = None) -> tuple[Tensor, list[Tensor]]:
        """A flat buffer in the state dtype (uninitialised, or filled with ``fill``) and its views shaped like
        ``params``, in order."""
        total = sum(p.numel() for p in params)
        flat = torch.empty(total, dtype=_state_dtype(params[0]), device=params[0].device)
        if fill is not None:
            flat.fill_(fill)
        views, offset = [], 0
        for p in params:
            views.append(flat[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return flat, views

    def _pack_state(self) -> None:
        """Move ``hess`` and ``momentum`` of each (group, device, dtype) bucket into one flat buffer each."""
        with_state = [
            (gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if "hess" in self.state.get(p, {})
        ]
        for _, idx in self._buckets([p for _, p in with_state], [gi for gi, _ in with_state]).items():
            params = [with_state[i][1] for i in idx]
            for key in ("hess", "momentum"):
                for p, view in zip(params, self._arena(params)[1], strict=True):
                    view.copy_(self.state[p][key])
                    self.state[p][key] = view

    def _buffers(self, key: tuple[Any, ...], params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Backup and noise buffers for a sample of ``params`` (one bucket).

        The first sample of a step uses the bucket's persistent workspace, which then holds the step's sums
        until ``step()``; a sample taken while sums exist gets fresh buffers.
        """
        if any("grad_sum" in self.state[p] for p in params):
            return self._arena(params)[1], self._arena(params)[1]
        cached = self._workspace.get(key)
        if (
            cached is None
            or len(cached[0]) != len(params)
            or any(a is not b for a, b in zip(cached[0], params, strict=True))
        ):
            cached = (list(params), self._arena(params)[1], self._arena(params)[1])
            self._workspace[key] = cached
        return cached[1], cached[2]

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("the tensor is not a parameter of this optimizer")

    # ------------------------------------------------------------------------------------------------ noise

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The noise generator of ``device``, created (and seeded deterministically) on first use."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            if self._generator is not None:
                seed = int(torch.randint(0, 1 << 62, (1,), generator=self._generator).item())
            else:
                rank = dist.get_rank() if self.sync and dist.is_available() and dist.is_initialized() else 0
                seed = _mix_seed(torch.initial_seed(), rank, zlib.crc32(key.encode()))
            gen = torch.Generator(device=device).manual_seed(seed)
            self._generators[key] = gen
        return gen

    def _draw_noise(self, noises: list[Tensor], generator: torch.Generator | None) -> None:
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for t in noises:
            by_device[t.device].append(t)
        for device, ts in by_device.items():
            gen = generator if generator is not None else self._generator_for(device)
            flat = F.flat_view(ts)  # same values as the list, fewer slices
            if gen.device == device:
                fused = _cpu_kernels.supports(ts) and self._noise_fused()
                F.fill_normal_([flat] if flat is not None else ts, gen, fused=fused)
            else:  # an explicit generator on another device: draw there and copy
                drawn = [torch.empty(t.shape, dtype=t.dtype, device=gen.device) for t in ts]
                F.fill_normal_(drawn, gen)
                torch._foreach_copy_(ts, drawn)

    # --------------------------------------------------------------------------------------------- sampling

    @contextmanager
    def sampled_params(
        self,
        train: bool = False,
        *,
        tau: float = 1.0,
        generator: torch.Generator | None = None,
        noise: Sequence[Tensor] | None = None,
        grad_transform: Callable[[list[Tensor]], object] | None = None,
        max_grad_norm: float | None = None,
    ) -> Iterator[None]:
        r"""Context in which the parameters hold a sample :math:`\theta = m + \sqrt\tau\,\sigma\odot\epsilon`.

        On exit the means are restored exactly, also when the body raises (the sample is then discarded).
        Only parameters with ``requires_grad`` are perturbed. Contexts cannot be nested, and ``step()``,
        ``state_dict()`` and ``load_state_dict()`` refuse to run inside one.

        Args:
            train: a training sample. Gradients are reset to ``None`` on entry; on a normal exit the gradients
                accumulated in ``p.grad`` (by one or several ``backward()``) are passed through
                ``grad_transform`` and ``max_grad_norm``, then consumed into the step's sums and reset to
                ``None``. ``step()`` needs ``mc_samples`` training contexts.
            tau: variance scale :math:`\tau \in [0, 1]` for evaluation samples; ``tau=0`` leaves the weights
                exactly at the mean. Training samples need ``tau=1``.
            generator: draw the noise from this generator instead of the optimizer's (e.g. to keep evaluation
                from advancing the training noise stream). Evaluation samples (``train=False``) are drawn by
                :func:`varlora.optim.sampling.perturbed_params`, the sampler of the saved posterior: one
                float32 ``torch.randn`` per sampled parameter in optimizer order, on the generator's device
                (default: the optimizer's CPU generator), consumed even with ``tau=0``.
            noise: explicit standard-normal draws :math:`\epsilon`, one tensor per sampled parameter (those
                with ``requires_grad``, in ``param_groups`` order), instead of drawing them (common random
                numbers, tests, external samplers).
            grad_transform: called with the list of sampled parameters that have a gradient, after the body
                and before the gradients are consumed; it may modify their ``.grad`` in place. The place for
                AMP unscaling, e.g. ``lambda params: scaler.unscale_(opt)`` with one sample per step (call
                :meth:`discard_samples` when ``scaler.step`` skips the step), or any custom clipping.
            max_grad_norm: clip the norm of the sample's gradient (all its parameters together) to this value
                with :func:`torch.nn.utils.clip_grad_norm_`, after ``grad_transform``. The pre-clip norms are
                reported in :attr:`last_step_stats` as ``grad_norm`` (mean over the step's samples).
        """
        tau = sampling.check_tau(tau)
        if train and tau != 1.0:
            raise ValueError(f"Invalid tau for a training sample: {tau!r} (training samples need tau=1)")
        if max_grad_norm is not None and not _real("max_grad_norm", max_grad_norm) > 0.0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be > 0)")
        if self._sample is not None:
            raise RuntimeError("sampled_params() contexts cannot be nested")
        if not train:
            with self._evaluation_sample(tau, generator, noise):
                yield
            return
        with torch.no_grad():
            sample = self._begin_sample(train, tau, generator, noise)
        self._sample = sample
        try:
            yield
            if train:
                self._transform_grads(sample.params, grad_transform, max_grad_norm)
        finally:
            with torch.no_grad():
                self._restore(sample)
            self._sample = None
        if train:
            with torch.no_grad():
                self._consume(sample)

    @contextmanager
    def _evaluation_sample(
        self, tau: float, generator: torch.Generator | None, noise: Sequence[Tensor] | None
    ) -> Iterator[None]:
        """A test-time sample through :func:`varlora.optim.sampling.perturbed_params`, the saved posterior's
        sampler: ε drawn float32 per parameter, in optimizer order, from ``generator`` (default: the
        optimizer's CPU generator)."""
        sampled = self._sampled()
        params = [p for _, p in sampled]
        if noise is not None and len(noise) != len(params):
            raise ValueError(f"noise has {len(noise)} tensors for {len(params)} sampled parameters")
        with torch.no_grad():
            states = self._init_states(sampled)
            stds = [self._std(p, self.param_groups[gi]) for gi, p in sampled]
        means = [state.get("mean", p) for state, p in zip(states, params, strict=True)]
        if noise is None and generator is None:
            generator = self._generator_for(torch.device("cpu"))
        self._sample = _OpenSample(False, params, [gi for gi, _ in sampled], None, None)
        try:
            with sampling.perturbed_params(params, stds, tau=tau, generator=None if noise is not None else generator,
                                           noise=noise, means=means):
                yield
        finally:
            self._sample = None

    def _begin_sample(
        self, train: bool, tau: float, generator: torch.Generator | None, noise: Sequence[Tensor] | None
    ) -> _OpenSample:
        sampled = self._sampled()
        params = [p for _, p in sampled]
        groups = [gi for gi, _ in sampled]
        if noise is not None and len(noise) != len(params):
            raise ValueError(f"noise has {len(noise)} tensors for {len(params)} sampled parameters")
        states = self._init_states(sampled)
        if train:
            for p in params:
                p.grad = None
        if tau == 0.0 or not params:
            return _OpenSample(train, params, groups, None, None)
        backups: list[Tensor] = [torch.empty(0)] * len(params)
        noises: list[Tensor] = [torch.empty(0)] * len(params)
        buckets = self._buckets(params, groups)
        for key, idx in buckets.items():
            bucket_backups, bucket_noises = self._buffers(key, [params[i] for i in idx])
            for j, i in enumerate(idx):
                backups[i], noises[i] = bucket_backups[j], bucket_noises[j]
        if noise is None:
            self._draw_noise(noises, generator)
        else:
            for t, eps in zip(noises, noise, strict=True):
                if eps.shape != t.shape:
                    raise ValueError(f"noise of shape {tuple(eps.shape)} for a parameter of shape {tuple(t.shape)}")
                t.copy_(eps)
        for (gi, *_), idx in buckets.items():
            group = self.param_groups[gi]
            F.perturb_(
                [params[i] for i in idx],
                [states[i].get("mean", params[i]) for i in idx],
                [backups[i] for i in idx],
                [noises[i] for i in idx],
                [states[i]["hess"] for i in idx],
                ess=group["ess"],
                weight_decay=group["weight_decay"],
                scale=math.sqrt(tau),
                foreach=self._foreach(group),
                fused=self._fused([params[i] for i in idx], [states[i]["hess"] for i in idx]),
            )
        return _OpenSample(train, params, groups, backups, noises)

    def _transform_grads(
        self,
        params: list[Tensor],
        grad_transform: Callable[[list[Tensor]], object] | None,
        max_grad_norm: float | None,
    ) -> None:
        with_grad = [p for p in params if p.grad is not None]
        for p in with_grad:
            if p.grad.is_sparse:
                raise RuntimeError("IVON does not support sparse gradients")
        if grad_transform is not None:
            grad_transform(with_grad)
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, float(max_grad_norm))
            self._grad_norms.append(norm.detach())

    def _restore(self, sample: _OpenSample) -> None:
        if sample.backups is not None:
            torch._foreach_copy_(sample.params, sample.backups)

    def _consume(self, sample: _OpenSample) -> None:
        """Fold the gradients of the sample that just ended into the step's sums; reset ``p.grad``."""
        if sample.backups is not None and sample.noises is not None:
            for (gi, *_), idx in self._buckets(sample.params, sample.groups).items():
                group = self.param_groups[gi]
                with_grad = [i for i in idx if sample.params[i].grad is not None]
                new = [i for i in with_grad if "grad_sum" not in self.state[sample.params[i]]]
                old = [i for i in with_grad if "grad_sum" in self.state[sample.params[i]]]
                for i in new:  # the freed backup and noise buffers become the sums
                    state = self.state[sample.params[i]]
                    state["grad_sum"] = sample.backups[i]  # Σ_s g_s over this step's samples
                    state["hess_sum"] = sample.noises[i]  # Σ_s g_s⊙ν_s (price) or Σ_s g_s⊙g_s (gradsq)
                for sel, first in ((new, True), (old, False)):
                    if not sel:
                        continue
                    states = [self.state[sample.params[i]] for i in sel]
                    grad_sums, hess_sums = [s["grad_sum"] for s in states], [s["hess_sum"] for s in states]
                    grads = [sample.params[i].grad for i in sel]
                    F.accumulate_(
                        grad_sums,
                        hess_sums,
                        grads,
                        [sample.noises[i] for i in sel],
                        hess_approx=group["hess_approx"],
                        first=first,
                        foreach=self._foreach(group),
                        fused=self._fused(grad_sums, hess_sums, grads),
                    )
        for p in sample.params:
            p.grad = None
        self._num_samples += 1

    # ---------------------------------------------------------------------------------- framework hooks

    def begin_sample(self, train: bool = False, **kwargs: Any) -> None:
        """Enter :meth:`sampled_params` without a ``with`` block; :meth:`end_sample` leaves it.

        For loops run by a framework, where the body of a sample (forward, backward, gradient clipping) spans
        several hooks, e.g. Lightning's ``on_before_backward``/``on_after_backward``. Takes the arguments of
        :meth:`sampled_params` and behaves like entering it; prefer ``with opt.sampled_params(...)`` when the
        body fits in one block.
        """
        if self._sample is not None:
            raise RuntimeError("begin_sample() while a sample is open: call end_sample() first")
        context = self.sampled_params(train, **kwargs)
        context.__enter__()
        self._explicit_sample = context

    def end_sample(self, discard: bool = False) -> None:
        """Leave the sample of :meth:`begin_sample`: the means are restored and, for a training sample, the
        gradients are transformed and consumed as on a normal exit of :meth:`sampled_params`.

        Args:
            discard: leave as if the body had raised (e.g. the loss was NaN): the means are restored, the
                gradients are neither transformed nor consumed (they stay in ``p.grad``), and the sample does
                not count towards ``mc_samples``.
        """
        context, self._explicit_sample = self._explicit_sample, None
        if context is None:
            raise RuntimeError("end_sample() without an open begin_sample()")
        if discard:
            context.__exit__(_DiscardedSample, _DiscardedSample(), None)  # restores; returns False
        else:
            context.__exit__(None, None, None)

    def draw_noise(self, generator: torch.Generator | None = None) -> list[Tensor]:
        r"""Standard-normal :math:`\epsilon`, one tensor per sampled parameter (``requires_grad``, optimizer
        order, state dtype), from the optimizer's noise stream (or ``generator``), for
        ``sampled_params(noise=...)``.

        For loops that interleave samples, e.g. ``mc_samples`` samples each evaluated on every micro-batch of
        a gradient accumulation window: draw each sample's :math:`\epsilon` once, then re-enter it per
        micro-batch. The stream is part of :meth:`state_dict`, so a resumed run draws the same values.
        """
        noises = [torch.empty_like(p, dtype=_state_dtype(p)) for _, p in self._sampled()]
        with torch.no_grad():
            self._draw_noise(noises, generator)
        return noises

    def discard_samples(self) -> None:
        """Drop the gradient samples consumed since the last ``step()`` (no-op if there are none).

        For a step that must not happen after its samples were taken, e.g. when ``torch.amp.GradScaler``
        found inf/NaN gradients and ``scaler.step(opt)`` skipped ``opt.step()``.
        """
        for state in self.state.values():
            state.pop("grad_sum", None)
            state.pop("hess_sum", None)
        self._num_samples = 0
        self._grad_norms = []

    # ------------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update the posterior from the samples taken since the last step.

        Args:
            closure: optional; called ``mc_samples`` times, each inside ``sampled_params(train=True)`` with
                gradients enabled. It computes the loss, calls ``backward()`` and returns the loss (it may
                clip gradients itself, being inside the context); ``step`` then returns their mean.

        Returns:
            The mean closure loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
        if self._sample is not None:
            raise RuntimeError("step() cannot be called inside sampled_params()")
        if self._num_samples != self.mc_samples:
            raise RuntimeError(
                f"step() after {self._num_samples} sampled_params(train=True) contexts, expected mc_samples="
                f"{self.mc_samples}; to accumulate micro-batches, call backward() several times inside one "
                "context"
            )
        num_samples = self._num_samples
        sampled = self._sampled()
        if self.sync and dist.is_available() and dist.is_initialized():
            num_samples = self._all_reduce_sums([p for _, p in sampled])
        todo = [(gi, p) for gi, p in sampled if "grad_sum" in self.state[p]]
        params = [p for _, p in todo]
        self._num_steps += 1
        with_stats = (self._num_steps - 1) % self.stats_every == 0
        # per device: [clipped coordinates, Σh, Σσ, mean pre-clip gradient norm], summed without a host sync
        sums: dict[torch.device, Tensor] = {}
        numel = 0
        for (gi, *_), idx in self._buckets(params, [gi for gi, _ in todo], by_step=True).items():
            group = self.param_groups[gi]
            states = [self.state[params[i]] for i in idx]
            for state in states:
                state["step"] += 1
            t = states[0]["step"]
            lr = group["lr"] * (group["hess_init"] + group["weight_decay"] if group["rescale_lr"] else 1.0)
            means = [s.get("mean", params[i]) for i, s in zip(idx, states, strict=True)]
            grad_sums, hess_sums = [s.pop("grad_sum") for s in states], [s.pop("hess_sum") for s in states]
            momenta, hessians = [s["momentum"] for s in states], [s["hess"] for s in states]
            count = F.update_(
                means,
                grad_sums,
                hess_sums,
                momenta,
                hessians,
                num_samples=num_samples,
                lr=lr,
                ess=group["ess"],
                beta1=group["beta1"],
                beta2=group["beta2"],
                weight_decay=group["weight_decay"],
                clip_radius=group["clip_radius"],
                bias_correction=1.0 - group["beta1"] ** t if group["debias"] else 1.0,
                hess_approx=group["hess_approx"],
                foreach=self._foreach(group),
                fused=self._fused(means, grad_sums, hess_sums, momenta, hessians),
                count_clipped=with_stats,
            )
            if with_stats:
                acc = sums.setdefault(hessians[0].device, torch.zeros(4, dtype=torch.float64,
                                                                      device=hessians[0].device))
                if count is not None:
                    acc[0] += count.to(acc.device)
                acc[1:3] += F.hessian_sums(hessians, ess=group["ess"], weight_decay=group["weight_decay"])
            numel += sum(params[i].numel() for i in idx)
            for i, state in zip(idx, states, strict=True):
                if "mean" in state:
                    params[i].copy_(state["mean"])
        norms = self._grad_norms
        if with_stats and norms:
            norm = torch.stack([n.detach().double().to(norms[0].device) for n in norms]).mean()
            sums.setdefault(norm.device, torch.zeros(4, dtype=torch.float64, device=norm.device))[3] += norm
        self._num_samples = 0
        self._raw_stats = dict(
            step=self._num_steps,
            num_samples=num_samples,
            skipped=len(sampled) - len(todo),
            numel=numel,
            sums=sums if with_stats else None,
            grad_norm=bool(norms),
        )
        self._grad_norms = []
        self._stats = None
        return loss

    def _all_reduce_sums(self, params: list[Tensor]) -> int:
        """Sum the gradient and Hessian sums and the sample counts over ranks; return the total count."""
        if not params:
            return self._num_samples
        flags = torch.tensor(
            [float(self._num_samples)] + [float("grad_sum" in self.state[p]) for p in params],
            dtype=torch.float64,
            device=params[0].device,
        )
        dist.all_reduce(flags)
        tensors: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p, has in zip(params, flags[1:].tolist(), strict=True):
            if not has:  # no rank has a gradient for p: skipped everywhere
                continue
            state = self.state[p]
            if "grad_sum" not in state:  # others have one: this rank's contribution is zero
                state["grad_sum"] = torch.zeros_like(state["hess"])
                state["hess_sum"] = torch.zeros_like(state["hess"])
            for key in ("grad_sum", "hess_sum"):
                tensors[state[key].device, state[key].dtype].append(state[key])
        for ts in tensors.values():
            flat = torch._utils._flatten_dense_tensors(ts)
            dist.all_reduce(flat)
            torch._foreach_copy_(ts, torch._utils._unflatten_dense_tensors(flat, ts))
        return int(flags[0].item())

    def _foreach(self, group: dict[str, Any]) -> bool:
        return True if group["foreach"] is None else group["foreach"]

    def _kernels_usable(self) -> bool:
        """``fused`` is not False and the kernels build (with ``fused=None``, a failed build means the torch
        paths, with one warning)."""
        if self.fused is False:
            return False
        if not _cpu_kernels.available():
            if not self._warned_unfused:
                warnings.warn(f"IVON runs without its fused CPU kernels: {_cpu_kernels.build_error()}", stacklevel=4)
                self._warned_unfused = True
            return False
        return True

    def _fused(self, *lists: Sequence[Tensor]) -> bool:
        """Whether the compiled kernels take these tensors: all contiguous fp32 CPU tensors, kernels usable."""
        return _cpu_kernels.supports(*lists) and self._kernels_usable()

    def _noise_fused(self) -> bool:
        """Whether CPU fp32 training noise comes from the fused generator; the choice (:data:`NOISE_PATHS`) is
        made at the first such draw and kept, and recorded in :meth:`state_dict`."""
        if self._noise_path is None:
            self._noise_path = "fused" if self._kernels_usable() else "torch"
        return self._noise_path == "fused"

    def _adopt_noise_path(self, saved: str) -> None:
        """Continue with the noise path of a loaded state dict, or say clearly why and how not."""
        if saved not in NOISE_PATHS:
            raise ValueError(f"Invalid noise_path in the state dict: {saved!r} (expected one of {NOISE_PATHS})")
        if self.fused is None and saved == "fused" and not _cpu_kernels.available():
            raise RuntimeError(
                "this state dict drew its training noise with the fused kernels' generator, which cannot be had "
                f"here ({_cpu_kernels.build_error()}). Make a C compiler available ($CC) to resume the run exactly, "
                "or construct IVON(..., fused=False) to resume it with torch's generator (other noise from here on)"
            )
        wanted = {None: saved, True: "fused", False: "torch"}[self.fused]
        if wanted != saved:
            warnings.warn(
                f"the state dict drew its training noise on the {saved!r} path and this optimizer (fused="
                f"{self.fused}) continues on the {wanted!r} path: the noise from here on differs from that of an "
                "uninterrupted run (same distribution). Construct IVON with fused=None to keep the saved path.",
                stacklevel=3,
            )
        self._noise_path = wanted

    def _buckets(
        self, params: list[Tensor], groups: list[int], by_step: bool = False
    ) -> dict[tuple[int, torch.device, torch.dtype, int | None], list[int]]:
        """Indices of ``params`` by (group, device, dtype[, next step]): what one functional call takes."""
        out: dict[tuple[int, torch.device, torch.dtype, int | None], list[int]] = defaultdict(list)
        for i, (p, gi) in enumerate(zip(params, groups, strict=True)):
            step = self.state[p]["step"] + 1 if by_step else None
            out[gi, p.device, p.dtype, step].append(i)
        return out

    # -------------------------------------------------------------------------------------------- posterior

    def _hess(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        state = self.state.get(p, {})
        return state["hess"] if "hess" in state else torch.full_like(p, group["hess_init"], dtype=_state_dtype(p))

    def _std(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        return (self._hess(p, group) + group["weight_decay"]).mul_(group["ess"]).rsqrt_()

    def _posterior(self, p: Tensor, group: dict[str, Any]) -> ParamPosterior:
        if self._sample is not None:
            raise RuntimeError("the posterior mean cannot be read inside sampled_params(): the weights are perturbed")
        state = self.state.get(p, {})
        mean = state["mean"] if "mean" in state else p.detach().to(_state_dtype(p))
        return ParamPosterior(p, mean, self._std(p, group))

    def posterior_mean(self, p: Tensor) -> Tensor:
        """:math:`m` of parameter ``p`` in the state dtype: live (the fp32 master copy, or ``p`` itself for an
        fp32/fp64 parameter), so clone it to keep it. ``RuntimeError`` inside ``sampled_params``."""
        return self._posterior(p, self._group_of(p)).mean

    def posterior_std(self, p: Tensor) -> Tensor:
        r""":math:`\sigma = 1/\sqrt{\lambda (h + \delta)}` of parameter ``p`` (a new tensor, state dtype)."""
        return self._std(p, self._group_of(p))

    def posterior(self) -> Iterator[ParamPosterior]:
        """Yield ``(param, mean, std)`` for every sampled parameter (``requires_grad``), in optimizer order.

        Usable to save the posterior (e.g. ``{name: (mean, std)}``) or to sample outside the optimizer:
        ``theta = mean + tau ** 0.5 * std * torch.randn_like(std)``. ``RuntimeError`` inside ``sampled_params``
        (the parameters then hold a sample, not the mean).
        """
        for gi, p in self._sampled():
            yield self._posterior(p, self.param_groups[gi])

    @property
    def last_step_stats(self) -> dict[str, Any]:
        r"""Diagnostics of the last ``step()`` (``{}`` before any step).

        Always: ``step`` (number of ``step()`` calls), ``num_samples`` (samples averaged, over all ranks with
        ``sync``) and ``skipped_params`` (parameters without a gradient in the step). On the steps
        :math:`1, N+1, 2N+1, \ldots` with :math:`N` = ``stats_every`` also ``clip_fraction`` (fraction of the
        step's updated coordinates whose update hit ``clip_radius``; 0 when no group clips), ``hess_mean`` and
        ``sigma_mean`` (means of :math:`h` and :math:`\sigma` over those coordinates) and ``grad_norm`` (mean
        pre-clip gradient norm of the samples when ``max_grad_norm`` was used, else None); on other steps these
        keys are absent, so a training loop logs them when present. ``step()`` computes them as one reduction
        over the flat state buffers left on the device; reading this property costs one host sync per device
        (once per step). The trainer should log ``clip_fraction``: near 1, IVON degenerates into
        :math:`\alpha\rho\,\mathrm{sign}(\bar g)` and ``clip_radius`` is too small.
        """
        if self._stats is None and self._raw_stats:
            raw = self._raw_stats
            stats = dict(step=raw["step"], num_samples=raw["num_samples"], skipped_params=raw["skipped"])
            if raw["sums"] is not None:
                clipped = hess_sum = sigma_sum = norm = 0.0
                for acc in raw["sums"].values():
                    c, h, sg, n = acc.tolist()
                    clipped, hess_sum, sigma_sum, norm = clipped + c, hess_sum + h, sigma_sum + sg, norm + n
                count = raw["numel"]
                stats |= dict(
                    clip_fraction=clipped / count if count else 0.0,
                    hess_mean=hess_sum / count if count else float("nan"),
                    sigma_mean=sigma_sum / count if count else float("nan"),
                    grad_norm=norm if raw["grad_norm"] else None,
                )
            self._stats = stats
        return dict(self._stats or {})

    # ----------------------------------------------------------------------------------------- state dicts

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict plus ``"ivon"`` (:data:`OWN_STATE_KEY`): step and sample counters and the
        generator states.

        Per-parameter state: ``step`` (int), ``hess``, ``momentum``, ``mean`` (low-precision parameters only)
        and, between the last sample and ``step()``, ``grad_sum``/``hess_sum``. Tensors are live references,
        as in ``torch.optim``: serialise or deep-copy the result to keep a snapshot.
        """
        if self._sample is not None:
            raise RuntimeError("state_dict() cannot be called inside sampled_params(): the weights are perturbed")
        out = super().state_dict()
        out[OWN_STATE_KEY] = {
            "num_samples": self._num_samples,
            "num_steps": self._num_steps,
            "generators": {key: gen.get_state() for key, gen in self._generators.items()},
            "noise_path": self._noise_path,
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`; state tensors are copied to each parameter's device in the
        state dtype (never downcast to a bf16 parameter's dtype, unlike ``torch.optim``). Generator states
        saved for devices this optimizer has are restored."""
        if self._sample is not None:
            raise RuntimeError("load_state_dict() cannot be called inside sampled_params()")
        state_dict = dict(state_dict)
        extra = state_dict.pop(OWN_STATE_KEY, {})
        if extra.get("noise_path") is not None:  # None: no CPU fp32 training draw yet, or an older state dict
            self._adopt_noise_path(extra["noise_path"])
        saved_state = state_dict.get("state", {})
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params, strict=True))
        for key, values in saved_state.items():
            p = by_id.get(key)
            if p is None:
                continue
            dtype = _state_dtype(p)
            state = {
                k: v.to(device=p.device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
                if isinstance(v, Tensor)
                else v
                for k, v in values.items()
            }
            if isinstance(state.get("step"), Tensor):
                state["step"] = int(state["step"].item())
            if dtype == p.dtype:
                state.pop("mean", None)  # saved from a low-precision copy of this parameter
            self.state[p] = state
        self._pack_state()
        self._workspace = {}
        self._num_samples = int(extra.get("num_samples", 0))
        self._num_steps = int(extra.get("num_steps", 0))
        self._grad_norms = []
        self._raw_stats, self._stats = {}, None
        devices = {str(p.device) for p in params}
        if self._generator is not None:
            devices.add(str(self._generator.device))
        for key, gen_state in extra.get("generators", {}).items():
            if key not in devices:
                continue
            gen = self._generators.get(key)
            if gen is None:
                gen = self._generators[key] = torch.Generator(device=torch.device(key))
            gen.set_state(gen_state.cpu() if isinstance(gen_state, Tensor) else gen_state)
