"""One writer per output: an advisory lock held for a whole run and released by the OS on exit.

`flock` locks belong to the open file, so a writer that is killed (even by SIGKILL) loses its
lock at once; a stale lock file on disk never blocks the next run. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from elvis_cli.util.errors import InputError


@contextmanager
def exclusive_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold `lock_file` for the block, or refuse at once if another process holds it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "?"
            raise InputError(
                f"{what} is being written by another process (pid {holder}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(handle)  # releases the lock
