"""Build the bundled demo benchmark examples/data/demo (revisitop layout) from real photos.

    apt-get install opencv-doc   # or: apt-get download opencv-doc; dpkg -x opencv-doc_*.deb DIR
    python examples/make_demo.py [--opencv-data DIR] [--out examples/data/demo]

Sources: the sample photos of OpenCV (Debian package opencv-doc) and scikit-image's
motorcycle stereo pair; see examples/LICENSES.md. Each query is a real photo; its positives are
the real second view where the source has one (hard) and synthetic views of the same photo
(easy: mild crop/scale/colour/rotation; hard: the object pasted small into another scene, a
zoom-in, perspective, strong rotation, occlusion with strong colour change; junk: a tiny crop or
a heavy blur). Distractors are views of other real photos. Every random choice comes from a
fixed seed, so the output is the same on every run (given the same Pillow/libjpeg), and gallery
names (g0001.jpg, ...) are shuffled so they do not
reveal the query.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage
from PIL import Image, ImageEnhance, ImageFilter

SEED = 2026
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
JPEG_QUALITY = 90
QUERY_SIDE = 640  # longer side of query images
VIEW_SIDE = 440  # longer side of gallery views before their scale jitter

# (query photo, real second view of the same scene or None, object box in the photo or None)
QUERIES: list[tuple[str, str | None, tuple[int, int, int, int] | None]] = [
    ("graf1.png", "graf3.png", None),
    ("box.png", "box_in_scene.png", None),
    ("leuvenA.jpg", "leuvenB.jpg", None),
    ("aloeL.jpg", "aloeR.jpg", None),
    ("basketball1.png", "basketball2.png", None),
    ("rubberwhale1.png", "rubberwhale2.png", None),
    ("aero1.jpg", "aero3.jpg", None),
    ("Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg", None),
    ("left.jpg", "right.jpg", None),
    ("ela_original.jpg", "ela_modified.jpg", None),
    ("skimage:motorcycle_left.png", "skimage:motorcycle_right.png", None),
    ("building.jpg", None, None),
    ("butterfly.jpg", None, (5, 15, 485, 315)),
    ("home.jpg", None, None),
    ("squirrel_cls.jpg", None, (125, 100, 360, 360)),
]
# Photos that appear only as distractors: the photo itself plus two synthetic views of it.
DISTRACTORS = [
    "apple.jpg",
    "baboon.jpg",
    "blox.jpg",
    "board.jpg",
    "fruits.jpg",
    "orange.jpg",
    "stuff.jpg",
    "licenseplate_motion.jpg",
    "smarties.png",
    "pca_test1.jpg",
    "messi5.jpg",
    "starry_night.jpg",
]
# Distractors used as they are (a calibration sequence and two blurred-text photos).
RAW_DISTRACTORS = [f"left{i:02d}.jpg" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)] + [
    "text_defocus.jpg",
    "text_motion.jpg",
]

Box = tuple[float, float, float, float]


def demo_sources(opencv_data: Path = OPENCV_DATA) -> list[Path]:
    """Every source file the demo uses (so training data can be checked to be disjoint)."""
    names = [q for q, _, _ in QUERIES] + [v for _, v, _ in QUERIES if v]
    return [_source_path(n, opencv_data) for n in names + DISTRACTORS + RAW_DISTRACTORS]


def _source_path(name: str, opencv_data: Path) -> Path:
    if name.startswith("skimage:"):
        return SKIMAGE_DATA / name.removeprefix("skimage:")
    return opencv_data / name


def _open(name: str, opencv_data: Path) -> Image.Image:
    with Image.open(_source_path(name, opencv_data)) as image:
        return image.convert("RGB")


def fit(image: Image.Image, side: int) -> Image.Image:
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def crop_fraction(
    image: Image.Image, fraction: float, rng: np.random.Generator, region: Box | None = None
) -> Image.Image:
    """A random crop covering `fraction` of `region` (default: the whole image)."""
    x0, y0, x1, y1 = region or (0, 0, image.width, image.height)
    rw, rh = x1 - x0, y1 - y0
    aspect = rng.uniform(0.8, 1.25)
    cw = min(rw, math.sqrt(fraction * rw * rh * aspect * rw / rh))
    ch = min(rh, fraction * rw * rh / cw)
    left = x0 + rng.uniform(0, rw - cw)
    top = y0 + rng.uniform(0, rh - ch)
    return image.crop((round(left), round(top), round(left + cw), round(top + ch)))


def rotate_inside(image: Image.Image, degrees: float) -> Image.Image:
    """Rotate, then keep the largest centred rectangle of the same shape with no empty corner."""
    w, h = image.size
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    shrink = min(w / (w * c + h * s), h / (w * s + h * c))
    rotated = image.rotate(degrees, resample=Image.Resampling.BICUBIC)
    cw, ch = w * shrink, h * shrink
    return rotated.crop(
        (round((w - cw) / 2), round((h - ch) / 2), round((w + cw) / 2), round((h + ch) / 2))
    )


def jitter_colour(image: Image.Image, rng: np.random.Generator, spread: float) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(1 - spread, 1 + spread))
    return image


def shift_hue(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(50, 200))) % 256
    return jitter_colour(Image.fromarray(hsv, "HSV").convert("RGB"), rng, 0.3)


def warp_perspective(
    image: Image.Image, rng: np.random.Generator, inward_range: tuple[float, float] = (0.05, 0.25)
) -> Image.Image:
    """Show the whole photo as if seen from the side: each corner moves inwards by a random
    fraction in `inward_range` of the side (the demo's 5-25%)."""
    w, h = image.size
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    inward = rng.uniform(*inward_range, size=(4, 2)) * (w, h) * ((1, 1), (-1, 1), (-1, -1), (1, -1))
    dst = np.asarray(src, dtype=np.float64) + inward
    # PIL maps each output pixel to an input pixel: solve the homography dst -> src.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    coeffs = np.linalg.solve(np.asarray(rows), np.asarray(rhs, dtype=np.float64))
    return image.transform(
        image.size,
        Image.Transform.PERSPECTIVE,
        tuple(coeffs),
        Image.Resampling.BICUBIC,
        fillcolor=(90, 90, 90),
    )


def random_box(
    canvas: Image.Image,
    patch: Image.Image,
    area: tuple[float, float],
    max_side: float,
    rng: np.random.Generator,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Size (patch aspect, a random fraction of the canvas area, each side at most `max_side`
    of the canvas's) and a random top-left corner for pasting `patch` into `canvas`."""
    target = rng.uniform(*area) * canvas.width * canvas.height
    width = round(min(canvas.width * max_side, math.sqrt(target * patch.width / patch.height)))
    height = round(min(canvas.height * max_side, target / width))
    corner = (
        int(rng.integers(0, canvas.width - width + 1)),
        int(rng.integers(0, canvas.height - height + 1)),
    )
    return (width, height), corner


@dataclass
class Views:
    """Synthetic view makers for one photo; `region` keeps zoom-ins on the object."""

    image: Image.Image
    region: Box | None
    others: list[Image.Image]  # photos of other scenes: occluders and backgrounds

    def easy(self, rng: np.random.Generator) -> Image.Image:
        view = crop_fraction(self.image, rng.uniform(0.72, 0.95), rng)
        view = rotate_inside(view, rng.uniform(-5, 5))
        view = jitter_colour(view, rng, 0.15)
        return fit(view, round(VIEW_SIDE * rng.uniform(0.7, 1.3)))

    def zoom(self, rng: np.random.Generator) -> Image.Image:
        view = crop_fraction(self.image, rng.uniform(0.08, 0.2), rng, self.region)
        return fit(jitter_colour(view, rng, 0.25), VIEW_SIDE)

    def inset(self, rng: np.random.Generator) -> Image.Image:
        """The object seen small inside another scene: what makes a global descriptor miss it."""
        part = crop_fraction(self.image, rng.uniform(0.5, 0.9), rng, self.region)
        part = warp_perspective(part, rng)
        background = self.others[int(rng.integers(len(self.others)))]
        scene = jitter_colour(fit(background, VIEW_SIDE), rng, 0.2)
        size, corner = random_box(scene, part, (0.15, 0.3), 0.8, rng)
        scene.paste(jitter_colour(part, rng, 0.2).resize(size, Image.Resampling.LANCZOS), corner)
        return scene

    def perspective(self, rng: np.random.Generator) -> Image.Image:
        return fit(jitter_colour(warp_perspective(self.image, rng), rng, 0.25), VIEW_SIDE)

    def rotate(self, rng: np.random.Generator) -> Image.Image:
        degrees = rng.uniform(20, 30) * rng.choice([-1, 1])
        return fit(jitter_colour(rotate_inside(self.image, degrees), rng, 0.25), VIEW_SIDE)

    def occlude(self, rng: np.random.Generator) -> Image.Image:
        view = self.image.copy()
        patch = crop_fraction(self.others[int(rng.integers(len(self.others)))], 0.3, rng)
        size, corner = random_box(view, patch, (0.18, 0.28), 0.7, rng)
        view.paste(patch.resize(size, Image.Resampling.LANCZOS), corner)
        return fit(shift_hue(view, rng), VIEW_SIDE)

    def junk(self, rng: np.random.Generator, tiny: bool) -> Image.Image:
        if tiny:
            return fit(crop_fraction(self.image, rng.uniform(0.03, 0.06), rng), 320)
        small = fit(self.image, VIEW_SIDE)
        return small.filter(ImageFilter.GaussianBlur(radius=0.035 * VIEW_SIDE))

    def hard_makers(self) -> list[Callable[[np.random.Generator], Image.Image]]:
        return [self.zoom, self.perspective, self.rotate, self.occlude]


@dataclass
class GalleryImage:
    image: Image.Image
    query: int | None  # the query it belongs to, None for distractors
    role: str  # easy | hard | junk | distractor


def _query_views(
    q: int,
    photo: Image.Image,
    second: Image.Image | None,
    region: Box | None,
    others: list[Image.Image],
) -> list[GalleryImage]:
    """2 easy; 5 hard: two insets, a zoom-in, the real second view where there is one and
    synthetic views to make up the number; 1 junk."""
    views = Views(photo, region, others)
    rng = np.random.default_rng([SEED, q])
    out = [GalleryImage(views.easy(rng), q, "easy") for _ in range(2)]
    makers = [views.inset, views.inset, views.zoom]
    warps = [views.perspective, views.rotate, views.occlude]
    if second is not None:
        out.append(GalleryImage(fit(second, VIEW_SIDE), q, "hard"))
    picked = sorted(rng.choice(len(warps), 1 if second is not None else 2, replace=False))
    out += [GalleryImage(make(rng), q, "hard") for make in makers + [warps[i] for i in picked]]
    out.append(GalleryImage(views.junk(rng, tiny=q % 2 == 0), q, "junk"))
    return out


def _distractor_views(
    index: int, photo: Image.Image, others: list[Image.Image]
) -> list[Image.Image]:
    views = Views(photo, None, others)
    rng = np.random.default_rng([SEED, 1000 + index])
    hard = views.hard_makers()[int(rng.integers(4))]
    return [fit(photo, VIEW_SIDE), views.easy(rng), hard(rng)]


def save_jpeg(image: Image.Image, path: Path) -> None:
    image.save(path, "JPEG", quality=JPEG_QUALITY)


def query_image(photo: Image.Image, box: Box | None) -> tuple[Image.Image, Box]:
    """The query as stored (longer side at most QUERY_SIDE) and its box in those pixels."""
    query = fit(photo, min(QUERY_SIDE, max(photo.size)))
    scale = query.width / photo.width
    query_box = (0, 0, query.width, query.height) if box is None else [v * scale for v in box]
    return query, tuple(query_box)


def write_benchmark(
    gallery: list[GalleryImage], queries: list[tuple[Image.Image, Box]], out: Path, seed: int
) -> dict:
    """Shuffle the gallery (names must not reveal the query), then write jpg/ and
    gnd_<out name>.pkl (revisitop layout) into a temporary folder next to `out` and swap it in,
    so that a reader never sees half a benchmark."""
    order = np.random.default_rng(seed).permutation(len(gallery))
    gallery = [gallery[i] for i in order]
    imlist = [f"g{i + 1:04d}" for i in range(len(gallery))]
    qimlist = [f"q{q + 1:02d}" for q in range(len(queries))]
    gnd = [
        {
            **{
                role: [i for i, g in enumerate(gallery) if g.query == q and g.role == role]
                for role in ("easy", "hard", "junk")
            },
            "bbx": [round(float(v), 2) for v in box],
        }
        for q, (_, box) in enumerate(queries)
    ]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is a normal folder
    (staging / "jpg").mkdir()
    for name, item in zip(imlist, gallery, strict=True):
        save_jpeg(item.image, staging / "jpg" / f"{name}.jpg")
    for name, (image, _) in zip(qimlist, queries, strict=True):
        save_jpeg(image, staging / "jpg" / f"{name}.jpg")
    with (staging / f"gnd_{out.name}.pkl").open("wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle, protocol=4)
    readme = out / "README.md"
    if readme.is_file():
        shutil.copy2(readme, staging / "README.md")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def build(opencv_data: Path, out: Path) -> dict:
    """Write the demo into a temporary folder next to `out`, then swap it in."""
    missing = [str(p) for p in demo_sources(opencv_data) if not p.is_file()]
    if missing:
        raise SystemExit(f"missing source photos (install opencv-doc?): {', '.join(missing)}")
    distractor_photos = [_open(n, opencv_data) for n in DISTRACTORS]
    gallery: list[GalleryImage] = []
    queries: list[tuple[Image.Image, Box]] = []
    for q, (name, second_name, box) in enumerate(QUERIES):
        photo = _open(name, opencv_data)
        second = _open(second_name, opencv_data) if second_name else None
        gallery += _query_views(q, photo, second, box, distractor_photos)
        queries.append(query_image(photo, box))
    for i, photo in enumerate(distractor_photos):
        others = distractor_photos[:i] + distractor_photos[i + 1 :]
        gallery += [
            GalleryImage(v, None, "distractor") for v in _distractor_views(i, photo, others)
        ]
    gallery += [
        GalleryImage(fit(_open(n, opencv_data), VIEW_SIDE), None, "distractor")
        for n in RAW_DISTRACTORS
    ]

    return write_benchmark(gallery, queries, out, SEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--opencv-data",
        type=Path,
        default=OPENCV_DATA,
        help="OpenCV sample data folder (from the opencv-doc package)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "data" / "demo"
    )
    args = parser.parse_args()
    gnd = build(args.opencv_data, args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(
        f"wrote {args.out}: {len(gnd['qimlist'])} queries, {len(gnd['imlist'])} gallery images, "
        f"{size / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
