r"""FSDP2 over the base and the LoRA layers (``model.sharding=fsdp``), for a base that does not fit one device.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer (the classes the model
names in ``_no_split_modules``), then to the whole model: each parameter, frozen base weight or LoRA factor,
becomes a :class:`~torch.distributed.tensor.DTensor` whose local tensor is this rank's dim-0 shard. Before a
layer's forward (and again in its backward) its parameters are all-gathered, and after the backward the gradients
are reduce-scattered and averaged over ranks: each rank keeps the gradient of its shard of the global-batch mean
loss. Every module frees its gathered weights after its forward (``reshard_after_forward=True``, the root too), so
between forwards the parameters are only their shards: IVON perturbs and restores them there.

The methods see the same :class:`~varlora.session.Session` as without sharding; the differences are where data
crosses ranks:

- AdamW: the sharded gradients are already averaged (:func:`varlora.distributed.average_gradients` leaves
  DTensor gradients alone); clipping and ``torch.optim.AdamW`` work on DTensors, and its state shards with them.
- IVON: one shared sample per step. Every rank draws the noise of each full parameter from the same generator and
  perturbs its shard (:mod:`varlora.optim.sampling`), so the all-gathered weights are the one sample
  :math:`\theta_s = m + \sigma\odot\epsilon_s` that an unsharded process would use; the gradient is the average
  of the ranks' halves of the batch, and ``IVON(sync=False)`` updates each shard of :math:`m, h, \bar g` (DTensors
  created like the parameters). This is IVON on the global batch with ``mc_samples`` samples per step, as on one
  process — not the data-parallel path, where each rank is one MC sample.
- Checkpoints and the saved adapter and posterior hold full tensors (:func:`full_tensors`, :func:`full_weights`,
  :meth:`varlora.posterior.Posterior.from_optimizer`: collectives every rank enters) and are written by rank 0;
  a resume cuts them to the shards again (:func:`varlora.optim._dtensor.like`). So ``final/`` loads in one
  process, unsharded, and predicts the same.
- Forwards are collectives (each all-gathers), so every rank runs as many: in evaluation every rank scores as many
  batches as the busiest one (:func:`varlora.evaluate.predict_logits`), and the cloze scorer runs its
  continuation forward also for a batch of one-token continuations (:class:`varlora.scoring.ClozeScorer`).
- Evaluation with ``eval.batched_samples`` runs the samples one forward each (the folded forward needs whole LoRA
  weights).

Only rank 0 reads the base (:func:`load_sharded_model`, as accelerate's ``cpu_ram_efficient_loading`` and
torchtitan do): it loads the base onto the host, while the other ranks build the same model on the meta device
(:func:`varlora.models.empty_base_model`, no memory); every rank attaches LoRA and shards, then receives its
shards of rank 0's full state dict, broadcast one tensor at a time (:func:`load_from_rank0`). So the base is on
the host once, in rank 0's memory until the shards are out, and on the GPUs only as shards (a 70B bf16 base on 8
GPUs: 140 GB of host memory for rank 0 while loading, none for the others; 17.5 GB of weights per GPU). A base given
in memory (:func:`varlora.session.setup`'s ``base_model``) is every rank's own and is sharded as it is. With one
process nothing is sharded (the model is used as is). Quantised (bitsandbytes) bases cannot be sharded. Tested on
CPU with gloo (``tests/test_fsdp.py``, gradient checkpointing included); not tested on GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from varlora import distributed
from varlora.config import ConfigError, LoraArgs, ModelArgs, RunConfig
from varlora.models import attach_lora, empty_base_model, load_base_model
from varlora.optim._dtensor import full, like
from varlora.optim._dtensor import is_sharded as is_dtensor

__all__ = ["full_tensors", "full_weights", "is_sharded", "load_from_rank0", "load_sharded_model", "shard_model",
           "shard_optimizer_state", "shards"]


def shards(config: RunConfig) -> bool:
    """Whether a run of ``config`` in this process shards its model: ``model.sharding=fsdp`` and several ranks."""
    return config.model.sharding == "fsdp" and distributed.active()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module) -> None:
    """``fully_shard`` each decoder layer of a (peft-wrapped) transformers model, then the model, over all ranks;
    the parameters move to this rank's device (the mesh's) shard by shard."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"invalid model.sharding='fsdp': {type(base).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)


def load_sharded_model(args: ModelArgs, lora: LoraArgs, seed: int) -> PeftModel:
    """The base of ``args`` with LoRA initialised from ``seed`` (:func:`varlora.models.attach_lora`), sharded over
    the ranks (:func:`shard_model`), the base read by rank 0 only: rank 0 loads it onto the host, the other ranks
    build it on the meta device (:func:`varlora.models.empty_base_model`), and after sharding every rank receives its
    shards of rank 0's weights, LoRA's included (:func:`load_from_rank0`). Every rank enters."""
    if distributed.is_main():
        model = attach_lora(load_base_model(args, torch.device("cpu")), lora, seed=seed)
        full_state = model.state_dict()  # keeps the full tensors through fully_shard, until they are broadcast
    else:
        model, full_state = attach_lora(empty_base_model(args), lora, seed=seed), {}
    shard_model(model)
    load_from_rank0(model, full_state)
    return model


def load_from_rank0(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Give every rank of the sharded ``model`` (:func:`shard_model`) its shards of rank 0's ``state_dict`` (full
    tensors, e.g. the state dict of the model before sharding; ``{}`` on the other ranks) and rank 0's
    non-persistent buffers, which no state dict holds (e.g. rotary ``inv_freq``).

    A rank whose model is on the meta device first allocates its shards and buffers on its device
    (``to_empty``; tied parameters stay one parameter); torch's ``set_model_state_dict`` with
    ``broadcast_from_rank0`` then broadcasts each full tensor and every rank copies its slice into its shard. Peak
    memory beyond the shards: one full tensor at a time. Every rank enters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.device.type == "meta" for t in chain(model.parameters(), model.buffers())):
        model.to_empty(device=distributed.local_device())
    set_model_state_dict(model, state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for module in model.modules():
            for name in sorted(module._non_persistent_buffers_set):
                if (buffer := module._buffers.get(name)) is not None:
                    dist.broadcast(buffer, src=0)


def full_tensors(value: Any) -> Any:
    """``value`` (nested dicts, lists, tuples) with every DTensor replaced by its full tensor: a collective, in
    the nesting order, so every rank must call it on a value of the same structure."""
    if isinstance(value, Mapping):
        return {k: full_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(full_tensors(v) for v in value)
    return full(value) if isinstance(value, torch.Tensor) else value


def shard_optimizer_state(state_dict: dict[str, Any], params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """A ``torch.optim`` state dict of full tensors (:func:`full_tensors`) with each tensor of a parameter's shape
    cut to this rank's shard of that parameter (``params`` in ``param_groups`` order), for ``load_state_dict``."""
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params, strict=True))
    state = {key: {k: like(v, by_id[key]) if isinstance(v, torch.Tensor) and v.shape == by_id[key].shape else v
                   for k, v in values.items()} for key, values in state_dict["state"].items()}
    return {**state_dict, "state": state}


@contextmanager
def full_weights(model: nn.Module, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Inside the block, ``model``'s parameters named in ``params`` are their full tensors (gathered: every rank
    enters), so that code reading or loading the model's weights, e.g. peft's ``save_pretrained`` and
    ``set_peft_model_state_dict``, sees the whole adapter; on exit each rank copies its shard of what they then hold
    back into the sharded parameters, which are put back. Nothing happens for unsharded parameters."""
    swapped = []
    for name, param in params.items():
        if not is_dtensor(param):
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        swapped.append((module, attr, param))
        module._parameters[attr] = nn.Parameter(full(param.detach()), requires_grad=param.requires_grad)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, attr, param in swapped:
                param.copy_(like(module._parameters[attr].detach(), param))
                module._parameters[attr] = param
