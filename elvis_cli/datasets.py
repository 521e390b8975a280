"""Retrieval benchmarks in the revisitop layout: `<root>/gnd_<name>.pkl` plus `<root>/jpg/`.

The ground-truth pickle is the one file every benchmark tool agrees on, so it is the source of
truth for names, order and positives; images are only located, never listed from disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elvis_cli.errors import InputError
from elvis_cli.safe_pickle import load_pickle

_GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_IMAGES_URL = {
    "roxford5k": "http://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz",
    "rparis6k": "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1.tgz and paris_2.tgz",
}
KNOWN_DATASETS: dict[str, str] = {
    name: (
        f"download {_GND_URL}/{name}/gnd_{name}.pkl into <data-root>/{name}/ and unpack "
        f"the images of {images} flat into <data-root>/{name}/jpg/"
    )
    for name, images in _IMAGES_URL.items()
}
KNOWN_DATASETS["demo"] = (
    "bundled with the repository in examples/data/demo (data root: examples/data)"
)

# Index lists of each ground-truth flavour; the first that matches decides the protocol.
_PROTOCOL_KEYS = {"revisitop": ("easy", "hard", "junk"), "ok-junk": ("ok", "junk")}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

Box = tuple[float, float, float, float]


@dataclass
class RetrievalDataset:
    """A benchmark as its ground truth describes it; indices in `ground_truth` point into
    `gallery`."""

    name: str
    root: Path
    gallery: list[str]
    queries: list[str]
    ground_truth: list[dict[str, np.ndarray]]
    protocol: str

    def _image_path(self, entry: str) -> Path:
        # revisitop lists bare names ("all_souls_000013"); INSTRE-style lists carry the suffix.
        if Path(entry).suffix.lower() in _IMAGE_SUFFIXES:
            return self.root / "jpg" / entry
        return self.root / "jpg" / f"{entry}.jpg"

    def gallery_paths(self) -> list[Path]:
        return [self._image_path(entry) for entry in self.gallery]

    def query_paths(self) -> list[Path]:
        return [self._image_path(entry) for entry in self.queries]

    def query_boxes(self) -> list[Box | None]:
        """The crop (x1, y1, x2, y2) each query is evaluated with, or None for the full image."""
        boxes: list[Box | None] = []
        for entry in self.ground_truth:
            bbx = entry.get("bbx")
            boxes.append(None if bbx is None else tuple(float(v) for v in bbx))  # type: ignore[misc]
        return boxes


def default_data_root() -> Path:
    """$ELVIS_DATA_ROOT, else `<cache>/data` where cache is $ELVIS_CACHE or ~/.cache/elvis."""
    if os.environ.get("ELVIS_DATA_ROOT"):
        return Path(os.environ["ELVIS_DATA_ROOT"]).expanduser()
    cache = os.environ.get("ELVIS_CACHE") or Path.home() / ".cache" / "elvis"
    return Path(cache).expanduser() / "data"


def find_datasets(data_root: Path) -> list[str]:
    """Names of the datasets under `data_root` (folders holding their `gnd_<name>.pkl`)."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        return []
    return sorted(
        child.name for child in data_root.iterdir() if (child / f"gnd_{child.name}.pkl").is_file()
    )


def _how_to_get(name: str) -> str:
    return KNOWN_DATASETS.get(name, "expected <data-root>/<name>/gnd_<name>.pkl and jpg/")


def _names(raw: dict[str, Any], key: str, gnd_file: Path) -> list[str]:
    if key not in raw:
        raise InputError(f"{gnd_file} has no '{key}' list")
    return [str(entry) for entry in raw[key]]


def _indices(value: Any, where: str, gallery_size: int) -> np.ndarray:
    indices = np.asarray(value, dtype=np.int64).reshape(-1)
    bad = indices[(indices < 0) | (indices >= gallery_size)]
    if bad.size:
        raise InputError(
            f"{where} refers to gallery image {int(bad[0])}, but the gallery has "
            f"{gallery_size} images"
        )
    return indices


def _protocol_of(entries: list[Any], gnd_file: Path) -> str:
    first = entries[0] if entries else {}
    if not isinstance(first, dict):
        raise InputError(f"{gnd_file}: 'gnd' must be a list of dicts, one per query")
    for protocol, keys in _PROTOCOL_KEYS.items():
        if keys[0] in first:
            return protocol
    raise InputError(f"{gnd_file}: query 0 has neither 'easy' (revisitop) nor 'ok' (ok/junk) lists")


def _parse_ground_truth(
    entries: list[Any], protocol: str, gallery_size: int, gnd_file: Path
) -> list[dict[str, np.ndarray]]:
    parsed = []
    for q, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{gnd_file}: 'gnd' must be a list of dicts, one per query")
        item: dict[str, np.ndarray] = {}
        for key in _PROTOCOL_KEYS[protocol]:
            if key not in entry:
                raise InputError(f"{gnd_file}: query {q} has no '{key}' list")
            item[key] = _indices(entry[key], f"{gnd_file}: query {q} '{key}'", gallery_size)
        if entry.get("bbx") is not None:
            bbx = np.asarray(entry["bbx"], dtype=np.float64).reshape(-1)
            if bbx.size != 4:
                raise InputError(f"{gnd_file}: query {q} 'bbx' must be x1, y1, x2, y2")
            item["bbx"] = bbx
        parsed.append(item)
    return parsed


def load_dataset(data_root: Path, name: str) -> RetrievalDataset:
    """Read `<data_root>/<name>/gnd_<name>.pkl` and check every index against the gallery."""
    root = Path(data_root) / name
    if not root.is_dir():
        raise InputError(f"no dataset '{name}' in {data_root}: {_how_to_get(name)}")
    gnd_file = root / f"gnd_{name}.pkl"
    if not gnd_file.is_file():
        raise InputError(f"{root} has no gnd_{name}.pkl: {_how_to_get(name)}")
    raw = load_pickle(gnd_file)
    if not isinstance(raw, dict):
        raise InputError(f"{gnd_file} must hold a dict with 'imlist', 'qimlist' and 'gnd'")
    gallery = _names(raw, "imlist", gnd_file)
    queries = _names(raw, "qimlist", gnd_file)
    if "gnd" not in raw:
        raise InputError(f"{gnd_file} has no 'gnd' list")
    entries = list(raw["gnd"])
    if len(entries) != len(queries):
        raise InputError(f"{gnd_file}: 'gnd' has {len(entries)} entries for {len(queries)} queries")
    protocol = _protocol_of(entries, gnd_file)
    ground_truth = _parse_ground_truth(entries, protocol, len(gallery), gnd_file)
    return RetrievalDataset(name, root, gallery, queries, ground_truth, protocol)
