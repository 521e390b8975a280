"""Descriptor files: sharded HDF5 joined by a virtual dataset, readable like the official files.

`FILE.h5` is a small file of HDF5 virtual datasets over `FILE.h5.shards/shard-NNNNN.h5`. Shards
are written one at a time (so extraction can stop and resume) and the joined file is built last.
The `features` dataset uses exactly the official layout (ELVIS_SPEC §3, §4): per image K rows of
row centre, column centre, scale index, padding flag, weight, then the D descriptor values. So
one reader serves our files and the released `*_local.hdf5` files, which hold `features` only.
`global` holds the "cls" global descriptor; `global_<type>` the others that were asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from elvis_cli.backbones.base import CLASS_GLOBAL, META_PADDING, NUM_META
from elvis_cli.util.atomic import atomic_path
from elvis_cli.util.errors import InputError

T = TypeVar("T")

# 2: metadata columns 0 and 1 are the row, then column centre (version 1 had x, y), and
# optional `global_<type>` datasets. Files of another version are refused, not misread.
FORMAT = "elvis-cli-features/2"
FORMAT_PREFIX = "elvis-cli-features/"
SHARD_DATASETS = ("features", "global", "paths", "ids", "sizes")
POOLED_PREFIX = "global_"
STRING_DTYPE = h5py.string_dtype("utf-8")
# what h5py raises on files it cannot make sense of (damaged, hand-made, hostile)
HDF5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError)


def shards_dir(path: str | Path) -> Path:
    return Path(f"{path}.shards")


def shard_path(path: str | Path, index: int) -> Path:
    return shards_dir(path) / f"shard-{index:05d}.h5"


def write_shard(
    target: Path,
    features: np.ndarray,
    global_desc: np.ndarray,
    paths: Sequence[str],
    ids: Sequence[str],
    sizes: np.ndarray,
    pooled: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write one shard atomically. features (n, K, 5 + D), global_desc (n, Dg) the "cls" global
    descriptor, sizes (n, 2), pooled: further global descriptors by type, (n, Dg) each.

    An empty shard (n = 0, every image failed) is valid: it keeps K, D and Dg in its shapes.
    Returns its shard_record, to be kept and compared with later (shard_damage).
    """
    count = len(paths)
    pooled = pooled or {}
    if not (len(features) == len(global_desc) == len(ids) == len(sizes) == count) or any(
        len(values) != count for values in pooled.values()
    ):
        raise ValueError("shard arrays disagree on the number of images")
    with new_hdf5(target) as file:
        file.create_dataset("features", data=np.asarray(features, dtype=np.float16))
        file.create_dataset("global", data=np.asarray(global_desc, dtype=np.float32))
        for kind, values in pooled.items():
            file.create_dataset(POOLED_PREFIX + kind, data=np.asarray(values, dtype=np.float32))
        file.create_dataset("paths", data=list(paths), dtype=STRING_DTYPE, shape=(count,))
        file.create_dataset("ids", data=list(ids), dtype=STRING_DTYPE, shape=(count,))
        file.create_dataset("sizes", data=np.asarray(sizes, dtype=np.int32).reshape(count, 2))
    return shard_record(target)


@contextmanager
def new_hdf5(target: Path) -> Iterator[h5py.File]:
    """An HDF5 file built in memory, then written atomically as plain bytes.

    HDF5 itself must never meet a full disk: it crashes (SIGSEGV) while cleaning up after the
    failed write. Plain Python writes raise ENOSPC cleanly, which atomic_path reports.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        yield file
    with atomic_path(target) as temporary:
        temporary.write_bytes(buffer.getbuffer())


def shard_record(shard: Path) -> dict[str, Any]:
    """Size and SHA-256 of a finished shard: what a later run checks before trusting it."""
    digest = hashlib.sha256()
    with open(shard, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": shard.stat().st_size, "sha256": digest.hexdigest()}


def shard_damage(shard: Path, record: dict[str, Any], checksum: bool = True) -> str | None:
    """Why `shard` no longer matches its record (missing, truncated, altered), or None.

    Without `checksum` only the size is compared: a stat, cheap enough for every open.
    """
    if not shard.is_file():
        return "missing"
    size = shard.stat().st_size
    if size != record.get("bytes"):
        return f"damaged ({size} bytes, {record.get('bytes')} expected)"
    if checksum and shard_record(shard)["sha256"] != record.get("sha256"):
        return "damaged (checksum mismatch)"
    return None


def shard_length(shard: Path) -> int:
    with h5py.File(shard, "r") as file:
        return len(file["paths"])


def finalize(
    path: str | Path, shards: Sequence[Path], settings: dict[str, Any], root: Path
) -> None:
    """Build the joined top-level file over finished shards, atomically.

    Virtual sources use paths relative to the joined file, so FILE.h5 and FILE.h5.shards can be
    moved together. Zero-image shards contribute nothing. Each shard's size and checksum are
    kept in the `shards` attribute, so a truncated shard is named on open instead of being read
    as zeros (HDF5 fills unreadable virtual sources silently).
    """
    path = Path(path)
    if not shards:
        raise ValueError("finalize needs at least one shard")
    with h5py.File(shards[0], "r") as file:
        names = _dataset_names(file)
    infos = []
    for shard in shards:
        with h5py.File(shard, "r") as file:
            infos.append({name: (file[name].shape, file[name].dtype) for name in names})
    total = sum(info["paths"][0][0] for info in infos)
    first = infos[0]
    records = {os.path.relpath(shard, path.parent): shard_record(shard) for shard in shards}
    with new_hdf5(path) as file:
        for name in names:
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
                "global_types": json.dumps(
                    [CLASS_GLOBAL] + [n.removeprefix(POOLED_PREFIX) for n in names
                                      if n.startswith(POOLED_PREFIX)]),
                "shards": json.dumps(records, sort_keys=True),
            }
        )


class FeatureStore:
    """Read access to a features file: ours, or an official `features`-only local file."""

    binarised = False  # subclasses that decode packed bits accept the structured layout

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._file = file
        features = file["features"]
        self._features = features
        self.num_images, self.num_local, width = features.shape
        self.local_dim = width - NUM_META
        ours = file.attrs.get("format") == FORMAT
        # global descriptors by type ("cls" first): ours hold them, official local files do
        # not, but the authors' files beside them may (add_global)
        self._globals: dict[str, h5py.Dataset] = {CLASS_GLOBAL: file["global"], **{
            n.removeprefix(POOLED_PREFIX): file[n] for n in _dataset_names(file)
            if n.startswith(POOLED_PREFIX)}} if ours else {}
        self._global_files: list[h5py.File] = []
        if ours:
            self.paths: list[str] = list(file["paths"].asstr()[()])
            self.ids: list[str] = list(file["ids"].asstr()[()])
            self.sizes: np.ndarray | None = file["sizes"][()]
            self.backbone_settings: dict[str, Any] | None = json.loads(file.attrs["backbone"])
            self.root: Path | None = Path(file.attrs["root"])
            if not isinstance(self.backbone_settings, dict):
                raise InputError(f"{path}: backbone settings are not a JSON object")
        else:
            self.paths = [str(index) for index in range(self.num_images)]
            self.ids = list(self.paths)
            self.sizes = None
            self.backbone_settings = None
            self.root = None

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
        files, the shards' checksums (the joined file is rewritten when extraction resumes),
        for others its size and modification time."""
        if self._file.attrs.get("format") == FORMAT:
            return {"file": str(self.path.resolve()), "shards": self._file.attrs["shards"]}
        stat = self.path.stat()
        return {"file": str(self.path.resolve()), "bytes": stat.st_size,
                "modified": stat.st_mtime_ns}

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
        with _readable(self.path):
            values = np.asarray(dataset[()], dtype=np.float32)
        self.raise_if_not_finite(~np.isfinite(values).all(axis=1), np.arange(len(values)),
                                 "global" if kind == CLASS_GLOBAL else f"{kind} global")
        return values

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
        self._file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
        shapes = {name: file[name].shape for name in _dataset_names(file)}
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
    damage = record and shard_damage(location, record, checksum=False)
    if damage:
        raise InputError(f"{path}: shard {path.parent / source} is {damage}; "
                         "re-run the extraction to re-create it")


def _dataset_names(file: h5py.File) -> list[str]:
    """The datasets of our shard or joined file: the fixed ones, then each extra global type."""
    return [*SHARD_DATASETS, *sorted(n for n in file if n.startswith(POOLED_PREFIX))]


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """h5py's own errors on a damaged or hostile file become one InputError naming it."""
    try:
        yield
    except HDF5_ERRORS as error:
        raise InputError(f"{path}: unreadable features file ({error})") from None
