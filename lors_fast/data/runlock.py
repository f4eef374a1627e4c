"""One writer per run folder / trajectory store: ``<folder>/.lors_fast.lock``.

The lock file holds JSON ``{"pid", "host", "started", "what"}`` of its holder; mutual exclusion comes from
``fcntl.flock`` on it, which the kernel drops when the holder dies — so a lock file left by a killed
process (a "stale" lock, e.g. after ``kill -9``) is simply taken over, and a live holder refuses a second
writer at once (:class:`LockHeldError`, naming pid and host). After taking the lock the holder removes
stale :func:`lors_fast.data.io.atomic_write` temporaries from the folder (a killed writer leaves them).

:func:`hold` is re-entrant within a process (a stage that calls another stage on the same folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "LockHeldError", "hold", "holder"]

LOCK_NAME = ".lors_fast.lock"
_HELD: dict[str, list] = {}  # resolved folder -> [fd, count] of the locks this process holds


class LockHeldError(RuntimeError):
    """Another live process holds the folder's lock."""


def holder(folder: str | os.PathLike) -> dict | None:
    """The lock file's content (pid, host, started, what), or None when there is none / it is unreadable."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(info: dict | None, path: Path) -> str:
    if not info:
        return f"another process (lock file {path})"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')!r} ({info.get('what', 'a run')}, since {since})"


def _acquire(folder: Path, what: str) -> int:
    import fcntl

    path = folder / LOCK_NAME
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            info = holder(folder)
            raise LockHeldError(f"{folder} is in use by {_describe(info, path)}; wait for it to finish or "
                                f"use another folder (a lock of a dead process is taken over by itself)") from None
        try:  # the file we locked may have been removed by its previous holder: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "what": what}).encode())
        os.fsync(fd)
        return fd
    raise LockHeldError(f"{folder}: could not take the lock {path} (it keeps being replaced)")


@contextlib.contextmanager
def hold(folder: str | os.PathLike, what: str = "a run") -> Iterator[Path]:
    """Hold ``folder``'s lock (created with the folder) for the ``with`` block; raise LockHeldError if
    another live process holds it. Stale atomic-write temporaries are removed once the lock is taken."""
    from lors_fast.data.io import remove_stale_temps

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    fd = _acquire(folder, what)
    _HELD[key] = [fd, 1]
    try:
        remove_stale_temps(folder)
        yield folder
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_NAME)  # unlink while still locked, then release
        os.close(fd)
