"""Our features file written out in the authors' own file layout (ELVIS_SPEC §4).

Released-file readers (ours, the authors' scripts) then take our extraction as they take the
authors' descriptors: `<desc>_<split>_local.hdf5` with `features` (N, K, 5 + D) and one
`<desc>_<split>_<type>.hdf5` per global type with `features` (N, D), all float16, rows in the
features file's image order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from elvis_cli.features.layout import NUM_META, OFFICIAL_LOCAL, official_file
from elvis_cli.features.store import FeatureStore
from elvis_cli.util.atomic import atomic_path
from elvis_cli.util.errors import InputError

OFFICIAL_DTYPE = np.float16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_IMAGES_PER_READ = 256  # local rows are large (K x (5 + D)): copy them in bounded blocks


def export_official(
    features: str | Path,
    out_dir: str | Path,
    name: str,
    split: str,
    global_types: Sequence[str] | None = None,
) -> list[Path]:
    """Write the local descriptors and the global ones of `global_types` (None: every type the
    file holds) of our features file as the authors' float16 files; returns their paths.

    `name` is the descriptor name (`dinov2`), `split` the split (`query`, `gallery`).
    """
    for label, value in (("descriptor name", name), ("split", split)):
        if not _NAME.fullmatch(value):
            raise InputError(f"{label} {value!r}: use letters, digits, '.', '_' or '-'")
    written = []
    with FeatureStore.open(features) as store:
        if not store.global_types:
            raise InputError(f"{store.path}: not an elvis-cli features file")
        kinds = list(store.global_types if global_types is None else dict.fromkeys(global_types))
        arrays = {kind: store.global_descriptors(kind) for kind in kinds}  # checks every kind
        target = official_file(Path(out_dir), name, split, OFFICIAL_LOCAL)
        with atomic_path(target) as temporary, h5py.File(temporary, "w") as file:
            dataset = file.create_dataset(
                "features", (store.num_images, store.num_local, store.local_dim + NUM_META),
                dtype=OFFICIAL_DTYPE)
            for start in range(0, store.num_images, _IMAGES_PER_READ):
                stop = min(start + _IMAGES_PER_READ, store.num_images)
                dataset[start:stop] = store.read_local(np.arange(start, stop), dtype=None)
        written.append(target)
        for kind, values in arrays.items():
            target = official_file(Path(out_dir), name, split, kind)
            with atomic_path(target) as temporary, h5py.File(temporary, "w") as file:
                file.create_dataset("features", data=values.astype(OFFICIAL_DTYPE))
            written.append(target)
    return written
