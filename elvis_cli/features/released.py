"""The authors' released descriptor files (ELVIS_SPEC §4), found and opened as feature stores.

A dataset folder of the release holds `<desc>_query_local.hdf5`, `<desc>_gallery_local.hdf5`,
`nn_<desc>.pkl` and `gnd_<dataset>.pkl`. The local files hold no global descriptors and no
image names: the global ranking is the one stored in the nn file, names come from the
authors' image lists or the ground truth next to them, and global descriptors from the
authors' `<desc>_<split>_<type>.hdf5` files when they are there. Local files may be
float16/float32 or binarised (packed sign bits), and may be joined from chunk files by HDF5
virtual datasets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from elvis_cli.evaluation.datasets import read_image_lines
from elvis_cli.features.head import first_appearance, head_file_rows
from elvis_cli.features.layout import (
    CLASS_GLOBAL,
    NUM_META,
    OFFICIAL_LOCAL,
    official_file,
    official_parts,
)
from elvis_cli.features.store import DescriptorStore, FeatureStore
from elvis_cli.retrieval.result_files import openable_paths
from elvis_cli.retrieval.shortlist import Shortlist, load_shortlist
from elvis_cli.util.errors import InputError
from elvis_cli.util.safe_pickle import load_pickle

BINARY_FIELDS = ("metadata", "descriptor")
# global types the authors' extraction writes, and the one their ranking script reads for
# backbones other than DINOv2 (extract/prepare_topk_global.py)
AUTHORS_RANKING_GLOBAL = "global"
OFFICIAL_GLOBAL_TYPES = (CLASS_GLOBAL, "w-avg", "og-avg", AUTHORS_RANKING_GLOBAL)


@dataclass
class ReleasedFiles:
    """Where one descriptor type of one dataset lives in the release."""

    queries: Path
    gallery: Path
    shortlist: Path

    @classmethod
    def find(cls, dataset_dir: Path, descriptors: str) -> ReleasedFiles:
        """The files in `dataset_dir` itself: never another dataset's (a +1M set has its own
        folder, nn and gnd files, ELVIS_SPEC §4)."""
        if not dataset_dir.is_dir():
            raise InputError(f"no folder {dataset_dir}: the released files of "
                             f"{dataset_dir.name} live in a folder of that name")
        files = cls(official_file(dataset_dir, descriptors, "query", OFFICIAL_LOCAL),
                    official_file(dataset_dir, descriptors, "gallery", OFFICIAL_LOCAL),
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

    def _dimensions(self, path: Path, features: h5py.Dataset) -> tuple[int, int, int]:
        """(N, K, D) of the packed layout, refusing what does not give K x 5 metadata and K
        packed rows per image."""
        names = features.dtype.names or ()
        if any(name not in names for name in BINARY_FIELDS):
            raise InputError(f"{path}: binarised 'features' need fields metadata and descriptor, "
                             f"found {', '.join(names) or 'none'}")
        meta_shape = features.dtype["metadata"].shape
        bits_shape = features.dtype["descriptor"].shape
        num_local = meta_shape[0] if features.ndim == 1 else features.shape[1]
        if (features.ndim not in (1, 2) or meta_shape[-1] != NUM_META
                or features.dtype["descriptor"].base != np.uint8
                or meta_shape[:-1] != bits_shape[:-1]):
            raise InputError(f"{path}: binarised 'features' of shape {features.shape} with "
                             f"{features.dtype} do not give K x 5 metadata and K packed uint8 rows")
        return features.shape[0], num_local, 8 * bits_shape[-1]

    def _read_rows(self, start: int, stop: int, count: int) -> np.ndarray:
        per_image = self._features.ndim == 1  # (N,) of K rows each, or (N, K) of one row each
        block = self._features[start:stop] if per_image else self._features[start:stop, :count]
        meta, bits = block["metadata"][:, :count], block["descriptor"][:, :count]
        signs = np.unpackbits(bits, axis=-1).astype(np.float32) * 2.0 - 1.0
        return np.concatenate([meta.astype(np.float32), signs], axis=-1)


class ShortlistedGallery(DescriptorStore):
    """The full gallery seen through a file that holds only the images in some query's
    extracted head (3-row nn files): `file_rows` maps a gallery index to its row there, -1
    for an image outside every head, which has no descriptors and is never read."""

    def __init__(self, store: DescriptorStore, file_rows: np.ndarray, head: int) -> None:
        # the released global files of a shortlisted-only gallery cover the whole gallery
        super().__init__(store.path, len(file_rows), store.num_local, store.local_dim,
                         store._globals)
        self._store = store
        self._file_rows = file_rows
        self.head = head
        self.binarised = store.binarised
        # a result table names an image of some head by the path our file stores for it
        # (openable from here, as every table does); an image outside every head, and every
        # image of a released file (which stores no paths: its names come from its ground
        # truth, name_images), by its gallery index, not by its row in the file
        if store.root is not None:
            names = openable_paths(store)
            self.paths = [names[row] if row >= 0 else str(index)
                          for index, row in enumerate(file_rows.tolist())]

    def identity(self) -> dict[str, Any]:
        """The file's, and which of its rows each gallery index maps to."""
        mapping = hashlib.sha256(np.ascontiguousarray(self._file_rows, np.int64)).hexdigest()
        return {**self._store.identity(), "gallery_rows": mapping}

    def read_local(
        self, indices: Sequence[int] | np.ndarray, num_local: int | None = None,
        dtype: np.dtype | None = np.float32, check_finite: bool = True,
    ) -> np.ndarray:
        """The rows of the gallery images asked for, read from their rows in the file."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.num_images):
            raise InputError(f"{self.path}: image index out of range 0..{self.num_images - 1}")
        rows = self._file_rows[wanted]
        if (rows < 0).any():
            absent = int(wanted[np.flatnonzero(rows < 0)[0]])
            raise InputError(
                f"gallery image {absent} has no descriptors in {self.path.name}, which holds "
                f"only the images in some query's top {self.head} (the extraction's shortlist):"
                f" re-rank at most {self.head} (junk moved to the end of a list can bring "
                "later images into its head)")
        return self._store.read_local(rows, num_local, dtype, check_finite)

    @property
    def local_row_bytes(self) -> int:
        return self._store.local_row_bytes

    def close(self) -> None:
        super().close()
        self._store.close()


def extracted_head(indices: np.ndarray, third_row: np.ndarray, file_size: int
                   ) -> tuple[int, np.ndarray]:
    """The extraction's shortlist h and the gallery images a shortlisted-only file holds, in
    its row order, rebuilt from a 3-row nn file (the authors' find_unique_shortlist).

    The file holds the union of every query's top h in order of first appearance, rank-major
    (rank 0 of every query, then rank 1, ...); the third row is that row for those images and
    the image's own index for every other entry. h is not stored: it is the smallest h whose
    union has as many images as the file, and the rebuilt third row must equal the stored one.
    """
    num_queries, length = indices.shape
    held, first_seen = first_appearance(indices)
    # union of the top h: the images first seen before position h * Q of the rank-major list
    sizes = np.searchsorted(first_seen, np.arange(1, length + 1) * num_queries)
    fits = np.flatnonzero(sizes == file_size)
    if not fits.size:
        raise InputError(f"the nn file's third row does not fit the gallery file: no top h of "
                         f"the lists holds exactly its {file_size} images")
    held = held[:file_size]
    valid = indices >= 0
    expected = head_file_rows(indices, held)
    if not np.array_equal(expected[valid], third_row[valid]):
        query, rank = np.argwhere(valid & (expected != third_row))[0]
        raise InputError(
            f"the nn file's third row is not the first-appearance mapping of the top "
            f"{int(fits[0]) + 1} of each list (query {query}, rank {rank}: "
            f"{int(third_row[query, rank])}, expected {int(expected[query, rank])})")
    return int(fits[0]) + 1, held


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
    store = store_class.open(path, allow_external_sources)
    try:
        _add_official_globals(store, allow_external_sources)
    except BaseException:
        store.close()
        raise
    return store


def _add_official_globals(store: FeatureStore, allow_external_sources: bool) -> None:
    """The authors keep each global type of a split beside its local file, as
    `<desc>_<split>_<type>.hdf5`; their ranking script takes `global` where `cls` is absent
    (backbones other than DINOv2), which therefore stands in for it."""
    parts = official_parts(store.path)
    if store.global_types or parts is None or parts[2] != OFFICIAL_LOCAL:
        return
    name, split, _ = parts
    for kind in OFFICIAL_GLOBAL_TYPES:
        sibling = official_file(store.path.parent, name, split, kind)
        target = CLASS_GLOBAL if kind == AUTHORS_RANKING_GLOBAL else kind
        if sibling.is_file() and target not in store.global_types:
            store.add_global(target, sibling, allow_external_sources)


def _sources_within(path: Path, data_root: Path) -> bool:
    """Whether the released file at `path` is joined (HDF5 virtual datasets) only from files
    under `data_root`: a +1M gallery joins its base gallery and the distractors, which lie in
    sibling folders (the authors' merge_hdf5.py)."""
    try:
        with h5py.File(path, "r") as file:
            features = file.get("features")
            if not isinstance(features, h5py.Dataset) or not features.is_virtual \
                    or features.external:
                return False
            sources = {source.file_name for source in features.virtual_sources()} - {"."}
    except OSError:
        return False  # FeatureStore.open names the problem
    return all((path.parent / os.fsdecode(source)).resolve().is_relative_to(data_root.resolve())
               for source in sources)


def gallery_for(store: FeatureStore, shortlist: Shortlist,
                gallery_size: int | None = None) -> DescriptorStore:
    """`store` itself, or the full gallery behind a shortlisted-only file (3-row nn files)."""
    if shortlist.file_rows is None:
        return store
    head, held = extracted_head(shortlist.indices, shortlist.file_rows, store.num_images)
    size = max(gallery_size or 0, int(shortlist.indices.max(initial=-1)) + 1)
    file_rows = np.full(size, -1, dtype=np.int64)
    file_rows[held] = np.arange(len(held))
    return ShortlistedGallery(store, file_rows, head)


def image_names(folder: Path) -> tuple[list[str], list[str]] | None:
    """(query names, gallery names) of released files: the authors' `test_query.txt` and
    `test_gallery.txt` (one `path,...` line per row, in the files' order), else the lists of
    `gnd_<folder>.pkl`; None when neither is there."""
    listed = [folder / "test_query.txt", folder / "test_gallery.txt"]
    if all(path.is_file() for path in listed):
        query_lines, gallery_lines = (read_image_lines(path) for path in listed)
        return [fields[0] for fields in query_lines], [fields[0] for fields in gallery_lines]
    gnd = folder / f"gnd_{folder.name}.pkl"
    if not gnd.is_file():
        return None
    raw = load_pickle(gnd)
    if not isinstance(raw, dict) or "qimlist" not in raw or "imlist" not in raw:
        return None
    return [str(name) for name in raw["qimlist"]], [str(name) for name in raw["imlist"]]


def name_images(store: DescriptorStore, names: list[str]) -> None:
    """Give a released store's rows their image names when the counts agree."""
    if len(names) == store.num_images and store.backbone_settings is None:
        store.paths = list(names)
        store.ids = list(names)


def released_gallery(queries: FeatureStore, gallery: FeatureStore, shortlist: Shortlist
                     ) -> DescriptorStore:
    """For `elvis rerank` on released files: name the images from the ground truth beside the
    query file, and see the gallery through a 3-row shortlist's file rows."""
    names = image_names(queries.path.parent)
    gallery = gallery_for(gallery, shortlist, len(names[1]) if names else None)
    if names:
        name_images(queries, names[0])
        name_images(gallery, names[1])
    return gallery


def open_released(dataset_dir: Path, descriptors: str, gallery_size: int | None = None
                  ) -> tuple[FeatureStore, DescriptorStore, Shortlist]:
    """Query store, gallery store (full-gallery indices) and the global ranking of a release.

    Its local files may be joined from files anywhere under the data root (the folder that
    holds `dataset_dir`), as a +1M gallery is; nothing outside it is read.
    """
    files = ReleasedFiles.find(dataset_dir, descriptors)
    ranking = load_shortlist(files.shortlist)
    data_root = dataset_dir.parent
    queries = open_local(files.queries, _sources_within(files.queries, data_root))
    try:
        if ranking.indices.shape[0] != queries.num_images:
            raise InputError(f"{files.shortlist.name} ranks {ranking.indices.shape[0]} queries "
                             f"but {files.queries.name} holds {queries.num_images}")
        gallery = open_local(files.gallery, _sources_within(files.gallery, data_root))
    except BaseException:
        queries.close()
        raise
    try:
        gallery = gallery_for(gallery, ranking, gallery_size)
    except BaseException:
        queries.close()
        gallery.close()
        raise
    return queries, gallery, ranking
