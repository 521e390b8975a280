"""Atomic outputs: a file appears complete under its name or not at all, even on a full disk."""

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from elvis_cli.util.errors import DiskFullError

# hdf5 and numpy report a full disk as an OSError carrying one of these
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    Same folder, so the final os.replace is a rename on one file system; a crash leaves at most
    a `.tmp` file that never looks like a finished output. The data is flushed to disk before
    the rename, so a power cut cannot leave a complete-looking but empty file either. A full
    disk becomes a DiskFullError naming the output, with the partial file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise DiskFullError(f"no space left on the device while writing {path}") from None
        raise
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _flush_to_disk(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
