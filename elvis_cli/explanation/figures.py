"""Drawing helpers of the explanation pictures (matplotlib, Agg backend, imported only when a
picture is drawn): two photos side by side on one canvas, descriptor positions on it, a
descriptor grid painted as a heatmap, and figures saved atomically as PNG (and SVG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from elvis_cli.util.atomic import atomic_path, writable_output
from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PICTURE_SUFFIXES = (".png",)
DISPLAY_HEIGHT = 300  # px of each photo on the canvas: enough to see structures, small files
GAP = 12  # px between the two photos


def pyplot():
    """matplotlib.pyplot on the Agg backend: pictures are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def checked_picture(output: str | Path) -> Path:
    """`output` as a Path, refused now if no PNG can be written there."""
    return writable_output(output, PICTURE_SUFFIXES)


def save_figure(figure: Figure, output: Path, svg: bool = False, dpi: int = 90) -> Path:
    """`figure` written atomically as the PNG `output` (and as the SVG beside it); returns the
    PNG's path. The PNG is stored with a 256-colour palette: photos keep their look at a third
    of the size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    figure.set_dpi(dpi)
    canvas = FigureCanvasAgg(figure)  # drawn in memory: the PNG is encoded once, as a palette
    canvas.draw()
    pixels = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
    palette = pixels.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    with atomic_path(output) as temporary:
        palette.save(temporary, format="png")
    if svg:
        with atomic_path(output.with_suffix(".svg")) as temporary:
            figure.savefig(temporary, format="svg")
    pyplot().close(figure)
    return output


@dataclass
class Placement:
    """Where a photo lies on a side-by-side canvas: its left edge and size in canvas pixels."""

    left: float
    width: float
    height: float

    def points(self, positions: np.ndarray) -> np.ndarray:
        """(k, 2) canvas x, y of (k, 2) row, column fractions of the photo."""
        return np.stack([self.left + positions[:, 1] * self.width,
                         positions[:, 0] * self.height], axis=1)


def display_pixels(path: str) -> np.ndarray:
    """The photo at `path`, upright RGB, DISPLAY_HEIGHT pixels high; one-line error if it
    cannot be read."""
    from PIL import Image

    from elvis_cli.features.images import ImageError, load_image

    try:
        pixels = load_image(path)
    except (ImageError, OSError) as error:
        raise InputError(f"{path}: cannot show the image ({error})") from None
    height, width = pixels.shape[:2]
    size = (max(1, round(width * DISPLAY_HEIGHT / height)), DISPLAY_HEIGHT)
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def side_by_side(axis, photos: list[np.ndarray]) -> list[Placement]:
    """Draw `photos` left to right on one axis, as one canvas in pixel units; their places."""
    placements, left = [], 0.0
    for pixels in photos:
        height, width = pixels.shape[:2]
        axis.imshow(pixels, extent=(left, left + width, height, 0), interpolation="antialiased")
        placements.append(Placement(left, width, height))
        left += width + GAP
    axis.set_xlim(0, left - GAP)
    axis.set_ylim(max(p.height for p in placements), 0)
    axis.set_axis_off()
    return placements


def descriptor_grid(positions: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """The feature map the descriptors came from, (h, w), each cell holding its descriptor's
    value and NaN where none was stored; None for keypoints (RootSIFT), which lie on no grid.
    Stored positions are cell centres (i + 0.5) / h, so h is the smallest count that puts
    every row there (likewise w)."""
    rows, cols = (_cell_count(positions[:, axis]) for axis in (0, 1))
    if rows is None or cols is None:
        return None
    grid = np.full((rows, cols), np.nan)
    grid[np.clip((positions[:, 0] * rows).astype(int), 0, rows - 1),
         np.clip((positions[:, 1] * cols).astype(int), 0, cols - 1)] = values
    return grid


def _cell_count(centres: np.ndarray, largest: int = 256) -> int | None:
    """The smallest h (at most `largest`, far above any network's grid) for which every
    centre is (i + 0.5) / h up to float16 storage; None if there is none."""
    for count in range(1, largest + 1):
        offsets = centres * count - 0.5
        if np.abs(offsets - np.round(offsets)).max(initial=0.0) < 0.1:
            return count
    return None
