r"""IVON: the Improved Variational Online Newton optimizer (Shen et al., ICML 2024, arXiv:2402.17641).

:class:`IVON` is a drop-in replacement for the reference implementation ``ivon-opt`` 0.1.3 (same constructor
arguments, same update, same ``sampled_params`` usage) without its known defects: the optimizer state is kept
in fp32 (fp64 for fp64 parameters) whatever the parameter dtype, parameters may live on several devices and
may miss a gradient, sampling always restores the weights, the step counters and noise generators are part of
the ``state_dict``, gradients can be clipped or unscaled before they are consumed, and the posterior is
accessible. The math lives in :mod:`varlora.optim._functional`, the sampler in :mod:`varlora.optim.sampling`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import ParamsT

from varlora.optim import _dtensor, sampling
from varlora.optim import _functional as F
from varlora.optim._dtensor import local

__all__ = ["IVON", "IVON_DEFAULTS", "OWN_STATE_KEY", "ParamPosterior", "validate_ivon_hyperparameters"]

#: The key of the optimizer's own entries (step and sample counters, generator states) in its state dict, beside
#: torch.optim's "state" and "param_groups"; saved checkpoints use it, so it never changes.
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

# Per-group options that groups of older pickled optimizers may lack, with the value they then take.
_BACKFILL: dict[str, Any] = {"hess_approx": "price", "rescale_lr": True, "debias": True}


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)") from None


def _rule(ok: Callable[[Any], bool], requirement: str, real: bool = True) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not ok(_real(name, value) if real else value):
            raise ValueError(f"Invalid {name}: {value!r} ({requirement})")
    return check


_RULES: dict[str, Callable[[str, Any], None]] = {
    "lr": _rule(lambda x: 0.0 <= x < math.inf, "must be finite and >= 0"),
    "ess": _rule(lambda x: 0.0 < x < math.inf, "must be finite and > 0"),
    "hess_init": _rule(lambda x: 0.0 < x < math.inf, "must be finite and > 0"),
    "beta1": _rule(lambda x: 0.0 <= x < 1.0, "must be in [0, 1)"),
    "beta2": _rule(lambda x: 0.0 <= x <= 1.0, "must be in [0, 1]"),
    "weight_decay": _rule(lambda x: 0.0 <= x < math.inf, "must be finite and >= 0"),
    "clip_radius": _rule(lambda x: x > 0.0, "must be > 0, inf for no clipping"),
    "mc_samples": _rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an int >= 1",
                        real=False),
    "hess_approx": _rule(lambda v: v in ("price", "gradsq"), "expected one of ('price', 'gradsq')", real=False),
    "rescale_lr": _rule(lambda v: isinstance(v, bool), "expected a bool", real=False),
    "debias": _rule(lambda v: isinstance(v, bool), "expected a bool", real=False),
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
        if name not in _RULES:
            raise ValueError(f"Unknown IVON hyper-parameter: {name!r} (expected one of {sorted(_RULES)})")
        _RULES[name](name, value)


class ParamPosterior(NamedTuple):
    """The mean-field Gaussian posterior of one parameter: :math:`q(\\theta) = \\mathcal N(m, \\sigma^2)`."""

    param: Tensor
    """The parameter itself (holds the mean, rounded to its dtype, outside ``sampled_params``)."""
    mean: Tensor
    """:math:`m` in the state dtype (fp32, fp64 for fp64 parameters); a live tensor: clone it to keep it."""
    std: Tensor
    """:math:`\\sigma = 1/\\sqrt{\\lambda (h + \\delta)}`, a fresh tensor in the state dtype."""


class _DiscardedSample(Exception):
    """Thrown into a ``sampled_params`` context by ``end_sample(discard=True)``: exit as if the body raised."""


def _state_dtype(p: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones."""
    return torch.promote_types(p.dtype, torch.float32)


def _seed(*values: object) -> int:
    """A 63-bit seed from values (BLAKE2b of their text): deterministic, and unrelated streams for unrelated values."""
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little") >> 1


def _runtime_fields() -> dict[str, Any]:
    """The optimizer's bookkeeping besides ``state`` and ``param_groups``, at its start (also back-filled into
    unpickled optimizers of older versions)."""
    return dict(
        _generator=None,  # the user's generator, None for private ones
        _generators={},  # noise source per device, keyed by str(device)
        _sampling=False,  # a sampled_params context is open
        _explicit_sample=None,  # the context begin_sample() entered
        _workspace={},  # per parameter: 2 buffers for a sample's σ/backup and offsets, then the step's sums
        _num_samples=0,  # training samples consumed since the last step
        _num_steps=0,  # step() calls so far
        _grad_norms=[],  # pre-clip gradient norms of this step's samples (max_grad_norm)
        _raw_stats={},  # what the last step measured, on device, finished lazily
        _stats=None,  # last_step_stats, once computed
    )


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
    they are consumed. Several ``backward()`` calls inside one context accumulate, at the same :math:`\theta_s`,
    the gradient of several micro-batches: scale each micro-batch loss so that ``p.grad`` ends up the gradient of
    the *mean* loss :math:`\ell`, as with any optimizer. Because gradients are consumed at context exit, clipping
    and AMP unscaling after the context would see nothing: pass ``grad_transform`` and/or ``max_grad_norm`` to
    :meth:`sampled_params`, which run on the sample's gradients just before they are consumed.

    **Parameters without a gradient.** Parameters with ``requires_grad=False`` are constants: never perturbed
    nor updated. A parameter that requires grad but gets ``p.grad is None`` in some samples of a step gets a
    zero gradient for those samples; if it gets no gradient in any sample of the step it is skipped, like
    ``torch.optim`` does: its mean, state and step count stay as they are.

    **Precision, memory and devices.** ``hess``, ``momentum`` and the gradient sums are kept in fp32 (fp64 for
    fp64 parameters). Parameters in bf16/fp16 also get an fp32 master copy of their mean (``state["mean"]``),
    which the updates act on and which the parameter holds rounded; where the parameter is changed from outside
    (e.g. loading weights), the master copy takes the new values at the next sample (an element-wise comparison
    on the device, no host sync). The optimizer keeps 4 floats per parameter (AdamW: 2): ``hess``, ``momentum``
    and two buffers reused every step, which hold a sample's :math:`\sigma` then backup of the weights and its
    offsets :math:`\theta_s - m`, then the step's sums; a step allocates no parameter-sized tensor.
    The math runs as ``torch._foreach_*`` ops per parameter group on every device; parameters may live on
    several devices.

    **Noise.** All noise comes from :mod:`varlora.optim.sampling`, the sampler of the saved posterior too: one
    ``torch.randn`` per sampled parameter, in optimizer order, on the parameter's device, from that device's
    generator. ``generator`` (a :class:`torch.Generator`) is the source for its device; generators for other
    devices are seeded from it. With ``None`` the optimizer seeds private generators from
    ``torch.initial_seed()`` when noise is first drawn (mixed with the rank when ``sync`` is on, so that ranks
    draw different noise). Their states are part of :meth:`state_dict`, so a resumed run draws the same noise.

    **Distributed.** With ``sync=True`` and an initialised default process group, every rank draws its own
    noise and, at ``step()``, the gradient and Hessian sums are all-reduced and divided by the total number of
    samples: the ranks act as MC samples (:math:`S` = ranks × ``mc_samples``) and all ranks apply the same
    update. Run the backward under ``DistributedDataParallel.no_sync()`` (or without DDP), so that each rank's
    gradient is that of its own sample. With ``sync=False`` nothing is communicated: under ordinary DDP every
    rank then must draw the same noise, which ``generator=None`` gives (the seed is not mixed with the rank).

    **Sharded parameters (FSDP2).** Parameters sharded by ``torch.distributed.fsdp.fully_shard`` are DTensors; the
    state (``hess``, ``momentum``, ``mean``, the two buffers) is created like them, so it shards with them, and the
    math runs on each rank's local shard. Every rank draws the noise of each *full* parameter and perturbs its shard
    with its slice, so with equal generators (``generator=None``, or the same seed on every rank) the weights that
    FSDP all-gathers for the forward are one sample :math:`\theta_s`, the one an unsharded process would draw, and
    the reduce-scattered gradient is the mean over ranks of their data's gradient at :math:`\theta_s`. Sharded IVON
    is therefore IVON with ``mc_samples`` shared samples per step on the global batch, and equals unsharded
    ``sync=False`` IVON whose ranks draw the same noise and average their gradients before they are consumed
    (``grad_transform``); ``sync=True`` is refused (``ValueError``): the ranks hold different shards, and FSDP
    already averaged the gradient. ``max_grad_norm`` clips the norm of the whole gradient, :attr:`last_step_stats`
    are sums over all shards, :meth:`posterior_std` returns a DTensor like the parameter, and :meth:`load_state_dict`
    cuts state tensors of a parameter's full shape (a gathered checkpoint) to this rank's shard.

    Args:
        params: parameters or parameter groups (dicts); every option below except ``mc_samples``, ``sync``,
            ``generator`` and ``stats_every`` can be set per group.
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
        generator: the noise source; ``None`` for private, deterministically seeded generators.
        stats_every: compute the statistics of :attr:`last_step_stats` on steps 1, N+1, 2N+1, ... (N >= 1).
            Default: 10.

    Beyond ``torch.optim``: :meth:`sampled_params` (training and evaluation samples), :meth:`posterior`,
    :meth:`posterior_mean` and :meth:`posterior_std`, :attr:`last_step_stats` (diagnostics to log),
    :meth:`discard_samples`, and for loops run by a framework :meth:`begin_sample`/:meth:`end_sample` and
    :meth:`draw_noise` (see :class:`varlora.integrations.IVONTrainer` for Hugging Face ``Trainer``).

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
        generator: torch.Generator | None = None,
        stats_every: int = 10,
    ) -> None:
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                        clip_radius=clip_radius, hess_approx=hess_approx, rescale_lr=rescale_lr, debias=debias)
        validate_ivon_hyperparameters(**defaults, mc_samples=mc_samples)
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 1:
            raise ValueError(f"Invalid stats_every: {stats_every!r} (must be an int >= 1)")
        if not isinstance(sync, bool):
            raise ValueError(f"Invalid sync: {sync!r} (expected a bool)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Invalid generator: {generator!r} (expected a torch.Generator or None)")
        self.mc_samples, self.sync, self.stats_every = mc_samples, sync, stats_every
        self.__dict__.update(_runtime_fields())
        if generator is not None:
            self._generator = generator
            self._generators[str(generator.device)] = generator
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its options are validated (``ValueError``) after defaults are filled in."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_ivon_hyperparameters(**{k: v for k, v in group.items() if k in _RULES})
            for p in group["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise ValueError(f"IVON needs real floating-point parameters, got one of dtype {p.dtype}")
                if self.sync and _dtensor.is_sharded(p):
                    raise ValueError("Invalid sync: True for parameters sharded by FSDP2 (DTensors): FSDP "
                                     "already averages the gradient over the ranks, which hold different shards; "
                                     "use sync=False")
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.pop("foreach", None)  # an option of older versions
            for key, value in _BACKFILL.items():
                group.setdefault(key, value)
        for key, value in {"mc_samples": 1, "sync": False, "stats_every": 10, **_runtime_fields()}.items():
            self.__dict__.setdefault(key, value)

    # ------------------------------------------------------------------------------------------------ state

    def _sampled(self) -> list[tuple[int, Tensor]]:
        """(group index, parameter) of every parameter that is sampled and trained: those requiring grad."""
        return [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.requires_grad]

    def _by_group(self, sampled: Sequence[tuple[int, Tensor]]) -> dict[int, list[int]]:
        """Indices into ``sampled`` by group index: what one functional call takes."""
        out: dict[int, list[int]] = defaultdict(list)
        for i, (gi, _) in enumerate(sampled):
            out[gi].append(i)
        return out

    def _init_states(self, sampled: Sequence[tuple[int, Tensor]]) -> list[dict[str, Any]]:
        """The state of each sampled parameter, created on first use; a low-precision parameter's master mean
        takes the parameter's values where they no longer round from it (changed from outside)."""
        states = []
        for gi, p in sampled:
            state = self.state[p]
            if "hess" not in state:
                state["step"] = 0  # updates applied to this parameter (t of the bias correction)
                dtype, layout = _state_dtype(p), torch.contiguous_format  # noise follows the logical layout
                state["hess"] = torch.full_like(p, self.param_groups[gi]["hess_init"], dtype=dtype,
                                                memory_format=layout)  # h: the diagonal Hessian estimate
                state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=layout)  # ḡ: the momentum
            if _state_dtype(p) != p.dtype:
                if "mean" not in state:  # m at full precision for a bf16/fp16 parameter, which holds it rounded
                    state["mean"] = p.detach().to(_state_dtype(p), copy=True)
                else:
                    mean, q = local(state["mean"]), local(p.detach())
                    torch.where(q == mean.to(q.dtype), mean, q.to(mean.dtype), out=mean)
            states.append(state)
        return states

    def _stds(self, sampled: Sequence[tuple[int, Tensor]], states: Sequence[dict[str, Any]],
              out: Sequence[Tensor] | None = None) -> list[Tensor]:
        """σ of each sampled parameter, in ``out`` when given (shaped, and sharded, like the parameter)."""
        stds = list(out) if out is not None else [torch.empty_like(s["hess"]) for s in states]
        for gi, idx in self._by_group(sampled).items():
            group = self.param_groups[gi]
            F.posterior_std([local(states[i]["hess"]) for i in idx], ess=group["ess"],
                            weight_decay=group["weight_decay"], out=[local(stds[i]) for i in idx])
        return stds

    def _buffers(self, sampled: Sequence[tuple[int, Tensor]], states: Sequence[dict[str, Any]]
                 ) -> tuple[list[Tensor], list[Tensor]]:
        """Two buffers per parameter, in the state dtype: reused from step to step (they hold the step's sums between
        the first sample and ``step()``, which hands them back), fresh for the further samples of a step."""
        pairs = [self._workspace.pop(p, None) if "grad_sum" not in state else None
                 for (_, p), state in zip(sampled, states, strict=True)]
        pairs = [pair or (torch.empty_like(s["hess"]), torch.empty_like(s["hess"])) for pair, s in
                 zip(pairs, states, strict=True)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The noise generator of ``device``, created (and seeded deterministically) on first use."""
        key = str(device)
        if key not in self._generators:
            if self._generator is not None:
                seed = int(torch.randint(0, 1 << 62, (1,), generator=self._generator).item())
            else:
                rank = dist.get_rank() if self.sync and dist.is_available() and dist.is_initialized() else 0
                seed = _seed(torch.initial_seed(), rank, key)
            self._generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[key]

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
                exactly at the mean (and still consumes the draws). Training samples need ``tau=1``.
            generator: draw the noise from this generator instead of the optimizer's (e.g. to keep evaluation
                from advancing the training noise stream).
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
        if self._sampling:
            raise RuntimeError("sampled_params() contexts cannot be nested")
        sampled = self._sampled()
        params = [p for _, p in sampled]
        if noise is not None and len(noise) != len(params):
            raise ValueError(f"noise has {len(noise)} tensors for {len(params)} sampled parameters")
        with torch.no_grad():
            states = self._init_states(sampled)
            buffers = self._buffers(sampled, states) if train else None
            stds = self._stds(sampled, states, out=None if buffers is None else buffers[0])  # σ, then the backup
        if train:
            for p in params:
                p.grad = None
        source = None if noise is not None else generator if generator is not None else self._generator_for
        means = [s.get("mean", p) for s, p in zip(states, params, strict=True)]
        self._sampling = True
        try:
            with sampling.perturbed_params(params, stds, tau=tau, generator=source, noise=noise, means=means,
                                           buffers=buffers):
                del stds
                yield
                if train:
                    self._transform_grads(params, grad_transform, max_grad_norm)
        finally:
            self._sampling = False
        if train:
            with torch.no_grad():
                self._consume(sampled, *buffers)  # the offsets are in the second buffers

    def _transform_grads(self, params: list[Tensor], grad_transform: Callable[[list[Tensor]], object] | None,
                         max_grad_norm: float | None) -> None:
        with_grad = [p for p in params if p.grad is not None]
        if any(p.grad.is_sparse for p in with_grad):
            raise RuntimeError("IVON does not support sparse gradients")
        if grad_transform is not None:
            grad_transform(with_grad)
        if max_grad_norm is not None:
            self._grad_norms.append(torch.nn.utils.clip_grad_norm_(with_grad, float(max_grad_norm)).detach())

    def _consume(self, sampled: list[tuple[int, Tensor]], spare: list[Tensor], offsets: list[Tensor]) -> None:
        """Fold the gradients of the sample that just ended into the step's sums; reset ``p.grad``. A step's first
        sums are the sample's two buffers (``spare``, the backup's, and ``offsets``)."""
        for gi, idx in self._by_group(sampled).items():
            price = self.param_groups[gi]["hess_approx"] == "price"
            with_grad = [i for i in idx if sampled[i][1].grad is not None]
            started = [i for i in with_grad if "grad_sum" in self.state[sampled[i][1]]]
            new = [i for i in with_grad if i not in started]
            for i in set(idx) - set(with_grad) - {i for i in idx if "grad_sum" in self.state[sampled[i][1]]}:
                self._workspace[sampled[i][1]] = (spare[i], offsets[i])  # unused this time: keep for the next
            for i in new:
                state = self.state[sampled[i][1]]
                state["grad_sum"] = spare[i]  # Σ_s g_s over this step's samples
                state["hess_sum"] = offsets[i]  # Σ_s g_s⊙d_s (price) or Σ_s g_s⊙g_s (gradsq)
            for sel, accumulate in ((new, F.start_sums_), (started, F.add_sample_)):
                if sel:
                    states = [self.state[sampled[i][1]] for i in sel]
                    accumulate([local(s["grad_sum"]) for s in states], [local(s["hess_sum"]) for s in states],
                               [local(sampled[i][1].grad) for i in sel], [local(offsets[i]) for i in sel],
                               price=price)
        for _, p in sampled:
            p.grad = None
        self._num_samples += 1

    # ---------------------------------------------------------------------------------- framework hooks

    def begin_sample(self, train: bool = False, **kwargs: Any) -> None:
        """Enter :meth:`sampled_params` without a ``with`` block; :meth:`end_sample` leaves it.

        For loops run by a framework, where the body of a sample (forward, backward, gradient clipping) spans
        several hooks. Takes the arguments of :meth:`sampled_params` and behaves like entering it.
        """
        if self._sampling:
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
        context: AbstractContextManager[None] | None = self._explicit_sample
        self._explicit_sample = None
        if context is None:
            raise RuntimeError("end_sample() without an open begin_sample()")
        if discard:
            context.__exit__(_DiscardedSample, _DiscardedSample(), None)  # restores; returns False
        else:
            context.__exit__(None, None, None)

    def draw_noise(self, generator: torch.Generator | None = None) -> list[Tensor]:
        r"""Standard-normal :math:`\epsilon`, one tensor per sampled parameter (``requires_grad``, optimizer
        order, state dtype), from the optimizer's noise stream (or ``generator``), for
        ``sampled_params(noise=...)``: the draws a ``sampled_params`` context would make.

        For loops that interleave samples, e.g. ``mc_samples`` samples each evaluated on every micro-batch of
        a gradient accumulation window: draw each sample's :math:`\epsilon` once, then re-enter it per
        micro-batch. The stream is part of :meth:`state_dict`, so a resumed run draws the same values. For a
        parameter sharded by FSDP2 it is a DTensor like the parameter: this rank's slice of the full draw.
        """
        like = [p for _, p in self._sampled()]
        eps = sampling.standard_normal(like, generator if generator is not None else self._generator_for)
        return [_dtensor.wrap(e, p) for e, p in zip(eps, like, strict=True)]

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
        if self._sampling:
            raise RuntimeError("step() cannot be called inside sampled_params()")
        if self._num_samples != self.mc_samples:
            raise RuntimeError(
                f"step() after {self._num_samples} sampled_params(train=True) contexts, expected mc_samples="
                f"{self.mc_samples}; to accumulate micro-batches, call backward() several times inside one context")
        sampled = self._sampled()
        num_samples = self._num_samples
        if self.sync and dist.is_available() and dist.is_initialized():
            num_samples = self._all_reduce_sums([p for _, p in sampled])
        todo = [(gi, p) for gi, p in sampled if "grad_sum" in self.state[p]]
        self._num_steps += 1
        with_stats = (self._num_steps - 1) % self.stats_every == 0
        totals: dict[torch.device, Tensor] = {}  # per device: clipped coordinates, Σh, Σσ, Σ grad norms
        for state in (self.state[p] for _, p in todo):
            state["step"] += 1
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)  # (group, step count): one bias correction
        for i, (gi, p) in enumerate(todo):
            buckets[gi, self.state[p]["step"]].append(i)
        for (gi, t), idx in buckets.items():
            group = self.param_groups[gi]
            params = [todo[i][1] for i in idx]
            states = [self.state[p] for p in params]
            hessians = [s["hess"] for s in states]
            sums = [(s.pop("grad_sum"), s.pop("hess_sum")) for s in states]
            counts = F.update_(
                [local(s.get("mean", p)) for s, p in zip(states, params, strict=True)],
                [local(g) for g, _ in sums],
                [local(e) for _, e in sums],
                [local(s["momentum"]) for s in states],
                [local(h) for h in hessians],
                num_samples=num_samples,
                lr=group["lr"] * (group["hess_init"] + group["weight_decay"] if group["rescale_lr"] else 1.0),
                ess=group["ess"],
                beta1=group["beta1"],
                beta2=group["beta2"],
                weight_decay=group["weight_decay"],
                clip_radius=group["clip_radius"],
                bias_correction=1.0 - group["beta1"] ** t if group["debias"] else 1.0,
                price=group["hess_approx"] == "price",
                count_clipped=with_stats,
            )
            for p, state, pair in zip(params, states, sums, strict=True):
                self._workspace[p] = pair  # the next step's sample buffers
                if "mean" in state:
                    local(p).copy_(local(state["mean"]))
            if with_stats:
                hessians = [local(h) for h in hessians]  # this rank's shards: summed over ranks below
                stds = F.posterior_std(hessians, ess=group["ess"], weight_decay=group["weight_decay"])
                for k, (h, std) in enumerate(zip(hessians, stds, strict=True)):
                    acc = totals.setdefault(h.device, torch.zeros(4, dtype=torch.float64, device=h.device))
                    acc[1] += h.sum(dtype=torch.float64)
                    acc[2] += std.sum(dtype=torch.float64)
                    if counts is not None:
                        acc[0] += counts[k]
        sharded = next((p for _, p in todo if _dtensor.is_sharded(p)), None)
        if with_stats and sharded is not None:  # shard sums → sums over the whole parameters
            for acc in (totals[d] for d in sorted(totals, key=str)):
                dist.all_reduce(acc, group=sharded.device_mesh.get_group())
        if with_stats and self._grad_norms:
            norm = torch.stack([_dtensor.full(n).double() for n in self._grad_norms]).mean()
            totals.setdefault(norm.device, torch.zeros(4, dtype=torch.float64, device=norm.device))[3] += norm
        self._raw_stats = dict(step=self._num_steps, num_samples=num_samples, skipped=len(sampled) - len(todo),
                               numel=sum(p.numel() for _, p in todo), sums=totals if with_stats else None,
                               grad_norm=bool(self._grad_norms))
        self._num_samples, self._grad_norms, self._stats = 0, [], None
        return loss

    def _all_reduce_sums(self, params: list[Tensor]) -> int:
        """Sum the gradient and Hessian sums and the sample counts over ranks; return the total count."""
        if not params:
            return self._num_samples
        flags = torch.tensor([float(self._num_samples)] + [float("grad_sum" in self.state[p]) for p in params],
                             dtype=torch.float64, device=params[0].device)
        dist.all_reduce(flags)
        tensors: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p, has in zip(params, flags[1:].tolist(), strict=True):
            if not has:  # no rank has a gradient for p: skipped everywhere
                continue
            state = self.state[p]
            if "grad_sum" not in state:  # others have one: this rank's contribution is zero
                state["grad_sum"], state["hess_sum"] = torch.zeros_like(state["hess"]), torch.zeros_like(state["hess"])
            for key in ("grad_sum", "hess_sum"):
                tensors[state[key].device, state[key].dtype].append(state[key])
        for ts in tensors.values():
            flat = torch._utils._flatten_dense_tensors(ts)
            dist.all_reduce(flat)
            torch._foreach_copy_(ts, torch._utils._unflatten_dense_tensors(flat, ts))
        return int(flags[0].item())

    # -------------------------------------------------------------------------------------------- posterior

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("the tensor is not a parameter of this optimizer")

    def _std(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        state = self.state.get(p, {})
        hess = state["hess"] if "hess" in state else torch.full_like(p, group["hess_init"], dtype=_state_dtype(p))
        std = torch.empty_like(hess)  # sharded like p
        F.posterior_std([local(hess)], ess=group["ess"], weight_decay=group["weight_decay"], out=[local(std)])
        return std

    def _posterior(self, p: Tensor, group: dict[str, Any]) -> ParamPosterior:
        if self._sampling:
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

        Usable to save the posterior or to sample outside the optimizer. ``RuntimeError`` inside
        ``sampled_params`` (the parameters then hold a sample, not the mean).
        """
        for gi, p in self._sampled():
            yield self._posterior(p, self.param_groups[gi])

    @property
    def last_step_stats(self) -> dict[str, Any]:
        r"""Diagnostics of the last ``step()`` (``{}`` before any step).

        Always: ``step`` (number of ``step()`` calls), ``num_samples`` (samples averaged, over all ranks with
        ``sync``) and ``skipped_params`` (parameters without a gradient in the step). On the steps
        :math:`1, N+1, 2N+1, \ldots` with :math:`N` = ``stats_every`` also ``clip_fraction`` (fraction of the
        step's updated coordinates whose update hit ``clip_radius``), ``hess_mean`` and ``sigma_mean`` (means of
        :math:`h` and :math:`\sigma` over those coordinates) and ``grad_norm`` (mean pre-clip gradient norm of
        the samples when ``max_grad_norm`` was used, else None); on other steps these keys are absent. Reading
        them costs one host sync per device, once per step. Log ``clip_fraction``: near 1, IVON degenerates
        into :math:`\alpha\rho\,\mathrm{sign}(\bar g)` and ``clip_radius`` is too small.
        """
        if self._stats is None and self._raw_stats:
            raw = self._raw_stats
            stats = dict(step=raw["step"], num_samples=raw["num_samples"], skipped_params=raw["skipped"])
            if raw["sums"] is not None:
                clipped, hess_sum, sigma_sum, norm = (sum(v) for v in zip(*(a.tolist() for a in raw["sums"].values()),
                                                                         strict=True)) if raw["sums"] else (0,) * 4
                count = raw["numel"]
                stats |= dict(clip_fraction=clipped / count if count else 0.0,
                              hess_mean=hess_sum / count if count else float("nan"),
                              sigma_mean=sigma_sum / count if count else float("nan"),
                              grad_norm=norm if raw["grad_norm"] else None)
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
        if self._sampling:
            raise RuntimeError("state_dict() cannot be called inside sampled_params(): the weights are perturbed")
        out = super().state_dict()
        out[OWN_STATE_KEY] = {"num_samples": self._num_samples, "num_steps": self._num_steps,
                              "generators": {key: gen.get_state() for key, gen in self._generators.items()}}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`; state tensors are copied to each parameter's device in the
        state dtype (never downcast to a bf16 parameter's dtype, unlike ``torch.optim``). Generator states
        saved for devices this optimizer has are restored.

        A state dict of varlora's IVON before its noise came from :mod:`varlora.optim.sampling` (it records a
        ``noise_path``) loads with a ``UserWarning``: the posterior, momentum and counters are restored exactly,
        but the noise from then on differs from that of the uninterrupted run, which drew it from per-step flat
        buffers (and, on CPU, from compiled kernels) that no longer exist.
        """
        if self._sampling:
            raise RuntimeError("load_state_dict() cannot be called inside sampled_params()")
        state_dict = dict(state_dict)
        extra = state_dict.pop(OWN_STATE_KEY, {})
        if "noise_path" in extra:
            warnings.warn(
                f"this IVON state dict was written by an older varlora (noise path {extra['noise_path']!r}); the "
                "posterior, momentum and step counters load exactly, but the training noise from here on differs from "
                "that of the uninterrupted run (same distribution): a bit-exact resume needs the varlora that wrote it",
                stacklevel=2)
        saved_state = state_dict.get("state", {})
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:
            group.pop("foreach", None)  # an option of older versions
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_id = dict(zip(saved_ids, [p for g in self.param_groups for p in g["params"]], strict=True))
        for key, values in saved_state.items():
            p = by_id.get(key)
            if p is None:
                continue
            dtype = _state_dtype(p)
            state = {k: v.to(device=p.device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
                     if isinstance(v, Tensor) else v for k, v in values.items()}
            state = {k: _dtensor.like(v, p) if isinstance(v, Tensor) and v.shape == p.shape else v  # a full tensor
                     for k, v in state.items()}  # of a sharded parameter: this rank's shard
            if isinstance(state.get("step"), Tensor):
                state["step"] = int(state["step"].item())
            if dtype == p.dtype:
                state.pop("mean", None)  # saved from a low-precision copy of this parameter
            self.state[p] = state
        self._num_samples = int(extra.get("num_samples", 0))
        self._num_steps = int(extra.get("num_steps", 0))
        self._grad_norms, self._raw_stats, self._stats, self._workspace = [], {}, None, {}
        devices = {str(p.device) for g in self.param_groups for p in g["params"]}
        if self._generator is not None:
            devices.add(str(self._generator.device))
        for key, gen_state in extra.get("generators", {}).items():
            if key in devices:
                if key not in self._generators:
                    self._generators[key] = torch.Generator(device=torch.device(key))
                self._generators[key].set_state(gen_state.cpu() if isinstance(gen_state, Tensor) else gen_state)
