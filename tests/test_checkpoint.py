"""Checkpoints without pickle: the state file round-trips every type a training state holds, refuses what it
cannot store, detects damage, and cannot be made to run code; old pickled checkpoint.pt files load with exactly
the globals they need and nothing more."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from varlora import _state_file
from varlora.checkpoint import LEGACY_GLOBALS, read_checkpoint, rng_state
from varlora.schedule import linear_schedule

LEGACY = Path(__file__).parent / "data" / "checkpoint_pt_blob_step2.pt"  # written by varlora d2e7fc9 (pickle)


def assert_same(a, b, path: str = "state") -> None:
    """Equal values of the same types, recursively: tensors bitwise with their dtype and shape, arrays too,
    floats to the bit (NaN equals NaN, -0.0 is not 0.0), tuples are not lists, bools are not ints."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _trained_adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(1, 10))
    for _ in range(3):
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _state() -> dict:
    """Every kind of value of the training states: torch.optim and scheduler state dicts (int keys, tuples), an
    IVON-like extra entry (ints, strings, generator states keyed by device), RNG states of torch, Python and
    NumPy, tensors of many dtypes and shapes, and awkward floats and ints."""
    _, optimizer, scheduler = _trained_adamw()
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ivon": {"step": 7, "kind": "ivon", "generators": {"cpu": torch.Generator().manual_seed(3).get_state()}},
        "rng": rng_state(),
        "tensors": [torch.randn(2, 3, dtype=torch.float64), torch.randn(4).to(torch.bfloat16), torch.tensor(3.5),
                    torch.zeros(0, 3), torch.arange(6, dtype=torch.int32).view(2, 3).t(),  # not contiguous
                    torch.tensor([True, False]), torch.arange(5, dtype=torch.uint8), torch.randn(3).half()],
        "floats": [0.1, -0.0, 1e-310, float("nan"), float("inf"), float("-inf"), 1 / 3],
        "plain": {"none": None, "yes": True, "no": False, "big": 2**80, "neg": -3, "text": "ünïcødé \"quoted\" \n"},
        "keys": {0: "int key", "0": "str key", (1, 2): "tuple key", None: "none key", 2.5: "float key"},
        "nested": ([[], {}], ((),)),
    }


def test_a_state_round_trips_exactly(tmp_path):
    state = _state()
    path = tmp_path / "state.safetensors"
    path.write_bytes(_state_file.dumps(state))
    assert_same(state, _state_file.load(path))


def test_a_restored_optimizer_and_rng_continue_identically(tmp_path):
    """Loaded into fresh objects, the saved optimizer, scheduler and RNG states continue exactly as the saved
    ones do."""
    from varlora.checkpoint import set_rng_state

    model, optimizer, scheduler = _trained_adamw()
    path = tmp_path / "state.safetensors"
    path.write_bytes(_state_file.dumps({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "rng": rng_state()}))
    loaded = _state_file.load(path)

    def go_on(model, optimizer, scheduler):
        draws = (torch.rand(3), random.random(), np.random.rand(2))
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        return [p.detach().clone() for p in model.parameters()], scheduler.get_last_lr(), draws

    expected = go_on(model, optimizer, scheduler)
    again, optimizer2, scheduler2 = _trained_adamw()
    again.load_state_dict(loaded["model"])
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["scheduler"])
    set_rng_state(loaded["rng"])
    got = go_on(again, optimizer2, scheduler2)
    assert all(torch.equal(a, b) for a, b in zip(expected[0], got[0], strict=True))
    assert expected[1] == got[1] and torch.equal(expected[2][0], got[2][0]) and expected[2][1] == got[2][1]
    assert np.array_equal(expected[2][2], got[2][2])


def test_what_a_state_file_cannot_hold_is_refused_naming_where():
    with pytest.raises(TypeError, match=r"cannot store state\['method'\]\['hooks'\]\[1\] \(a builtins.object\) "
                                        r"in a state file: only tensors, NumPy arrays"):
        _state_file.dumps({"method": {"hooks": [1, object()]}})
    with pytest.raises(TypeError, match=r"cannot store state\['x'\] \(a numpy.int64\)"):
        _state_file.dumps({"x": np.int64(3)})


def _forged(path: Path, entry: object) -> None:
    """A state file with a valid digest whose JSON holds ``entry``: what a forger who knows the format can do."""
    text = json.dumps({"dict": {"x": entry}})
    save_file({}, str(path), metadata={"format": _state_file.FORMAT, "state": text,
                                       "sha256": _state_file._digest(text, {})})


@pytest.mark.parametrize("entry", [{"pickle": "gASVIQAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAJpZJSFlFKULg=="},
                                   {"__reduce__": ["os.system", ["touch x"]]}, {"tensor": "missing"},
                                   {"float": "1e5"}, {"dict": [1, 2]}])
def test_a_forged_state_file_builds_nothing_but_plain_values(tmp_path, entry):
    """Only the tags of the format are read; anything else is refused with the file's name (no type is ever
    looked up by a name the file gives)."""
    path = tmp_path / "forged.safetensors"
    _forged(path, entry)
    with pytest.raises(ValueError, match=rf"{path} holds a state this version of varlora cannot read"):
        _state_file.load(path)


@pytest.mark.parametrize("where", ["tensor bytes", "json", "truncated", "not a state file"])
def test_a_damaged_state_file_is_named(tmp_path, where):
    path = tmp_path / "checkpoint.safetensors"
    data = _state_file.dumps({"w": torch.arange(64, dtype=torch.float32), "step": 12345})
    if where == "tensor bytes":  # one bit of the last tensor's data
        data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    elif where == "json":  # the step, inside the header, still valid JSON
        data = data.replace(b"12345", b"12346")
    elif where == "truncated":
        data = data[: len(data) // 2]
    else:
        save_file({"w": torch.zeros(2)}, str(path))
    if where != "not a state file":
        path.write_bytes(data)
    expected = {"tensor bytes": "is corrupted: its content is not the one whose SHA-256 was recorded",
                "json": "is corrupted: its content is not the one whose SHA-256 was recorded",
                "truncated": "is unreadable", "not a state file": "is not a varlora state file"}[where]
    with pytest.raises(ValueError, match=expected) as info:
        _state_file.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=r"is unreadable \(truncated or corrupted: .*\); delete it to restart the run"):
        read_checkpoint(path)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_checkpoint_cannot_run_code(tmp_path):
    """A checkpoint.pt whose unpickling runs a command (checked: a plain torch.load runs it) is refused by name,
    with the global it needs, and the command never runs."""
    marker, path = tmp_path / "code-ran", tmp_path / "checkpoint.pt"
    torch.save({"step": 3, "method_name": "adamw", "payload": _RunsCode(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()  # the payload is live
    marker.unlink()
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    assert str(info.value) == (f"{path} is not a checkpoint written by varlora: it is a pickle that needs "
                               "posix.system, which varlora's checkpoints never hold, so it was not loaded (unpickling "
                               "it could run code); delete it to restart the run")
    assert not marker.exists()


def test_an_old_checkpoint_loads_with_exactly_the_globals_it_needs(tmp_path):
    """The fixture (a BLoB run's checkpoint.pt of step 2 written by the pickle-based code) loads; without any one
    of LEGACY_GLOBALS it does not."""
    state = read_checkpoint(LEGACY)
    assert state["step"] == 2 and state["method_name"] == "blob"
    assert set(state["method"]) == {"params", "rho", "optimizer", "scheduler", "kl_optimizer", "kl_scheduler", "noise"}
    assert state["rng"]["numpy"][1].dtype == np.uint32 and isinstance(state["rng"]["python"], tuple)
    for missing in LEGACY_GLOBALS:
        with torch.serialization.safe_globals([g for g in LEGACY_GLOBALS if g is not missing]), \
                pytest.raises(Exception, match="Weights only load failed"):
            torch.load(LEGACY, weights_only=True)
    # rewritten in the new format, it holds the same state
    (tmp_path / "checkpoint.safetensors").write_bytes(_state_file.dumps(state))
    assert_same(state, read_checkpoint(tmp_path / "checkpoint.safetensors"))
