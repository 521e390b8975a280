"""How descriptors are laid out on disk: the metadata columns every descriptor row starts with,
the names of our features files, their datasets, shards, manifest and lock, and the authors' file
names.

Backbones write rows in this layout and every store reads it, so it lives apart from both.
The metadata columns are identical to the official files' (ELVIS_SPEC §3): the patch centre's
row (vertical) then column (horizontal) position as fractions of the grid, the scale index,
the padding flag (1 = padding) and the weight; the D descriptor values follow. Keypoint
descriptors (RootSIFT, backbones/rootsift.py) fill them alike: the keypoint's row and column
as fractions of the resized image's height and width ((y + 0.5) / h, pixel centres as the grid
centres), in the scale column the keypoint's size (its diameter in px of the image resized to
`sift_side`), and as weight its SIFT response.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import h5py

META_ROW, META_COL, META_SCALE, META_PADDING, META_WEIGHT = range(5)
NUM_META = 5

# 2: metadata columns 0 and 1 are the row, then column centre (version 1 had x, y), and
# optional `global_<type>` datasets. Files of another version are refused, not misread.
FORMAT = "elvis-cli-features/2"
FORMAT_PREFIX = "elvis-cli-features/"
SHARD_DATASETS = ("features", "global", "paths", "ids", "sizes")
POOLED_PREFIX = "global_"  # + a global type: a dataset of further global descriptors
CLASS_GLOBAL = "cls"  # the global descriptor every backbone yields, the one shortlists use


FEATURES_SUFFIXES = (".h5", ".hdf5")  # what a features file's name ends in


def shards_dir(path: str | Path) -> Path:
    return Path(f"{path}.shards")


def shard_path(path: str | Path, index: int) -> Path:
    return shards_dir(path) / f"shard-{index:05d}.h5"


def shard_files(path: str | Path) -> list[Path]:
    """The shard files on disk beside features file `path`, whether its manifest lists them or
    not."""
    return sorted(shards_dir(path).glob("shard-*.h5"))


def manifest_path(path: str | Path) -> Path:
    """The extraction's record of features file `path` (collection.py)."""
    return shards_dir(path) / "manifest.json"


def lock_path(path: str | Path) -> Path:
    """The lock that one writer of features file `path` holds (util/lock.py)."""
    return shards_dir(path) / "lock"


def dataset_names(file: h5py.File) -> list[str]:
    """The datasets of our shard or joined file: the fixed ones, then each extra global type."""
    return [*SHARD_DATASETS, *sorted(n for n in file if n.startswith(POOLED_PREFIX))]


# The authors' files (ELVIS_SPEC §4): `<desc>_<split>_<kind>.hdf5`, kind "local" or a global type
OFFICIAL_LOCAL = "local"
_OFFICIAL_NAME = re.compile(r"(?P<name>.+)_(?P<split>[^_]+)_(?P<kind>[^_]+)\.hdf5")


def official_file(folder: str | Path, name: str, split: str, kind: str) -> Path:
    """Where the authors keep descriptors of `kind` of split `split` of descriptors `name`."""
    return Path(folder) / f"{name}_{split}_{kind}.hdf5"


def official_parts(path: str | Path) -> tuple[str, str, str] | None:
    """(name, split, kind) of a file named the authors' way, else None."""
    match = _OFFICIAL_NAME.fullmatch(Path(path).name)
    return None if match is None else (match["name"], match["split"], match["kind"])
