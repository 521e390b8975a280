"""Random views of a photo: the positives of self-supervised training.

Two views of one photo must look like two photos of one object taken by different people:
another framing, viewpoint, resolution, exposure and focus, sometimes with something in the way.
Every random draw comes from the caller's generator, so a seed fixes the view exactly.
`render_views` streams a round's views of a whole photo set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from elvis_cli.features.images import ImageError, load_image

if TYPE_CHECKING:
    from elvis_cli.training.photos import PhotoSet


@dataclass
class ViewConfig:
    crop_area: tuple[float, float] = (0.35, 1.0)  # kept fraction of the photo's area
    aspect_jitter: float = 0.3  # crop aspect = photo aspect * exp(U(-j, j))
    perspective_prob: float = 0.5
    perspective_strength: float = 0.12  # corner shift, fraction of the side
    rotation_prob: float = 0.4
    max_rotation: float = 15.0  # degrees
    scale: tuple[float, float] = (0.5, 1.0)  # output longer side, fraction of `max_side`
    max_side: int | None = 640  # None: the photo's own longer side
    colour_prob: float = 0.8
    brightness: float = 0.3  # factors drawn in [1 - x, 1 + x]
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.04  # shift as a fraction of the hue circle
    blur_prob: float = 0.2
    max_blur_radius: float = 2.0  # pixels of the output
    occlusion_prob: float = 0.3
    occlusion_area: tuple[float, float] = (0.03, 0.15)  # fraction of the output area
    inset_prob: float = 0.0  # chance that a view is shown small inside another photo
    inset_area: tuple[float, float] = (0.15, 0.4)  # fraction of that photo's area it covers


def random_view(
    image: np.ndarray, rng: np.random.Generator, config: ViewConfig | None = None
) -> np.ndarray:
    """A random view (uint8 H'xW'x3) of a uint8 HxWx3 photo.

    The output's size only sets how much detail survives (the backbone resizes every input to
    its own size); apparent zoom comes from the crop.
    """
    config = config or ViewConfig()
    view = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    view = _crop(view, rng, config)
    view = _resize(view, image.shape[:2], rng, config)
    if rng.random() < config.perspective_prob:
        view = _perspective(view, rng, config.perspective_strength)
    if rng.random() < config.rotation_prob:
        view = _rotate(view, rng.uniform(-config.max_rotation, config.max_rotation))
    if rng.random() < config.colour_prob:
        view = _colour(view, rng, config)
    if rng.random() < config.blur_prob:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, config.max_blur_radius)))
    pixels = np.array(view, dtype=np.uint8)
    if rng.random() < config.occlusion_prob:
        _occlude(pixels, rng, config.occlusion_area)
    return pixels


def _crop(view: Image.Image, rng: np.random.Generator, config: ViewConfig) -> Image.Image:
    width, height = view.size
    area = rng.uniform(*config.crop_area)
    aspect = math.exp(rng.uniform(-config.aspect_jitter, config.aspect_jitter))
    crop_w = min(width, max(1, round(width * math.sqrt(area * aspect))))
    crop_h = min(height, max(1, round(height * math.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    if (crop_w, crop_h) == (width, height):
        return view
    return view.crop((left, top, left + crop_w, top + crop_h))


def _resize(
    view: Image.Image, photo_shape: tuple[int, ...], rng: np.random.Generator, config: ViewConfig
) -> Image.Image:
    base = config.max_side or max(photo_shape)
    longer = max(1, round(base * rng.uniform(*config.scale)))
    width, height = view.size
    factor = longer / max(width, height)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if size == view.size:
        return view
    return view.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _perspective(view: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Map a quadrilateral inside the view onto the whole frame: a viewpoint change, no borders."""
    width, height = view.size
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    inward = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
    shift = rng.uniform(0.0, strength, size=(4, 2)) * np.array([width, height])
    source = corners + inward * shift
    return view.transform(
        view.size,
        Image.Transform.PERSPECTIVE,
        _perspective_coefficients(corners, source),
        Image.Resampling.BICUBIC,
    )


def _perspective_coefficients(output: np.ndarray, source: np.ndarray) -> tuple[float, ...]:
    """The 8 coefficients PIL wants: each output pixel (x, y) samples the source at
    ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1))."""
    rows, targets = [], []
    for (x, y), (sx, sy) in zip(output, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -sx * x, -sx * y])
        rows.append([0, 0, 0, x, y, 1, -sy * x, -sy * y])
        targets.extend([sx, sy])
    return tuple(np.linalg.solve(np.array(rows), np.array(targets)).tolist())


def _rotate(view: Image.Image, degrees: float) -> Image.Image:
    """Rotate, then keep the largest centred crop of the same aspect with no empty corners."""
    width, height = view.size
    radians = math.radians(abs(degrees))
    cos, sin = math.cos(radians), math.sin(radians)
    keep = min(width / (width * cos + height * sin), height / (width * sin + height * cos))
    rotated = view.rotate(degrees, resample=Image.Resampling.BICUBIC)
    crop_w, crop_h = max(1, round(width * keep)), max(1, round(height * keep))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return rotated.crop((left, top, left + crop_w, top + crop_h))


def _colour(view: Image.Image, rng: np.random.Generator, config: ViewConfig) -> Image.Image:
    for enhancer, strength in (
        (ImageEnhance.Brightness, config.brightness),
        (ImageEnhance.Contrast, config.contrast),
        (ImageEnhance.Color, config.saturation),
    ):
        view = enhancer(view).enhance(rng.uniform(1.0 - strength, 1.0 + strength))
    shift = round(rng.uniform(-config.hue, config.hue) * 256)
    if shift == 0:
        return view
    hsv = np.array(view.convert("HSV"), dtype=np.uint8)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def _occlude(pixels: np.ndarray, rng: np.random.Generator, area: tuple[float, float]) -> None:
    """Cover a random rectangle with noise or with another part of the same view, in place."""
    height, width = pixels.shape[:2]
    fraction = rng.uniform(*area)
    aspect = math.exp(rng.uniform(-0.7, 0.7))
    box_w = min(width, max(1, round(width * math.sqrt(fraction * aspect))))
    box_h = min(height, max(1, round(height * math.sqrt(fraction / aspect))))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    if rng.random() < 0.5:
        patch = rng.integers(0, 256, size=(box_h, box_w, 3), dtype=np.uint8)
    else:
        src_top = int(rng.integers(0, height - box_h + 1))
        src_left = int(rng.integers(0, width - box_w + 1))
        patch = pixels[src_top : src_top + box_h, src_left : src_left + box_w].copy()
    pixels[top : top + box_h, left : left + box_w] = patch


def inset_view(
    pixels: np.ndarray, backdrop: np.ndarray, rng: np.random.Generator, area: tuple[float, float]
) -> np.ndarray:
    """The view shrunk into a same-sized frame of another photo: the object in clutter, where
    only a few local matches exist and a global descriptor mostly sees the other scene."""
    height, width = pixels.shape[:2]
    frame = np.array(Image.fromarray(backdrop).resize((width, height), Image.Resampling.BICUBIC))
    fraction = rng.uniform(*area)
    inner_w, inner_h = (
        max(1, round(width * math.sqrt(fraction))),
        max(1, round(height * math.sqrt(fraction))),
    )
    top = int(rng.integers(0, height - inner_h + 1))
    left = int(rng.integers(0, width - inner_w + 1))
    small = Image.fromarray(pixels).resize(
        (inner_w, inner_h), Image.Resampling.BICUBIC, reducing_gap=3.0
    )
    frame[top : top + inner_h, left : left + inner_w] = np.asarray(small)
    return frame


def _fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The photo itself as a view: only shrunk to the views' size, so all views cost the same."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.array(resized)


def render_views(
    photos: PhotoSet, views_per_image: int, config: ViewConfig, entropy: list[int],
    skipped: dict[Path, str],
) -> Iterator[tuple[int, np.ndarray, int]]:
    """(photo index, view, backdrop photo index or -1) for every readable photo: the photo
    itself, then random views, which may be pasted into the previous readable photo (a
    deterministic choice of another scene that costs no extra decoding).

    Each photo has its own generator, so its views do not depend on which other photos failed.
    """
    previous: tuple[int, np.ndarray] | None = None
    # with fewer than three instances an inset could share content with every other view
    inset_prob = config.inset_prob if len(np.unique(photos.instances)) >= 3 else 0.0
    for index, path in enumerate(photos.paths):
        if path in skipped:
            continue
        try:
            image = load_image(path)
        except ImageError as error:
            skipped[path] = str(error)
            continue
        rng = np.random.default_rng([*entropy, index])
        yield index, _fit(image, config.max_side), -1
        for _ in range(views_per_image - 1):
            view = random_view(image, rng, config)
            if previous is not None and inset_prob > 0 and rng.random() < inset_prob:
                yield index, inset_view(view, previous[1], rng, config.inset_area), previous[0]
            else:
                yield index, view, -1
        previous = (index, image)
