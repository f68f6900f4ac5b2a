"""Atomic writes leave the old file intact when the writer fails; torn JSONL tails are dropped."""

import os

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
