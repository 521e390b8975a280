"""Descriptor files: sharded HDF5 joined by a virtual dataset, readable like the official files.

`FILE.h5` is a small file of HDF5 virtual datasets over `FILE.h5.shards/shard-NNNNN.h5`. Shards
are written one at a time (so extraction can stop and resume) and the joined file is built last.
The `features` dataset uses exactly the official layout (ELVIS_SPEC §4): per image K rows of
x, y, scale index, padding flag, weight, then the D descriptor values. So one reader serves our
files and the released `*_local.hdf5` files, which hold `features` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from elvis_cli.backbones.base import META_PADDING, NUM_META
from elvis_cli.errors import InputError

FORMAT = "elvis-cli-features/1"
SHARD_DATASETS = ("features", "global", "paths", "ids", "sizes")
STRING_DTYPE = h5py.string_dtype("utf-8")


def shards_dir(path: str | Path) -> Path:
    return Path(f"{path}.shards")


def shard_path(path: str | Path, index: int) -> Path:
    return shards_dir(path) / f"shard-{index:05d}.h5"


def _temporary(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def write_shard(
    target: Path,
    features: np.ndarray,
    global_desc: np.ndarray,
    paths: Sequence[str],
    ids: Sequence[str],
    sizes: np.ndarray,
) -> None:
    """Write one shard atomically. features (n, K, 5 + D), global_desc (n, Dg), sizes (n, 2).

    An empty shard (n = 0, every image failed) is valid: it keeps K, D and Dg in its shapes.
    """
    count = len(paths)
    if not (len(features) == len(global_desc) == len(ids) == len(sizes) == count):
        raise ValueError("shard arrays disagree on the number of images")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(target)
    with h5py.File(temporary, "w") as file:
        file.create_dataset("features", data=np.asarray(features, dtype=np.float16))
        file.create_dataset("global", data=np.asarray(global_desc, dtype=np.float32))
        file.create_dataset("paths", data=list(paths), dtype=STRING_DTYPE, shape=(count,))
        file.create_dataset("ids", data=list(ids), dtype=STRING_DTYPE, shape=(count,))
        file.create_dataset("sizes", data=np.asarray(sizes, dtype=np.int32).reshape(count, 2))
    os.replace(temporary, target)


def shard_length(shard: Path) -> int:
    with h5py.File(shard, "r") as file:
        return len(file["paths"])


def finalize(
    path: str | Path, shards: Sequence[Path], settings: dict[str, Any], root: Path
) -> None:
    """Build the joined top-level file over finished shards, atomically.

    Virtual sources use paths relative to the joined file, so FILE.h5 and FILE.h5.shards can be
    moved together. Zero-image shards contribute nothing.
    """
    path = Path(path)
    infos = []
    for shard in shards:
        with h5py.File(shard, "r") as file:
            infos.append({name: (file[name].shape, file[name].dtype) for name in SHARD_DATASETS})
    if not infos:
        raise ValueError("finalize needs at least one shard")
    total = sum(info["paths"][0][0] for info in infos)
    first = infos[0]
    temporary = _temporary(path)
    with h5py.File(temporary, "w") as file:
        for name in SHARD_DATASETS:
            shape, dtype = first[name]
            full_shape = (total, *shape[1:])
            if total == 0:
                file.create_dataset(name, shape=full_shape, dtype=dtype)
                continue
            layout = h5py.VirtualLayout(shape=full_shape, dtype=dtype)
            start = 0
            for shard, info in zip(shards, infos, strict=True):
                rows = info[name][0][0]
                if rows:
                    source_name = os.path.relpath(shard, path.parent)
                    layout[start : start + rows] = h5py.VirtualSource(
                        source_name, name, shape=info[name][0]
                    )
                    start += rows
            file.create_virtual_dataset(name, layout)
        num_local, width = first["features"][0][1:]
        file.attrs.update(
            {
                "format": FORMAT,
                "backbone": json.dumps(settings, sort_keys=True),
                "root": str(Path(root).resolve()),
                "num_local": num_local,
                "local_dim": width - NUM_META,
                "global_dim": first["global"][0][1],
            }
        )
    os.replace(temporary, path)


class FeatureStore:
    """Read access to a features file: ours, or an official `features`-only local file."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._file = file
        features = file["features"]
        self._features = features
        self.num_images, self.num_local, width = features.shape
        self.local_dim = width - NUM_META
        ours = file.attrs.get("format") == FORMAT
        self._global = file["global"] if ours else None
        self.global_dim: int | None = self._global.shape[1] if ours else None
        if ours:
            self.paths: list[str] = list(file["paths"].asstr()[()])
            self.ids: list[str] = list(file["ids"].asstr()[()])
            self.sizes: np.ndarray | None = file["sizes"][()]
            self.backbone_settings: dict[str, Any] | None = json.loads(file.attrs["backbone"])
            self.root: Path | None = Path(file.attrs["root"])
        else:
            self.paths = [str(index) for index in range(self.num_images)]
            self.ids = list(self.paths)
            self.sizes = None
            self.backbone_settings = None
            self.root = None

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: features file not found")
        try:
            file = h5py.File(path, "r")
        except OSError:
            raise InputError(f"{path}: not an HDF5 file") from None
        try:
            _check_layout(path, file)
            return cls(path, file)
        except BaseException:
            file.close()
            raise

    def global_descriptors(self) -> np.ndarray:
        """(N, Dg) float32 L2-normalised global descriptors."""
        if self._global is None:
            raise InputError(f"{self.path}: has no global descriptors (official local-only file)")
        return np.asarray(self._global[()], dtype=np.float32)

    def read_local(
        self, indices: Sequence[int] | np.ndarray, num_local: int | None = None,
        dtype: np.dtype | None = np.float32,
    ) -> np.ndarray:
        """Raw (len, K', 5 + D) float32 rows (metadata then descriptor) for any index order.

        dtype None keeps the stored type (float16 in our files): HDF5's own float16 conversion
        is slow, so the re-ranking engine converts in torch instead.

        h5py wants sorted, unique indices, so rows are read once per contiguous run of sorted
        unique indices and then gathered back into the requested order (duplicates included).
        """
        count = self.num_local if num_local is None else num_local
        if not 1 <= count <= self.num_local:
            raise InputError(f"{self.path}: num_local must be 1..{self.num_local}, got {count}")
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.num_images):
            raise InputError(f"{self.path}: image index out of range 0..{self.num_images - 1}")
        unique, inverse = np.unique(wanted, return_inverse=True)
        rows = np.empty((len(unique), count, self.local_dim + NUM_META),
                        dtype=self._features.dtype if dtype is None else dtype)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for run in np.split(np.arange(len(unique)), breaks):
            if run.size:
                first, last = unique[run[0]], unique[run[-1]]
                rows[run[0] : run[-1] + 1] = self._features[first : last + 1, :count]
        return rows[inverse]

    def local_descriptors(
        self, indices: Sequence[int] | np.ndarray, num_local: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(len, K', D) float32 descriptors and a (len, K') mask, True where a row is padding."""
        rows = self.read_local(indices, num_local)
        return np.ascontiguousarray(rows[..., NUM_META:]), rows[..., META_PADDING] > 0.5

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_layout(path: Path, file: h5py.File) -> None:
    """Refuse files that would be misread, naming what is wrong."""
    if "features" not in file:
        raise InputError(f"{path}: no 'features' dataset (not a descriptor file)")
    features = file["features"]
    if features.dtype.names is not None:
        raise InputError(f"{path}: binarised descriptors are not supported")
    if features.ndim != 3 or features.shape[2] <= NUM_META:
        raise InputError(f"{path}: 'features' has shape {features.shape}, expected (N, K, 5 + D)")
    if file.attrs.get("format") == FORMAT:
        missing = [name for name in SHARD_DATASETS if name not in file]
        missing += [key for key in ("backbone", "root") if key not in file.attrs]
        if missing:
            raise InputError(f"{path}: incomplete features file, missing {', '.join(missing)}")
    sources = {
        source.file_name
        for name in SHARD_DATASETS
        if name in file and file[name].is_virtual
        for source in file[name].virtual_sources()
    }
    for source in sorted(sources - {"."}):
        if not (path.parent / source).is_file():
            raise InputError(f"{path}: missing shard {path.parent / source}")
