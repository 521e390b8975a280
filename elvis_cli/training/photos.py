"""The photos a run trains and validates on: their instance ids (from a labels CSV, or one
instance per photo) and the seeded split of whole instances into training and validation."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elvis_cli.features.images import collect_images
from elvis_cli.training.config import SPLIT, TrainConfig
from elvis_cli.util.errors import InputError


@dataclass
class PhotoSet:
    """Photos and their instance ids: photos sharing an id show the same object or place."""

    paths: list[Path]
    instances: np.ndarray  # (P,) int

    def subset(self, rows: np.ndarray) -> PhotoSet:
        return PhotoSet([self.paths[i] for i in rows], self.instances[rows])


def read_labels(path: Path) -> dict[Path, str]:
    """`path,instance_id` rows (an optional header) -> {resolved path: id}.

    Relative paths are taken from the CSV's folder, so the file stays valid wherever the
    command is run from.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read labels {path}: {error}") from None
    labels: dict[Path, str] = {}
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if line_number == 1 and [cell.strip() for cell in row[:2]] == ["path", "instance_id"]:
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"{path}:{line_number}: expected 'path,instance_id', got {row!r}")
        photo = (path.parent / Path(row[0].strip()).expanduser()).resolve()
        labels[photo] = row[1].strip()
    if not labels:
        raise InputError(f"{path}: no labelled photos")
    return labels


def photo_set(paths: list[Path], labels: dict[Path, str] | None) -> PhotoSet:
    """Instance ids for photos; a photo without a label is an instance of its own."""
    ids: dict[str, int] = {}
    instances = []
    for path in paths:
        key = (labels or {}).get(path.resolve())
        instances.append(ids.setdefault(f"id:{key}" if key is not None else f"photo:{path}",
                                        len(ids)))
    return PhotoSet(list(paths), np.asarray(instances, dtype=np.int64))


def split_by_instance(photos: PhotoSet, fraction: float, seed: int) -> tuple[PhotoSet, PhotoSet]:
    """Seeded (train, val) split of whole instances, so no object is on both sides."""
    instances = np.unique(photos.instances)
    if len(instances) < 4:
        raise InputError(
            f"only {len(instances)} distinct photos/instances: need at least 4 to split off a "
            "validation set, or pass one"
        )
    count = min(len(instances) - 2, max(2, round(fraction * len(instances))))
    rng = np.random.default_rng([seed, SPLIT])
    chosen = rng.choice(instances, size=count, replace=False)
    is_val = np.isin(photos.instances, chosen)
    return photos.subset(np.flatnonzero(~is_val)), photos.subset(np.flatnonzero(is_val))


def training_photos(
    train_source: str | Path | None, val_source: str | Path | None, labels: Path | None,
    config: TrainConfig,
) -> tuple[PhotoSet, PhotoSet]:
    """(train, val) photo sets: from photos and/or a labels CSV, validation given or split off."""
    label_map = read_labels(labels) if labels is not None else None
    if train_source is not None:
        train_paths = collect_images(train_source)[1]
    elif label_map is not None:
        train_paths = list(label_map)
    else:
        raise InputError("give training photos (a folder, list or glob) or a labels CSV")
    photos = photo_set(train_paths, label_map)
    if val_source is None:
        return split_by_instance(photos, config.val_fraction, config.seed)
    val = photo_set(collect_images(val_source)[1], label_map)
    if len(np.unique(val.instances)) < 2:
        raise InputError(f"validation set {val_source} needs photos of at least 2 instances")
    return photos, val
