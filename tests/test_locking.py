"""claim_folder: one holder at a time, released on exit; the lock-file fallback where fcntl is missing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from varlora import _locking

SCHEMES = ["fcntl", "o_excl"]


@pytest.fixture(params=SCHEMES)
def scheme(request, monkeypatch):
    if request.param == "fcntl" and _locking.fcntl is None:
        pytest.skip("no fcntl on this platform")
    if request.param == "o_excl":
        monkeypatch.setattr(_locking, "fcntl", None)
        monkeypatch.setattr(_locking, "msvcrt", None)
    return request.param


def test_one_claim_at_a_time_and_released_on_exit(tmp_path, scheme):
    folder = tmp_path / "run"
    with _locking.claim_folder(folder) as first:
        assert first
        with _locking.claim_folder(folder) as second:
            assert not second
    with _locking.claim_folder(folder) as again:
        assert again
    with pytest.raises(RuntimeError), _locking.claim_folder(folder) as held:
        assert held
        raise RuntimeError
    with _locking.claim_folder(folder) as after_error:
        assert after_error


def test_claim_held_by_another_process(tmp_path):
    if _locking.fcntl is None:
        pytest.skip("no fcntl on this platform")
    folder = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        from varlora._locking import claim_folder
        with claim_folder({str(folder)!r}) as held:
            print(held, flush=True)
            sys.stdin.readline()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "True"
        with _locking.claim_folder(folder) as held:
            assert not held
    finally:
        child.communicate("\n", timeout=30)
    with _locking.claim_folder(folder) as held:
        assert held


def test_lock_file_of_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(_locking, "fcntl", None)
    monkeypatch.setattr(_locking, "msvcrt", None)
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / _locking.CLAIM_NAME).write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")
    with _locking.claim_folder(folder) as held:
        assert held
    (folder / _locking.CLAIM_NAME).write_text(f"{socket.gethostname()} {os.getpid()}\n")  # alive: respected
    with _locking.claim_folder(folder) as held:
        assert not held
    (folder / _locking.CLAIM_NAME).write_text("another-host 1\n")  # cannot tell: respected
    with _locking.claim_folder(folder) as held:
        assert not held
