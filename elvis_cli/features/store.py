"""Reading descriptor files: our sharded HDF5 files and the official ones, alike.

The `features` dataset of our files uses exactly the official layout (layout.py; ELVIS_SPEC
§3, §4), so one reader serves our files and the released `*_local.hdf5` files, which hold
`features` only. Ours also hold `global` (the "cls" global descriptor), `global_<type>` (the
others that were asked for), image paths, ids and sizes. Writing is writer.py's.

`DescriptorStore` is what every store offers the re-ranker; `FeatureStore` reads one HDF5
file; released.py adds binarised files and a gallery seen through a shortlisted-only file.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from elvis_cli.features.layout import (
    CLASS_GLOBAL,
    FORMAT,
    FORMAT_PREFIX,
    META_PADDING,
    NUM_META,
    POOLED_PREFIX,
    SHARD_DATASETS,
    dataset_names,
)
from elvis_cli.features.writer import file_damage
from elvis_cli.util.errors import InputError

T = TypeVar("T")

# what h5py raises on files it cannot make sense of (damaged, hand-made, hostile)
HDF5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError)


class DescriptorStore(ABC):
    """The read interface of descriptors of N images: K local rows of 5 + D numbers each, and
    global descriptors by type. Rows are named by their index until a file names them."""

    binarised = False  # whether local descriptors are signs decoded from packed bits
    temporary = False  # whether its file lives for one run only (search's queries): an
    # embedding cache never keeps its images

    def __init__(self, path: Path, num_images: int, num_local: int, local_dim: int,
                 globals_: dict[str, h5py.Dataset] | None = None) -> None:
        self.path = path
        self.num_images, self.num_local, self.local_dim = num_images, num_local, local_dim
        # global descriptors by type ("cls" first where there is one)
        self._globals: dict[str, h5py.Dataset] = {} if globals_ is None else globals_
        self._global_files: list[h5py.File] = []  # opened by add_global, closed by close
        self.paths: list[str] = [str(index) for index in range(num_images)]
        self.ids: list[str] = list(self.paths)
        self.sizes: np.ndarray | None = None
        self.backbone_settings: dict[str, Any] | None = None  # None: not extracted by us
        self.root: Path | None = None

    @abstractmethod
    def read_local(
        self, indices: Sequence[int] | np.ndarray, num_local: int | None = None,
        dtype: np.dtype | None = np.float32, check_finite: bool = True,
    ) -> np.ndarray:
        """Raw (len, K', 5 + D) rows (metadata then descriptor) for any index order."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the rows depend on, for caches keyed by it."""

    @property
    @abstractmethod
    def local_row_bytes(self) -> int:
        """Bytes one local row (metadata and descriptor) takes as stored."""

    @property
    def global_bytes(self) -> int:
        """Bytes of one image's "cls" global descriptor as stored; 0 where there is none."""
        stored = self._globals.get(CLASS_GLOBAL)
        return 0 if stored is None else stored.dtype.itemsize * int(stored.shape[1])

    @property
    def global_types(self) -> list[str]:
        """The global descriptor types this store holds ("cls" first where it has one)."""
        return list(self._globals)

    @property
    def global_dim(self) -> int | None:
        first = next(iter(self._globals.values()), None)
        return None if first is None else int(first.shape[1])

    def add_global(self, kind: str, path: Path, allow_external_sources: bool = False) -> None:
        """Take the global descriptors of `kind` from a file of their own: the authors keep
        each type beside the local file (`<desc>_<split>_<type>.hdf5`, dataset `features`,
        (N, D), one row per image)."""
        def features_of(file: h5py.File) -> h5py.Dataset:
            features = file.get("features")
            if not isinstance(features, h5py.Dataset) or features.ndim != 2:
                raise InputError(f"{path}: expected a dataset 'features' of shape (N, D)")
            return features

        features = _open_checked(Path(path), allow_external_sources, features_of)
        self._global_files.append(features.file)
        self._globals[kind] = features

    def global_descriptors(self, kind: str = CLASS_GLOBAL) -> np.ndarray:
        """(N, Dg) float32 L2-normalised global descriptors of one type: "cls" (what shortlists
        use), or "w-avg"/"og-avg" when they were extracted (ExtractConfig.global_types)."""
        return self._global_rows(self._global_dataset(kind), kind, 0, self.num_images)

    def global_row(self, row: int, kind: str = CLASS_GLOBAL) -> np.ndarray:
        """One image's global descriptor, read alone: explaining a pair of a gallery of
        millions reads two rows, not the gallery."""
        return self._global_rows(self._global_dataset(kind), kind, row, row + 1)[0]

    def global_chunks(self, kind: str = CLASS_GLOBAL, rows: int = 65536
                      ) -> Iterator[np.ndarray]:
        """The global descriptors of `global_descriptors`, `rows` at a time, in order: a
        gallery of millions is indexed without holding it whole at float32."""
        dataset = self._global_dataset(kind)
        for start in range(0, self.num_images, rows):
            yield self._global_rows(dataset, kind, start, min(start + rows, self.num_images))

    def global_file(self, kind: str = CLASS_GLOBAL) -> Path:
        """The file the global descriptors of `kind` are read from: this one, or the authors'
        file beside it (add_global); what an index built from them depends on."""
        return Path(self._global_dataset(kind).file.filename)

    def _global_dataset(self, kind: str) -> h5py.Dataset:
        if not self._globals:
            raise InputError(f"{self.path}: has no global descriptors (official local-only file "
                             "with no <desc>_<split>_<type>.hdf5 beside it)")
        if kind not in self._globals:
            raise InputError(f"{self.path}: has no {kind!r} global descriptors; it has "
                             f"{', '.join(self.global_types)} (extract with --global-type {kind})")
        dataset = self._globals[kind]
        if dataset.shape[0] != self.num_images:
            raise InputError(f"{dataset.file.filename}: {dataset.shape[0]} {kind} global "
                             f"descriptors for the {self.num_images} images of {self.path.name}")
        return dataset

    def _global_rows(self, dataset: h5py.Dataset, kind: str, start: int, stop: int
                     ) -> np.ndarray:
        """Rows start..stop-1 as float32, checked finite."""
        with _readable(self.path):
            values = np.asarray(dataset[start:stop], dtype=np.float32)
        self.raise_if_not_finite(~np.isfinite(values).all(axis=1), np.arange(start, stop),
                                 "global" if kind == CLASS_GLOBAL else f"{kind} global")
        return values

    def raise_if_not_finite(self, bad: np.ndarray, rows: np.ndarray, kind: str = "local"
                            ) -> None:
        """One-line error naming the first of `rows` flagged `bad` (NaN/inf descriptors)."""
        if bad.any():
            first = int(rows[np.argmax(bad)])
            raise InputError(
                f"{self.path}: {int(bad.sum())} image(s) with NaN/inf {kind} descriptors, "
                f"first {self.paths[first]!r} (row {first})"
            )

    def local_descriptors(
        self, indices: Sequence[int] | np.ndarray, num_local: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(len, K', D) float32 descriptors and a (len, K') mask, True where a row is padding."""
        rows = self.read_local(indices, num_local)
        return np.ascontiguousarray(rows[..., NUM_META:]), rows[..., META_PADDING] > 0.5

    def close(self) -> None:
        for file in self._global_files:
            file.close()

    def __enter__(self) -> DescriptorStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FeatureStore(DescriptorStore):
    """Read access to a features file: ours, or an official `features`-only local file."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        features = file["features"]
        ours = file.attrs.get("format") == FORMAT
        # ours hold global descriptors; official local files do not, but the authors' files
        # beside them may (add_global)
        globals_ = {CLASS_GLOBAL: file["global"], **{
            n.removeprefix(POOLED_PREFIX): file[n] for n in dataset_names(file)
            if n.startswith(POOLED_PREFIX)}} if ours else {}
        super().__init__(path, *self._dimensions(path, features), globals_)
        self._file = file
        self._features = features
        if ours:
            self.paths = list(file["paths"].asstr()[()])
            self.ids = list(file["ids"].asstr()[()])
            self.sizes = file["sizes"][()]
            self.backbone_settings = json.loads(file.attrs["backbone"])
            self.root = Path(file.attrs["root"])
            if not isinstance(self.backbone_settings, dict):
                raise InputError(f"{path}: backbone settings are not a JSON object")

    def _dimensions(self, path: Path, features: h5py.Dataset) -> tuple[int, int, int]:
        """(N, K, D) of a `features` dataset (checked by _check_layout)."""
        num_images, num_local, width = features.shape
        return num_images, num_local, width - NUM_META

    @classmethod
    def open(cls, path: str | Path, allow_external_sources: bool = False) -> FeatureStore:
        """Open and validate a features file; anything unusable is an InputError naming it.

        Data stored in other files (virtual sources, external links or storage) must lie in
        the file's own folder unless `allow_external_sources`: a downloaded file must not make
        us read arbitrary files on this machine.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: features file not found")

        def build(file: h5py.File) -> FeatureStore:
            _check_layout(path, file, allow_binarised=cls.binarised)
            return cls(path, file)

        return _open_checked(path, allow_external_sources, build)

    def identity(self) -> dict[str, Any]:
        """What the rows of this file depend on, for caches keyed by it: its path and, for our
        files, the shards' checksums and which of their rows it maps in which order (the
        joined file is rewritten when extraction resumes or a collection grows or shrinks),
        for others its size and modification time."""
        attrs = self._file.attrs
        if attrs.get("format") == FORMAT:
            mapped = {"layout": attrs["layout"]} if "layout" in attrs else {}
            return {"file": str(self.path.resolve()), "shards": attrs["shards"], **mapped}
        stat = self.path.stat()
        return {"file": str(self.path.resolve()), "bytes": stat.st_size,
                "modified": stat.st_mtime_ns}

    def read_local(
        self, indices: Sequence[int] | np.ndarray, num_local: int | None = None,
        dtype: np.dtype | None = np.float32, check_finite: bool = True,
    ) -> np.ndarray:
        """Raw (len, K', 5 + D) float32 rows (metadata then descriptor) for any index order.

        dtype None keeps float16 where that is the stored type (our files): HDF5's own float16
        conversion is slow, so the re-ranking engine converts in torch instead. It also checks
        finiteness itself (check_finite=False), on its far smaller projections: NaN and inf
        survive the projection, and numpy's float16 arithmetic is slow.

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
                        dtype=dtype or (np.float16 if self._features.dtype == np.float16
                                        else np.float32))
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        with _readable(self.path):
            for run in np.split(np.arange(len(unique)), breaks):
                if run.size:
                    first, last = unique[run[0]], unique[run[-1]]
                    self._read_rows_into(rows[run[0] : run[-1] + 1], first, last + 1)
        if check_finite:  # padding rows may hold anything; a real one with NaN/inf would
            real = ~(rows[..., META_PADDING] > 0.5)  # poison every score
            self.raise_if_not_finite((~np.isfinite(rows).all(axis=-1) & real).any(axis=1),
                                     unique, "local")
        in_order = len(unique) == len(wanted) and np.array_equal(unique, wanted)
        return rows if in_order else rows[inverse]

    @property
    def local_row_bytes(self) -> int:
        """Float rows (N, K, 5 + D) and packed binarised ones, one record per image (N,) or
        per row (N, K), alike: the bytes after the image axis over its K rows."""
        shape = self._features.shape
        return round(self._features.dtype.itemsize * int(np.prod(shape[1:])) / self.num_local)

    def _read_rows_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Images start..stop-1 into `out` (n, count, 5 + D); straight from HDF5, without an
        intermediate array, where no conversion is needed."""
        if out.dtype == self._features.dtype:
            self._features.read_direct(out, np.s_[start:stop, : out.shape[1]])
        else:
            out[...] = self._read_rows(start, stop, out.shape[1])

    def _read_rows(self, start: int, stop: int, count: int) -> np.ndarray:
        """Images start..stop-1, first `count` rows each, as (n, count, 5 + D) numbers."""
        return self._features[start:stop, :count]

    def close(self) -> None:
        super().close()
        self._file.close()


def _open_checked(path: Path, allow_external_sources: bool, build: Callable[[h5py.File], T]) -> T:
    """`build` applied to the HDF5 file at `path`, once its data sources passed the check; the
    file is closed again if anything fails, so that no handle outlives an error."""
    try:
        file = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file") from None
    try:
        with _readable(path):
            _check_sources(path, file, allow_external_sources)
            return build(file)
    except BaseException:
        file.close()
        raise


def _check_layout(path: Path, file: h5py.File, allow_binarised: bool = False) -> None:
    """Refuse files that would be misread, naming what is wrong."""
    version = file.attrs.get("format")
    if isinstance(version, str) and version.startswith(FORMAT_PREFIX) and version != FORMAT:
        raise InputError(f"{path}: written by another elvis-cli version ({version}, this one "
                         f"reads {FORMAT}; the metadata columns differ): extract it again")
    if "features" not in file:
        raise InputError(f"{path}: no 'features' dataset (not a descriptor file)")
    features = file["features"]
    if features.dtype.names is not None:
        if not allow_binarised:
            raise InputError(f"{path}: binarised descriptors: open with released.open_local")
    elif features.ndim != 3 or features.shape[2] <= NUM_META:
        raise InputError(f"{path}: 'features' has shape {features.shape}, expected (N, K, 5 + D)")
    elif features.shape[1] < 1:
        raise InputError(f"{path}: 'features' holds no descriptor rows per image")
    if file.attrs.get("format") == FORMAT:
        missing = [name for name in SHARD_DATASETS if name not in file]
        missing += [key for key in ("backbone", "root") if key not in file.attrs]
        if missing:
            raise InputError(f"{path}: incomplete features file, missing {', '.join(missing)}")
    if file.attrs.get("format") == FORMAT:
        count = features.shape[0]
        shapes = {name: file[name].shape for name in dataset_names(file)}
        pooled = [shape for name, shape in shapes.items() if name.startswith(POOLED_PREFIX)]
        if any(shape[:1] != (count,) for shape in shapes.values()) or (
            len(shapes["global"]) != 2 or shapes["sizes"] != (count, 2)
            or any(shape != shapes["global"] for shape in pooled)
        ):
            raise InputError(f"{path}: datasets disagree on their shapes: {shapes}")


def _check_sources(path: Path, file: h5py.File, allow_external: bool) -> None:
    """Every other file the data comes from: inside the folder (unless allowed) and intact."""
    folder = path.parent.resolve()
    records = json.loads(file.attrs.get("shards", "{}"))
    if not isinstance(records, dict):
        raise InputError(f"{path}: its 'shards' attribute is not a JSON object")
    for name in (*SHARD_DATASETS, *(n for n in file if n.startswith(POOLED_PREFIX))):
        link = file.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            sources = [link.filename]
        elif name in file:
            dataset = file[name]
            sources = [entry[0] for entry in dataset.external or []]
            if dataset.is_virtual:
                sources += [source.file_name for source in dataset.virtual_sources()]
        else:
            continue
        for source in sorted(set(sources) - {"."}):
            _check_source(path, folder, Path(os.fsdecode(source)), records, allow_external)


def _check_source(
    path: Path, folder: Path, source: Path, records: dict[str, Any], allow_external: bool
) -> None:
    location = (path.parent / source).resolve()
    if not allow_external and not location.is_relative_to(folder):
        raise InputError(
            f"{path}: refers to {source}, outside its folder {folder}; "
            "open it with --allow-external-sources if you trust it"
        )
    if not location.is_file():
        raise InputError(f"{path}: missing shard {path.parent / source}")
    record = records.get(source.as_posix())
    damage = record and file_damage(location, record, checksum=False)
    if damage:
        raise InputError(f"{path}: shard {path.parent / source} is {damage}; "
                         "re-run the extraction to re-create it")


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """h5py's own errors on a damaged or hostile file become one InputError naming it."""
    try:
        yield
    except HDF5_ERRORS as error:
        raise InputError(f"{path}: unreadable features file ({error})") from None
