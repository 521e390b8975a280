"""The authors' released descriptor files (ELVIS_SPEC §4), found and opened as feature stores.

A dataset folder of the release holds `<desc>_query_local.hdf5`, `<desc>_gallery_local.hdf5`,
`nn_<desc>.pkl` and `gnd_<dataset>.pkl`. The local files hold no global descriptors and no
image names: the global ranking is the one stored in the nn file, and names come from the
ground truth next to them when it is there. Local files may be float16/float32 or binarised
(packed sign bits), and may be joined from chunk files by HDF5 virtual datasets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from elvis_cli.backbones.base import NUM_META
from elvis_cli.errors import InputError
from elvis_cli.feature_store import FeatureStore
from elvis_cli.safe_pickle import load_pickle
from elvis_cli.shortlist import Shortlist, load_shortlist

BINARY_FIELDS = ("metadata", "descriptor")


@dataclass
class ReleasedFiles:
    """Where one descriptor type of one dataset lives in the release."""

    queries: Path
    gallery: Path
    shortlist: Path

    @classmethod
    def find(cls, dataset_dir: Path, descriptors: str) -> ReleasedFiles:
        files = cls(dataset_dir / f"{descriptors}_query_local.hdf5",
                    dataset_dir / f"{descriptors}_gallery_local.hdf5",
                    dataset_dir / f"nn_{descriptors}.pkl")
        missing = [path.name for path in (files.queries, files.gallery, files.shortlist)
                   if not path.is_file()]
        if missing:
            raise InputError(f"{dataset_dir} lacks the released {descriptors!r} files "
                             f"{', '.join(missing)}")
        return files


class BinarisedStore(FeatureStore):
    """A binarised local file: fields `metadata` (K x 5) and `descriptor` (K x D/8 packed bits),
    per image (dataset of shape (N,)) or per row (shape (N, K)); bits are read as -1/+1."""

    binarised = True

    def __init__(self, path: Path, file: h5py.File) -> None:
        features = file["features"]
        names = features.dtype.names or ()
        if any(name not in names for name in BINARY_FIELDS):
            raise InputError(f"{path}: binarised 'features' need fields metadata and descriptor, "
                             f"found {', '.join(names) or 'none'}")
        meta_shape = features.dtype["metadata"].shape
        bits_shape = features.dtype["descriptor"].shape
        self._per_image = features.ndim == 1
        num_local = meta_shape[0] if self._per_image else features.shape[1]
        if (features.ndim not in (1, 2) or meta_shape[-1] != NUM_META
                or features.dtype["descriptor"].base != np.uint8
                or meta_shape[:-1] != bits_shape[:-1]):
            raise InputError(f"{path}: binarised 'features' of shape {features.shape} with "
                             f"{features.dtype} do not give K x 5 metadata and K packed uint8 rows")
        self.path = path
        self._file = file
        self._features = features
        self.num_images, self.num_local = features.shape[0], num_local
        self.local_dim = 8 * bits_shape[-1]
        self.global_dim = None
        self._global = None
        self.paths = [str(index) for index in range(self.num_images)]
        self.ids = list(self.paths)
        self.sizes = None
        self.backbone_settings = None
        self.root = None

    def _read_rows(self, start: int, stop: int, count: int) -> np.ndarray:
        block = self._features[start:stop] if self._per_image else self._features[start:stop,
                                                                                 :count]
        meta, bits = block["metadata"][:, :count], block["descriptor"][:, :count]
        signs = np.unpackbits(bits, axis=-1).astype(np.float32) * 2.0 - 1.0
        return np.concatenate([meta.astype(np.float32), signs], axis=-1)


class ShortlistedGallery(FeatureStore):
    """The full gallery seen through a file that holds only shortlisted images (the third row
    of an nn file maps a gallery index to its row there)."""

    def __init__(self, store: FeatureStore, file_rows: np.ndarray, num_images: int) -> None:
        self._store = store
        self._file_rows = file_rows
        self.path, self._file = store.path, store._file
        self.num_images, self.num_local, self.local_dim = num_images, store.num_local, \
            store.local_dim
        self.global_dim, self._global = None, None
        self.paths = [str(index) for index in range(num_images)]
        self.ids = list(self.paths)
        self.sizes, self.backbone_settings, self.root = None, None, None

    def identity(self) -> dict[str, Any]:
        """The file's, and which of its rows each gallery index maps to."""
        mapping = hashlib.sha256(np.ascontiguousarray(self._file_rows, np.int64)).hexdigest()
        return {**self._store.identity(), "gallery_rows": mapping}

    def read_local(self, indices, num_local: int | None = None,
                   dtype: np.dtype | None = np.float32, check_finite: bool = True) -> np.ndarray:
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.num_images):
            raise InputError(f"{self.path}: image index out of range 0..{self.num_images - 1}")
        rows = self._file_rows[wanted]
        if (rows < 0).any():
            absent = int(wanted[np.flatnonzero(rows < 0)[0]])
            raise InputError(f"gallery image {absent} is in no shortlist, so {self.path.name} "
                             "(shortlisted images only) does not hold it")
        return self._store.read_local(rows, num_local, dtype, check_finite)


def open_local(path: str | Path, allow_external_sources: bool = False) -> FeatureStore:
    """Ours or a released local file, float or binarised."""
    path = Path(path)
    binarised = False
    if path.is_file():
        try:
            with h5py.File(path, "r") as file:
                binarised = "features" in file and file["features"].dtype.names is not None
        except OSError:
            pass  # FeatureStore.open names the problem
    store_class = BinarisedStore if binarised else FeatureStore
    return store_class.open(path, allow_external_sources)


def gallery_for(store: FeatureStore, shortlist: Shortlist,
                gallery_size: int | None = None) -> FeatureStore:
    """`store` itself, or the full gallery behind a shortlisted-only file (3-row nn files)."""
    if shortlist.file_rows is None:
        return store
    valid = shortlist.indices >= 0
    size = max(gallery_size or 0, int(shortlist.indices.max(initial=-1)) + 1)
    indices, rows = shortlist.indices[valid], shortlist.file_rows[valid]
    if rows.size and (rows.min() < 0 or rows.max() >= store.num_images):
        raise InputError(f"the shortlist's third row points at rows up to {int(rows.max())}, "
                         f"but {store.path.name} holds {store.num_images} images")
    file_rows = np.full(size, -1, dtype=np.int64)
    file_rows[indices] = rows
    if (file_rows[indices] != rows).any():
        raise InputError("the shortlist's third row maps one gallery image to two rows")
    return ShortlistedGallery(store, file_rows, size)


def image_names(folder: Path) -> tuple[list[str], list[str]] | None:
    """(query names, gallery names) from `gnd_<folder>.pkl` beside released files, if present."""
    gnd = folder / f"gnd_{folder.name}.pkl"
    if not gnd.is_file():
        return None
    raw = load_pickle(gnd)
    if not isinstance(raw, dict) or "qimlist" not in raw or "imlist" not in raw:
        return None
    return [str(name) for name in raw["qimlist"]], [str(name) for name in raw["imlist"]]


def name_images(store: FeatureStore, names: list[str]) -> None:
    """Give a released store's rows their image names when the counts agree."""
    if len(names) == store.num_images and store.backbone_settings is None:
        store.paths = list(names)
        store.ids = list(names)


def released_gallery(queries: FeatureStore, gallery: FeatureStore, shortlist: Shortlist
                     ) -> FeatureStore:
    """For `elvis rerank` on released files: name the images from the ground truth beside the
    query file, and see the gallery through a 3-row shortlist's file rows."""
    names = image_names(queries.path.parent)
    gallery = gallery_for(gallery, shortlist, len(names[1]) if names else None)
    if names:
        name_images(queries, names[0])
        name_images(gallery, names[1])
    return gallery


def open_released(dataset_dir: Path, descriptors: str, gallery_size: int | None = None
                  ) -> tuple[FeatureStore, FeatureStore, Shortlist]:
    """Query store, gallery store (full-gallery indices) and the global ranking of a release."""
    files = ReleasedFiles.find(dataset_dir, descriptors)
    ranking = load_shortlist(files.shortlist)
    queries = open_local(files.queries)
    try:
        if ranking.indices.shape[0] != queries.num_images:
            raise InputError(f"{files.shortlist.name} ranks {ranking.indices.shape[0]} queries "
                             f"but {files.queries.name} holds {queries.num_images}")
        gallery = gallery_for(open_local(files.gallery), ranking, gallery_size)
    except BaseException:
        queries.close()
        raise
    return queries, gallery, ranking
