"""What a file is, read from its first bytes, never from its name.

A file given in the wrong place (a photo or a features file as a checkpoint, a features file as
a shortlist) fails deep inside the reader that gets it, with that reader's words ("invalid load
key", "pop from empty list"). Naming what the file is, before any reader sees it, turns that
into a message the user can act on. Only the standard library is used, so the check is cheap
enough to run before any heavy import.
"""

from __future__ import annotations

import zipfile
from enum import Enum
from pathlib import Path

# torch.save's legacy (non-zip) format starts with this number, pickled as a 10-byte LONG1
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_PICKLE_PROTOCOL = b"\x80"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HEAD = 512  # bytes read to tell the kinds apart (and to show a text file's first line)


class FileKind(Enum):
    """Each kind with the words that name it in a message."""

    FOLDER = "a folder"
    MISSING = "a path that does not exist"
    EMPTY = "an empty file"
    TORCH = "a torch file"
    TORCH_LEGACY = "a torch file (legacy format)"
    PICKLE = "a Python pickle"
    NPZ = "a NumPy .npz archive"
    NPY = "a NumPy .npy array"
    ZIP = "a zip archive"
    ZIP_DAMAGED = "a damaged zip archive (cut short?)"
    GZIP = "a gzip file"
    HDF5 = "an HDF5 file"
    PNG = "a PNG image"
    JPEG = "a JPEG image"
    GIF = "a GIF image"
    TIFF = "a TIFF image"
    WEBP = "a WebP image"
    TEXT = "a text file"
    UNKNOWN = "a file of unknown format"


# leading bytes -> kind, for the kinds a fixed signature identifies
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", FileKind.PNG),
    (_HDF5_SIGNATURE, FileKind.HDF5),
    (b"\xff\xd8\xff", FileKind.JPEG),
    (b"GIF87a", FileKind.GIF),
    (b"GIF89a", FileKind.GIF),
    (b"II*\x00", FileKind.TIFF),
    (b"MM\x00*", FileKind.TIFF),
    (b"\x93NUMPY", FileKind.NPY),
    (b"\x1f\x8b", FileKind.GZIP),
)


def file_kind(path: Path | str) -> FileKind:
    """The kind of `path`, from its content."""
    path = Path(path)
    if path.is_dir():
        return FileKind.FOLDER
    if not path.is_file():
        return FileKind.MISSING
    with path.open("rb") as handle:
        head = handle.read(_HEAD)
    if not head:
        return FileKind.EMPTY
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return FileKind.WEBP
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head.startswith(_PICKLE_PROTOCOL) and len(head) > 1 and 2 <= head[1] <= 5:
        return FileKind.TORCH_LEGACY if _is_torch_legacy(head) else FileKind.PICKLE
    if _has_hdf5_user_block(path):
        return FileKind.HDF5
    if _text_line(head) is not None:
        return FileKind.TEXT
    return FileKind.UNKNOWN


def describe_file(path: Path | str) -> str:
    """What `path` is, in words: "a PNG image", "a text file (first line: 'a,b')"."""
    kind = file_kind(path)
    if kind is not FileKind.TEXT:
        return kind.value
    with Path(path).open("rb") as handle:
        line = _text_line(handle.read(_HEAD)) or ""
    shown = line if len(line) <= 40 else line[:40] + "..."
    return f"{kind.value} (first line: {shown!r})"


def _zip_kind(path: Path) -> FileKind:
    """torch.save's archive holds `<name>/data.pkl`; np.savez's holds `.npy` members."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return FileKind.ZIP_DAMAGED
    if any(name.endswith("data.pkl") for name in names):
        return FileKind.TORCH
    if names and all(name.endswith(".npy") for name in names):
        return FileKind.NPZ
    return FileKind.ZIP


def _is_torch_legacy(head: bytes) -> bool:
    """A protocol-2 pickle whose first object is torch's magic number (`\\x8a\\x0a` is LONG1
    of 10 bytes, little-endian)."""
    return head[2:4] == b"\x8a\x0a" and int.from_bytes(head[4:14], "little") == (
        _TORCH_LEGACY_MAGIC)


def _has_hdf5_user_block(path: Path) -> bool:
    """HDF5 may start after a user block of 512, 1024, 2048... bytes."""
    size = path.stat().st_size
    offset = 512
    with path.open("rb") as handle:
        while offset + len(_HDF5_SIGNATURE) <= min(size, 1 << 20):
            handle.seek(offset)
            if handle.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
            offset *= 2
    return False


def _text_line(head: bytes) -> str | None:
    """The first non-blank line when `head` reads as UTF-8 text (a multi-byte character cut
    at the end of the read allowed), else None."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.reason != "unexpected end of data":  # not a character cut by the read
            return None
        text = head[: error.start].decode("utf-8")
    text = text.removeprefix("\ufeff")  # a byte-order mark
    if not all(char.isprintable() or char in "\t\r\n\f\v" for char in text):
        return None
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
