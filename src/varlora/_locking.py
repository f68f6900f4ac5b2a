"""An exclusive, non-blocking claim on a folder, so that several processes can share out work.

``claim_folder(folder)`` yields True to the one process that holds the claim and False to the others. Where
``fcntl`` exists (POSIX) the claim is a ``flock`` on ``folder/.lock``: released by the kernel when the process
ends, even by a kill. On Windows it is ``msvcrt.locking`` on the same file (also released at exit). Elsewhere
it is a lock file ``folder/.lock.claim`` created with ``O_EXCL`` and holding ``<host> <pid>``; it is deleted
on release, and a claim left by a process of this host that no longer runs is taken over.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

__all__ = ["claim_folder"]

LOCK_NAME = ".lock"
CLAIM_NAME = ".lock.claim"


@contextlib.contextmanager
def claim_folder(folder: str | Path) -> Iterator[bool]:
    """Claim ``folder`` (created if missing) for the duration of the block: yields whether this process got it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is not None:
        with _flock(folder / LOCK_NAME) as held:
            yield held
    elif msvcrt is not None:
        with _msvcrt_lock(folder / LOCK_NAME) as held:
            yield held
    else:
        with _exclusive_file(folder / CLAIM_NAME) as held:
            yield held


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[bool]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _msvcrt_lock(path: Path) -> Iterator[bool]:
    with open(path, "a+") as handle:
        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def _owner_is_gone(path: Path) -> bool:
    """Whether the claim file was left by a process of this host that no longer runs."""
    try:
        host, pid = path.read_text().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # unreadable, half-written, or the process runs under another user
        return False
    return False


@contextlib.contextmanager
def _exclusive_file(path: Path) -> Iterator[bool]:
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if attempt == 0 and _owner_is_gone(path):
                path.unlink(missing_ok=True)
                continue
            yield False
            return
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
