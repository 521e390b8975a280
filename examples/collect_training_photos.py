"""Copy the real photos that pip packages ship into a training folder, disjoint from the demo.

    python examples/collect_training_photos.py OUT_DIR [--opencv-data DIR]

The bundled demo benchmark (examples/make_demo.py) uses OpenCV's sample photos and
scikit-image's motorcycle pair; training uses everything else: scikit-image's other real
photos, matplotlib's grace_hopper.jpg, when scikit-learn is installed its china.jpg and
flower.jpg, and with --wallpapers the photographs of Debian's CC-licensed wallpaper packages
(ukui-wallpapers, lomiri-wallpapers-16.04, lomiri-wallpapers-20.04, mate-backgrounds):

    apt-get download ukui-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 \
        mate-backgrounds && for f in *.deb; do dpkg -x "$f" wallpapers; done
    python examples/collect_training_photos.py photos --wallpapers wallpapers

The script refuses to write anything if a training photo has the name or the bytes
of a demo source. It writes OUT_DIR/images/<source>_<name>, OUT_DIR/split.txt, one
"<train|val> images/<file>" line per photo, the split decided by a fixed seed, and the two
path lists OUT_DIR/train.txt and OUT_DIR/val.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo  # a sibling script, not an installed module

SEED = 7
VAL_FRACTION = 0.2

# Real photographs only: scikit-image's synthetic, binary and pure-microscopy images are left out.
SKIMAGE_PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "page.png",
    "retina.jpg", "rocket.jpg",
]  # fmt: skip


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


# wallpaper folders that hold drawings or renders rather than photographs
_NOT_PHOTOS = ("abstract", "desktop")


def wallpaper_photos(root: Path) -> list[Path]:
    """The JPEG photographs under an unpacked wallpaper tree, one resolution of each."""
    photos = sorted(root.rglob("backgrounds/**/*.jpg"))
    return [path for path in photos
            if not any(part in _NOT_PHOTOS for part in path.parts) and "_3840x" not in path.name
            and "_5640x" not in path.name]


def training_sources(wallpapers: Path | None = None) -> list[tuple[str, Path]]:
    """(source tag, file) for every training photo available in this environment."""
    sources = [("skimage", make_demo.SKIMAGE_DATA / name) for name in SKIMAGE_PHOTOS]
    matplotlib_dir = _package_dir("matplotlib")
    if matplotlib_dir is not None:
        sample = matplotlib_dir / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        sources.append(("matplotlib", sample))
    sklearn_dir = _package_dir("sklearn")
    if sklearn_dir is not None:
        sources += [
            ("sklearn", sklearn_dir / "datasets" / "images" / n)
            for n in ("china.jpg", "flower.jpg")
        ]
    if wallpapers is not None:
        sources += [("wallpaper", path) for path in wallpaper_photos(wallpapers)]
    return [(tag, path) for tag, path in sources if path.is_file()]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_disjoint(training: list[Path], demo: list[Path]) -> None:
    """Fail if any training photo shares a file name or its exact bytes with a demo source."""
    demo_names = {p.name for p in demo}
    demo_digests = {_digest(p) for p in demo if p.is_file()}
    for path in training:
        if path.name in demo_names or _digest(path) in demo_digests:
            raise SystemExit(f"{path} is also a demo source; training and demo must be disjoint")


def collect(out: Path, opencv_data: Path, wallpapers: Path | None = None) -> list[str]:
    """Copy the photos and write split.txt; returns its lines."""
    sources = training_sources(wallpapers)
    check_disjoint([path for _, path in sources], make_demo.demo_sources(opencv_data))
    names = [f"{tag}_{path.name}" for tag, path in sources]
    is_val = np.zeros(len(names), dtype=bool)
    is_val[
        np.random.default_rng(SEED).permutation(len(names))[: round(VAL_FRACTION * len(names))]
    ] = True
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, (_, path) in zip(names, sources, strict=True):
        shutil.copyfile(path, out / "images" / name)
    lines = [
        f"{'val' if val else 'train'} images/{name}"
        for name, val in zip(names, is_val, strict=True)
    ]
    _write_lines(out / "split.txt", lines)
    for split in ("train", "val"):  # path lists that `elvis train PHOTOS --val VAL` reads
        _write_lines(out / f"{split}.txt",
                     [line.split(" ", 1)[1] for line in lines if line.startswith(split + " ")])
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(handle.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to fill (created if missing)")
    parser.add_argument(
        "--opencv-data",
        type=Path,
        default=make_demo.OPENCV_DATA,
        help="OpenCV sample data folder, to check disjointness by content too",
    )
    parser.add_argument("--wallpapers", type=Path, default=None,
                        help="folder where Debian's wallpaper packages were unpacked")
    args = parser.parse_args()
    lines = collect(args.out, args.opencv_data, args.wallpapers)
    val = sum(line.startswith("val") for line in lines)
    print(f"wrote {len(lines)} photos to {args.out} ({len(lines) - val} train, {val} val)")


if __name__ == "__main__":
    main()
