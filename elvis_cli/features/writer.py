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

from elvis_cli.backbones.base import CLASS_GLOBAL
from elvis_cli.features.layout import FORMAT, NUM_META, POOLED_PREFIX, dataset_names
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
        names = dataset_names(file)
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
