"""A nested state (dicts, lists, tuples of tensors and plain values) as one safetensors file, without pickle.

Loading a pickle runs whatever code the file names, so a state file from an untrusted source must not be one.
Here the tensors (and NumPy arrays) go in a safetensors file and everything else in a JSON description kept in
that file's metadata; reading it builds only dicts, lists, tuples, tensors, arrays, str, int, float, bool and
None, whatever the file says. A SHA-256 over the JSON and every tensor's dtype, shape and bytes is recorded with
them, so a truncated or corrupted file is refused rather than half-read.

The JSON is the state with every container tagged, so that each value comes back with its type::

    None, true, 3, 0.5, "text"      themselves (non-finite floats as {"float": "nan" | "inf" | "-inf"})
    [...]                           a list
    {"tuple": [...]}                a tuple
    {"dict": {"key": ...}}          a dict whose keys are all strings (in order)
    {"items": [[key, value], ...]}  any other dict (e.g. int keys, as in ``torch.optim`` state dicts)
    {"tensor": "7"}                 the tensor stored under that name (on the CPU when read back)
    {"ndarray": "8"}                a NumPy array, stored as a tensor

Subclasses come back as their base type (a ``torch.Size`` or a named tuple as a tuple, a float subclass as a
float); any other type is refused when the state is written, naming where it is.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from varlora import _io

__all__ = ["FORMAT", "dumps", "load"]

#: The ``format`` entry of the metadata of a state file.
FORMAT = "varlora-state/1"


def dumps(state: Any) -> bytes:
    """The bytes of the state file of ``state``.

    Raises TypeError naming the first value (by its path in ``state``) that is none of the types above.
    """
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(_describe(state, tensors, "state"), allow_nan=False, separators=(",", ":"))
    metadata = {"format": FORMAT, "state": text, "sha256": _digest(text, tensors)}
    return save(tensors, metadata=metadata)


def load(path: str | Path) -> Any:
    """The state in the file ``path``; ValueError naming the file when it is missing, truncated, corrupted or not
    a state file."""
    tensors, metadata = _io.read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a varlora state file (its format is {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    text = metadata.get("state", "")
    if metadata.get("sha256") != _digest(text, tensors):
        raise ValueError(f"{path} is corrupted: its content is not the one whose SHA-256 was recorded when it was "
                         "written")
    try:
        return _rebuild(json.loads(text), tensors)
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # consistent, but not understood
        raise ValueError(f"{path} holds a state this version of varlora cannot read ({err})") from err


def _describe(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``value`` as tagged JSON; its tensors (copied to the CPU) added to ``tensors``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Tensor | np.ndarray):
        name = str(len(tensors))
        if isinstance(value, np.ndarray):
            tensors[name] = torch.from_numpy(np.array(value, copy=True, order="C"))
            return {"ndarray": name}
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # owns its memory: none is shared
        return {"tensor": name}
    if isinstance(value, list):
        return [_describe(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_describe(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _describe(v, tensors, f"{path}[{k!r}]") for k, v in value.items()}}
        return {"items": [[_describe(k, tensors, f"{path} key {k!r}"), _describe(v, tensors, f"{path}[{k!r}]")]
                          for k, v in value.items()]}
    raise TypeError(f"cannot store {path} (a {type(value).__module__}.{type(value).__qualname__}) in a state file: "
                    "only tensors, NumPy arrays, dicts, lists, tuples, str, int, float, bool and None")


_TAGS = ("float", "tuple", "dict", "items", "tensor", "ndarray")


def _rebuild(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value that :func:`_describe` turned into ``node``."""
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [_rebuild(v, tensors) for v in node]
    if not (isinstance(node, dict) and len(node) == 1 and next(iter(node)) in _TAGS):
        raise ValueError(f"unknown entry {json.dumps(node)[:80]}")
    [(tag, body)] = node.items()
    if tag == "float":
        if body not in ("nan", "inf", "-inf"):
            raise ValueError(f"unknown float {body!r}")
        return float(body)
    if tag == "tuple":
        return tuple(_rebuild(v, tensors) for v in body)
    if tag == "dict":
        return {k: _rebuild(v, tensors) for k, v in body.items()}
    if tag == "items":
        return {_rebuild(k, tensors): _rebuild(v, tensors) for k, v in body}
    return tensors[body] if tag == "tensor" else tensors[body].numpy()


def _digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the JSON and of each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
