"""An advisory lock on a folder that one writer at a time may fill (a training stage, an export)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def folder_lock(
    lock_file: Path,
    busy: Callable[[str], Exception],
    *,
    unwritable: Callable[[OSError], Exception] | None = None,
) -> Iterator[None]:
    """Hold ``lock_file`` (created, and its folder, if missing) for the ``with`` block. A second
    holder gets ``busy(holder)`` raised, ``holder`` naming the first (``process PID``). While the
    lock is held nothing else writes the folder, so the caller may remove what an earlier writer
    killed mid-way left behind. Where the folder or the lock file cannot be made, ``unwritable``
    (if given) turns the ``OSError`` into the caller's error. Only the folder is made where
    ``fcntl`` is missing (Windows)."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:
            fh = None
        else:
            fh = open(lock_file, "a+")  # noqa: SIM115 (closed by the with block below)
    except OSError as exc:
        if unwritable is None:
            raise
        raise unwritable(exc) from exc
    if fh is None:
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise busy(fh.read().strip() or "another process") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
