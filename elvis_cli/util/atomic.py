"""Atomic outputs: a file appears complete under its name or not at all, even on a full disk;
and the check, made before any work, that an output can be written where it is asked for."""

import errno
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from elvis_cli.util.errors import DiskFullError, InputError

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
    temporary = _new_file_beside(path)
    try:
        with _full_disk_named(path):
            yield temporary
            _flush_to_disk(temporary)
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


@contextmanager
def _full_disk_named(path: Path) -> Iterator[None]:
    """A full disk inside the block as a DiskFullError naming the output `path`."""
    try:
        yield
    except OSError as error:
        if error.errno in DISK_FULL:
            raise DiskFullError(f"no space left on the device while writing {path}") from None
        raise


def _new_file_beside(path: Path) -> Path:
    """A new empty `.NAME.RANDOM.tmp` in the folder of `path`, its permissions those the umask
    gives any new file (0644 under umask 022), as the output's will be after the rename:
    mkstemp would make every output 0600, unreadable to the rest of a group or a web server."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


def _flush_to_disk(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def writable_output(output: str | Path, suffixes: Sequence[str]) -> Path:
    """`output` as a Path, refused now (InputError) unless a file ending in one of `suffixes`
    can be written there: checked before a long run, so that a bad path never costs its result.

    Writability is tried, not guessed from permission bits (root, read-only file systems,
    ACLs): a file is created and removed in the output's folder, or in the nearest folder that
    exists when the folders to create are missing (atomic_path creates them when writing).
    """
    path = Path(output)
    expected = " or ".join(filter(None, (", ".join(suffixes[:-1]), suffixes[-1])))
    if path.is_dir():
        raise InputError(f"output {path} is a folder; name a file ending in {expected}")
    if path.suffix not in suffixes:
        raise InputError(f"output must end in {expected}, got {path.name}")
    check_writable_place(path)
    return path


def check_writable_place(path: Path) -> None:
    """Refuse (InputError) unless something new can be created where `path` (a file or a
    folder) would go: a file is created and removed in its folder, or in the nearest folder
    that exists when the folders to create are missing."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        _new_file_beside(folder / path.name).unlink()
    except OSError as error:
        where = "the current folder" if folder == Path(".") else str(folder)
        raise InputError(f"cannot write {path}: {where} is not writable ({error.strerror})"
                         ) from None


@contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """Yield a new hidden folder beside `path`; it takes the place of `path` (and of a folder
    there before) only if the block succeeds, so a failed or killed run never leaves a
    half-written folder under the name, only a hidden `.tmp` one. (Replacing an existing folder
    takes two renames: for that instant the name is absent, never partial.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    temporary = path.parent / f".{path.name}.{token}.tmp"
    temporary.mkdir()
    try:
        with _full_disk_named(path):
            yield temporary
            old = path.parent / f".{path.name}.{token}.old"
            if path.exists():
                os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
