"""Thumbnails of a results page: small JPEGs beside the page, made with Pillow from the images
themselves, so the folder opens anywhere without the images it shows."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from elvis_cli.util.progress import ProgressCallback, track

THUMBNAIL_FOLDER = "thumbs"


def thumbnail_name(image_path: str) -> str:
    """Where an image's thumbnail lies in the report folder: named by a digest of its path,
    since images of one name may lie in several folders."""
    digest = hashlib.sha1(image_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{THUMBNAIL_FOLDER}/{digest}.jpg"


def write_thumbnails(image_paths: Sequence[str], folder: Path, size: int,
                     progress: ProgressCallback | None = None) -> dict[str, str]:
    """A thumbnail (longer side `size`) of each image under `folder`; image path -> its name
    relative to `folder`. Images that cannot be read are left out: the page names them."""
    (folder / THUMBNAIL_FOLDER).mkdir(parents=True, exist_ok=True)
    advance = track(progress, "thumbnails", len(image_paths))
    written = {}
    for path in image_paths:
        name = thumbnail_name(path)
        if _write_thumbnail(Path(path), folder / name, size):
            written[path] = name
        advance()
    return written


def _write_thumbnail(image_path: Path, output: Path, size: int) -> bool:
    try:
        with Image.open(image_path) as image:
            image.draft("RGB", (size, size))  # JPEG: decoded at the smallest scale that fits
            picture = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    picture.thumbnail((size, size))
    picture.save(output, format="JPEG", quality=80)
    return True
