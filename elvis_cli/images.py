"""Finding images on disk and decoding them into RGB arrays, with every failure made explicit.

Real collections contain empty files, mislabelled text, truncated downloads, 16-bit scans and
decompression bombs; each must become a short, per-image `ImageError` that extraction can report
and skip, never a crash or a silently wrong array.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from elvis_cli.errors import InputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MAX_PIXELS = 200_000_000  # above this an image is treated as a decompression bomb
DRAFT_SIDE = 2048  # a JPEG above MAX_PIXELS is decoded at 1/2..1/8 scale, to about this side
MIN_SIDE = 2

# PIL's own guard warns (to stderr) below its hard limit; our check in load_image reads the size
# from the header, before any decoding, and turns it into a per-image reason instead.
Image.MAX_IMAGE_PIXELS = None


class ImageError(InputError):
    """One image that cannot be used; extraction records its reason and carries on."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def collect_images(source: str | Path) -> tuple[Path, list[Path]]:
    """Resolve a folder, a `.txt` list or a glob pattern into (root, image paths).

    `root` is the folder that stored relative paths are taken from. Folders and globs come back
    sorted so that the same input always gives the same order; a list file keeps its own order
    because row numbers in the features file are then the list's line order.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        root, paths = path, sorted(_walk(path))
    elif path.is_file() and path.suffix.lower() == ".txt":
        root, paths = path.parent, _read_list(path)
    elif path.is_file() and is_image_path(path):
        root, paths = path.parent, [path]
    elif glob.has_magic(text):
        root = _glob_root(text)
        matches = (Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        paths = sorted(p for p in matches if p.is_file() and is_image_path(p))
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


def load_image(
    path: str | Path,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Decode an image to an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    `box` = (x1, y1, x2, y2) crops in pixels of the upright image (clipped to it); it is how query
    crops of ROxford/RParis are described. Raises ImageError with a short reason otherwise.
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
            rgb = _to_rgb(upright)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(path, f"cannot decode ({error})") from None
    if box is not None:
        rgb = _crop(rgb, box, path)
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise ImageError(path, f"too small ({rgb.shape[1]}x{rgb.shape[0]} px)")
    return rgb


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


def _crop(rgb: np.ndarray, box: tuple[float, float, float, float], path: Path) -> np.ndarray:
    height, width = rgb.shape[:2]
    x1, y1, x2, y2 = box
    left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    right, bottom = min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2)))
    if right - left < MIN_SIDE or bottom - top < MIN_SIDE:
        raise ImageError(path, f"crop box {tuple(box)} leaves no image inside {width}x{height}")
    return np.ascontiguousarray(rgb[top:bottom, left:right])
