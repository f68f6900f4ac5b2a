"""Atomic writes leave the old file intact when the writer fails; torn JSONL tails are dropped."""

import contextlib
import os
from pathlib import Path

import pytest

from varlora import _io


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    _io.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), _io.atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert path.read_text().strip() == '{\n  "a": 1\n}'
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "final"
    with _io.atomic_dir(target) as folder:
        (folder / "x").write_text("1")
    with pytest.raises(RuntimeError), _io.atomic_dir(target) as folder:
        (folder / "y").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["x"]


def test_read_jsonl_drops_a_torn_last_line_but_not_a_bad_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert _io.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl: line 2"):
        _io.read_jsonl(path)


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _io.write_text(tmp_path / "a.txt", "x")
        with _io.atomic_dir(tmp_path / "final") as folder:
            (folder / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755


class Crash(Exception):
    """Stands for the process being killed."""


@pytest.mark.parametrize("swap", [True, False])
def test_atomic_dir_never_leaves_nothing_in_place(tmp_path, monkeypatch, swap):
    """A crash at the worst moment of the replacement leaves the old folder findable (swap: in place; two
    renames: under .final.previous, put back by the next atomic_dir)."""
    target = tmp_path / "final"
    with _io.atomic_dir(target) as folder:
        (folder / "old").write_text("1")
    if not swap:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def crash_after_first_rename(src, dst):
        real_replace(src, dst)
        if Path(dst).name == ".final.previous":
            raise Crash

    monkeypatch.setattr(_io.os, "replace", crash_after_first_rename)
    with pytest.raises(Crash) if not swap else contextlib.nullcontext(), _io.atomic_dir(target) as folder:
        (folder / "new").write_text("2")
    if swap:  # one atomic exchange, nothing to crash between
        assert sorted(p.name for p in target.iterdir()) == ["new"]
        return
    assert not target.exists() and (tmp_path / ".final.previous" / "old").exists()
    monkeypatch.setattr(_io.os, "replace", real_replace)
    with pytest.raises(RuntimeError), _io.atomic_dir(target):
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["old"]  # recovered
    with _io.atomic_dir(target) as folder:
        (folder / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_atomic_writes_do_not_touch_the_umask(tmp_path, monkeypatch):
    def forbidden(mask):
        raise AssertionError("os.umask is process-wide state")

    monkeypatch.setattr(_io.os, "umask", forbidden)
    _io.write_text(tmp_path / "a.txt", "x")
    with _io.atomic_dir(tmp_path / "d"):
        pass
    assert (tmp_path / "a.txt").read_text() == "x" and (tmp_path / "d").is_dir()


def test_the_cache_folder_is_varlora_cache_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VARLORA_CACHE", str(tmp_path))
    assert _io.cache_dir() == tmp_path
    monkeypatch.delenv("VARLORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _io.cache_dir() == tmp_path / "home" / ".cache" / "varlora"


def test_read_safetensors_round_trip_and_damaged_files_name_themselves(tmp_path):
    import torch
    from safetensors.torch import save_file

    from varlora._io import read_safetensors

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(3.0)}, str(path), metadata={"k": "v"})
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["a"], torch.arange(3.0)) and metadata == {"k": "v"}
    path.write_bytes(path.read_bytes()[:20])  # truncated: safetensors raises its own (non-OSError) error
    with pytest.raises(ValueError, match=r"x.safetensors is unreadable"):
        read_safetensors(path)
    with pytest.raises(ValueError, match=r"missing.safetensors is unreadable"):
        read_safetensors(tmp_path / "missing.safetensors")
