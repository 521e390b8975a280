"""Writing features files: shards one at a time, then the joined file over them.

`FILE.h5` is a small file of HDF5 virtual datasets over `FILE.h5.shards/shard-NNNNN.h5`
(layout.py). Shards are written one at a time (so extraction can stop and resume) and the
joined file is built last. Every file is built in memory and written atomically, and each
shard's size and checksum are recorded, so that a later run or reader can tell a finished
shard from a damaged one. Reading is store.py's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from elvis_cli.features.layout import (
    CLASS_GLOBAL,
    FORMAT,
    NUM_META,
    POOLED_PREFIX,
    dataset_names,
)
from elvis_cli.util.atomic import atomic_path

STRING_DTYPE = h5py.string_dtype("utf-8")


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
    Returns its file_record, to be kept and compared with later (file_damage).
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
    return file_record(target)


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


def file_record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a finished file (a shard, a joined file): what a later run or
    `verify_features` checks before trusting it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def file_damage(path: Path, record: dict[str, Any], checksum: bool = True) -> str | None:
    """Why `path` no longer matches its record (missing, truncated, altered), or None.

    Without `checksum` only the size is compared: a stat, cheap enough for every open.
    """
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"damaged ({size} bytes, {record.get('bytes')} expected)"
    if checksum and file_record(path)["sha256"] != record.get("sha256"):
        return "damaged (checksum mismatch)"
    return None


def joined_layout(path: str | Path, shards: Sequence[Path], records: Sequence[dict[str, Any]],
                  rows: Sequence[tuple[int, int]], root: Path) -> str:
    """A digest of what joined file `path` maps: its shards (by name and checksum), which of
    their rows in which order (as finalize's `rows`), and the root. A joined file whose digest
    matches needs no rebuilding, and caches keyed by a file's rows (store.py's identity) see
    every change of them."""
    what = {"shards": [[name, record.get("sha256")] for name, record
                       in zip(_sources(path, shards), records, strict=True)],
            "rows": [list(row) for row in rows], "root": str(Path(root).resolve())}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _sources(path: str | Path, shards: Sequence[Path]) -> list[str]:
    """The shards' names as the joined file `path` refers to them: relative to its folder."""
    return [os.path.relpath(shard, Path(path).parent) for shard in shards]


def finalize(
    path: str | Path, shards: Sequence[Path], settings: dict[str, Any], root: Path,
    rows: Sequence[tuple[int, int]] | None = None,
    records: Sequence[dict[str, Any]] | None = None, paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build the joined top-level file over finished shards, atomically; returns its
    file_record.

    `rows` lists the joined file's images in order, each as (position of its shard in
    `shards`, row in that shard): images removed from a collection are left out and images are
    put in any order without rewriting a shard. None: every row of every shard, in order.
    `records` are the shards' records as written (write_shard), so that they are not read
    again; None: computed here. `paths`, when given, are stored as the images' paths instead
    of mapping the shards' (sources stored relative to other roots than `root`).

    Virtual sources use paths relative to the joined file, so FILE.h5 and FILE.h5.shards can be
    moved together. Each shard's size and checksum are kept in the `shards` attribute, so a
    truncated shard is named on open instead of being read as zeros (HDF5 fills unreadable
    virtual sources silently), and `verify_features` can check every byte.
    """
    path = Path(path)
    if not shards:
        raise ValueError("finalize needs at least one shard")
    with h5py.File(shards[0], "r") as file:
        names = dataset_names(file)
    infos = []
    for shard in shards:
        with h5py.File(shard, "r") as file:
            infos.append({name: (file[name].shape, file[name].dtype) for name in names})
    if rows is None:
        rows = [(index, row) for index, info in enumerate(infos)
                for row in range(info["paths"][0][0])]
    sources = _sources(path, shards)
    records = records or [file_record(shard) for shard in shards]
    runs = _runs(rows)
    first = infos[0]
    with new_hdf5(path) as file:
        for name in names:
            shape, dtype = first[name]
            full_shape = (len(rows), *shape[1:])
            if not rows or (name == "paths" and paths is not None):
                file.create_dataset(name, shape=full_shape, dtype=dtype,
                                    data=list(paths) if name == "paths" and paths is not None
                                    else None)
                continue
            _virtual_dataset(file, name, full_shape, dtype,
                             [(start, sources[index], infos[index][name][0], row, count)
                              for start, index, row, count in runs])
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
                "shards": json.dumps(dict(zip(sources, records, strict=True)), sort_keys=True),
                "layout": joined_layout(path, shards, records, rows, root),
            }
        )
    return file_record(path)


def _virtual_dataset(file: h5py.File, name: str, shape: tuple[int, ...], dtype: np.dtype,
                     mappings: list[tuple[int, str, tuple[int, ...], int, int]]) -> None:
    """Dataset `name` of `shape` whose rows are other files' rows: each mapping puts `count`
    rows of dataset `name` (of its own shape) in file `source`, from `row` on, at `start`.
    Made with the low-level API because h5py's create_virtual_dataset stamps the creation
    time: without it, the same shards give a joined file of the same bytes."""
    properties = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    properties.set_obj_track_times(False)
    virtual = h5py.h5s.create_simple(shape)
    rest, zeros = shape[1:], (0,) * (len(shape) - 1)  # every row is taken whole
    for start, source, source_shape, row, count in mappings:
        virtual.select_hyperslab((start, *zeros), (count, *rest))
        rows = h5py.h5s.create_simple(source_shape)
        rows.select_hyperslab((row, *zeros), (count, *rest))
        properties.set_virtual(virtual, source.encode(), name.encode(), rows)
    h5py.h5d.create(file.id, name.encode(), h5py.h5t.py_create(dtype, logical=True),
                    h5py.h5s.create_simple(shape), dcpl=properties)


def _runs(rows: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(start in the joined file, shard, first row, count) of each stretch of consecutive rows
    of one shard: one virtual mapping each."""
    runs: list[tuple[int, int, int, int]] = []
    for position, (index, row) in enumerate(rows):
        if runs and runs[-1][1] == index and runs[-1][2] + runs[-1][3] == row:
            start, _, first, count = runs[-1]
            runs[-1] = (start, index, first, count + 1)
        else:
            runs.append((position, index, row, 1))
    return runs
