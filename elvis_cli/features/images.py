"""Finding images on disk and decoding them into RGB arrays, with every failure made explicit.

Real collections contain empty files, mislabelled text, truncated downloads, 16-bit scans and
decompression bombs; each must become a short, per-image `ImageError` that extraction can report
and skip, never a crash or a silently wrong array. Benchmark images are the exception: the
authors' extraction decodes a truncated JPEG as far as it goes, and so does `decode_image` when
asked (`accept_truncated`), saying so in `DecodedImage.warning`.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from elvis_cli.util.errors import InputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MAX_PIXELS = 200_000_000  # above this an image is treated as a decompression bomb
DRAFT_SIDE = 2048  # a JPEG above MAX_PIXELS is decoded at 1/2..1/8 scale, to about this side
MIN_SIDE = 2

# PIL's own guard warns (to stderr) below its hard limit; our check in load_image reads the size
# from the header, before any decoding, and turns it into a per-image reason instead.
Image.MAX_IMAGE_PIXELS = None
Box = tuple[float, float, float, float]


class _TruncatedImagesFlag(threading.local):
    """Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES`, one value per thread.

    Pillow reads that module attribute's truth value at every decode, so installing this object
    there once (at import) lets one decoding thread accept truncated data while the others, in
    the same pool, still refuse it. Flipping the plain boolean at run time would race.
    """

    value = bool(ImageFile.LOAD_TRUNCATED_IMAGES)  # every thread starts from Pillow's setting

    def __bool__(self) -> bool:
        return self.value


_TRUNCATED = _TruncatedImagesFlag()
ImageFile.LOAD_TRUNCATED_IMAGES = _TRUNCATED  # type: ignore[assignment]


@contextmanager
def _truncated_images_accepted() -> Iterator[None]:
    """In this thread only, let Pillow decode truncated files as far as they go."""
    previous, _TRUNCATED.value = _TRUNCATED.value, True
    try:
        yield
    finally:
        _TRUNCATED.value = previous


class ImageError(InputError):
    """One image that cannot be used; extraction records its reason and carries on."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _UndecodableError(ImageError):
    """The decoder failed on the image data (truncated or corrupt), not on its header."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, upright; the crop when a box was given
    full_side: int  # longer side of the whole upright image: the scale of a crop is taken from it
    warning: str = ""  # set when a truncated image was decoded as far as it goes


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def collect_images(source: str | Path | Sequence[str | Path]) -> tuple[Path, list[Path]]:
    """Resolve a folder, a `.txt` list, a glob pattern or an image file, or several of them,
    into (root, image paths).

    `root` is the folder that stored relative paths are taken from. Folders and globs come back
    sorted so that the same input always gives the same order; a list file keeps its own order
    because row numbers in the features file are then the list's line order.

    Several sources (a list: what a shell makes of an unquoted glob, or paths mixed) give their
    images in the order given, root being the common folder of their roots. There an image
    path is taken as it is, even when missing or unreadable (extraction skips it by name, as
    it does any image), so that an explicit list keeps one image per entry.
    """
    if isinstance(source, (str, Path)):
        return _collect(source)
    if not source:
        raise InputError("no images given")
    roots, paths = [], []
    for entry in source:
        root, found = _collect(entry, as_image=True)
        roots.append(root.absolute())
        paths += found
    return Path(os.path.commonpath(roots)), paths


def _collect(source: str | Path, as_image: bool = False) -> tuple[Path, list[Path]]:
    """One source: a folder, a .txt list, a glob or an image; `as_image` takes any file (and
    a missing one named like an image) as an image path without looking at it."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        root, paths = path, sorted(_walk(path))
    elif path.suffix.lower() == ".txt" and path.is_file():
        root, paths = path.parent, _read_list(path)
    elif (as_image or is_image_path(path)) and path.is_file():
        root, paths = path.parent, [path]
    elif glob.has_magic(text) and not path.exists():
        root = _glob_root(text)
        matches = (Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        paths = sorted(p for p in matches if p.is_file() and is_image_path(p))
    elif as_image and is_image_path(path):
        root, paths = path.parent, [path]
    elif path.exists():
        raise InputError(f"{source}: not a folder, an image, a .txt list or a glob pattern")
    else:
        raise InputError(f"{source}: no such file or folder")
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputError(f"{source}: no images found (looked for {suffixes})")
    return root, paths


def _walk(folder: Path) -> list[Path]:
    """Recursive listing that follows symlinks but visits each real folder once (loops are safe)."""
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    found: list[Path] = []
    while stack:
        current = stack.pop()
        try:
            info = current.stat()
            entries = list(os.scandir(current))
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            entry_path = Path(entry.path)
            try:
                if entry.is_dir():
                    stack.append(entry_path)
                elif entry.is_file() and is_image_path(entry_path):
                    found.append(entry_path)
            except OSError:  # dangling or looping link
                continue
    return found


def _read_list(list_file: Path) -> list[Path]:
    base = list_file.parent
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            paths.append(base / Path(entry).expanduser())
    return paths


def _glob_root(pattern: str) -> Path:
    """The longest leading part of a glob pattern without wildcards: paths are stored below it."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def load_image(path: str | Path, box: Box | None = None) -> np.ndarray:
    """Decode an image to an (H, W, 3) uint8 RGB array, EXIF orientation applied (see
    decode_image); truncated data is an ImageError."""
    return decode_image(path, box).pixels


def decode_image(
    path: str | Path, box: Box | None = None, accept_truncated: bool = False
) -> DecodedImage:
    """Decode an image to upright RGB; raises ImageError with a short reason otherwise.

    `box` = (x1, y1, x2, y2) in pixels of the upright image crops it as the authors do: rows
    int(y1):int(y2), columns int(x1):int(x2) (clipped to the image); it is how query crops of
    ROxford/RParis are described. `accept_truncated`: data the decoder cannot finish (a
    truncated JPEG) is decoded as far as it goes, as the authors' extraction does
    (LOAD_TRUNCATED_IMAGES), with a warning, instead of being an error.
    A huge JPEG comes back reduced by its decoder's DCT scaling (the full image never exists in
    memory; `box` is scaled along); other images above MAX_PIXELS are refused.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file")
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    try:
        rgb, box = _decode(path, box)
        warning = ""
    except _UndecodableError as error:
        if not accept_truncated:
            raise
        with _truncated_images_accepted():
            rgb, box = _decode(path, box)
        warning = f"decoded as far as it goes ({error.reason})"
    full_side = max(rgb.shape[:2])
    if box is not None:
        rgb = _crop(rgb, box, path)
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise ImageError(path, f"too small ({rgb.shape[1]}x{rgb.shape[0]} px)")
    return DecodedImage(rgb, full_side, warning)


def _decode(path: Path, box: Box | None) -> tuple[np.ndarray, Box | None]:
    """The upright RGB pixels, and `box` in their coordinates (a reduced huge JPEG scales it)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS and img.format == "JPEG":
                img.draft(img.mode, (DRAFT_SIDE, DRAFT_SIDE))
                scale = img.size[0] / width
                box = box and tuple(value * scale for value in box)  # type: ignore[assignment]
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise ImageError(path, f"too large ({width}x{height} px, limit {MAX_PIXELS} px)")
            img.load()  # full decode now, so truncated data fails here and not later
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright), box
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise _UndecodableError(path, f"cannot decode ({error})") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to 8-bit RGB: 16-bit is rescaled (not clipped), alpha goes on white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale (PNG/TIFF). 65535 / 257 = 255 exactly, so the full range is kept.
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy


def _crop(rgb: np.ndarray, box: Box, path: Path) -> np.ndarray:
    """The authors' crop: int() truncates each coordinate (a negative one counts as 0)."""
    height, width = rgb.shape[:2]
    left, top, right, bottom = (max(0, int(value)) for value in box)
    crop = rgb[top:bottom, left:right]
    if min(crop.shape[:2]) < MIN_SIDE:
        raise ImageError(path, f"crop box {tuple(box)} leaves no image inside {width}x{height}")
    return np.ascontiguousarray(crop)
