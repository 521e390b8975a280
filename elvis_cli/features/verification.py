"""`elvis verify`: every byte of a features file checked against the records made when it was
written.

Opening a features file compares only each shard's size with its record (a stat, cheap enough
for every open), so flipped bytes inside a shard's data go unnoticed there. This reads every
shard whole and compares its SHA-256 with the record the joined file keeps (attribute
`shards`), checks the joined file itself against the manifest's record of it, and then that
each file opens and holds the datasets and rows the joined file maps. A file is opened by HDF5
only once its checksum matched: libhdf5 can crash on damaged metadata. A file without records
(the authors' released files) has no checksums to compare; it is opened and its layout checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from elvis_cli.features.layout import dataset_names, manifest_path, shard_path, shards_dir
from elvis_cli.features.store import HDF5_ERRORS, FeatureStore
from elvis_cli.features.writer import file_damage
from elvis_cli.util.errors import InputError

OK = "ok"


@dataclass
class ShardCheck:
    """One shard: `state` is "ok", "missing", "damaged (...)" or "unreadable (...)"."""

    name: str  # as the joined file names it: relative to the joined file's folder
    state: str
    images: int  # rows of the joined file it holds

    @property
    def ok(self) -> bool:
        return self.state == OK


@dataclass
class VerificationReport:
    """What `verify_features` found: each shard, and problems of the joined file itself."""

    path: Path
    shards: list[ShardCheck]
    problems: list[str] = field(default_factory=list)
    has_records: bool = True  # False: no checksums were kept (not written by elvis extract)
    num_images: int = 0
    hint: str = ""  # what to do about the damage, when there is some

    @property
    def ok(self) -> bool:
        return not self.problems and all(shard.ok for shard in self.shards)

    @property
    def summary(self) -> str:
        if not self.ok:
            bad = [shard for shard in self.shards if not shard.ok]
            names = ", ".join(Path(shard.name).name for shard in bad)
            found = [f"{len(bad)} of {len(self.shards)} shards damaged or missing ({names})"
                     ] if bad else []
            found += self.problems + ([self.hint] if self.hint else [])
            return f"{self.path}: {'; '.join(found)}"
        if not self.has_records:
            return (f"{self.path}: no shard checksums recorded (not written by elvis extract), "
                    f"so nothing to compare byte by byte; it opens and holds {self.num_images} "
                    "images")
        return f"{self.path}: all {len(self.shards)} shards ok, {self.num_images} images"


def verify_features(path: str | Path) -> VerificationReport:
    """Check a features file and every shard it maps against their sizes and SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: features file not found")
    manifest = _manifest(path)
    report = VerificationReport(path, [], hint=(
        "re-run the same `elvis extract` command: it re-extracts damaged shards and rebuilds "
        "the joined file" if manifest is not None else
        f"no extraction record ({manifest_path(path).name}) beside it to repair from: extract "
        "again with --force"))
    joined = (manifest or {}).get("joined")
    damage = file_damage(path, joined) if isinstance(joined, dict) else None
    if damage:  # not to be opened: its own records are the manifest's
        report.problems.append(f"{path.name} {damage}")
        records = {os.path.relpath(shard_path(path, shard["index"]), path.parent): shard
                   for shard in manifest["shards"] if shard.get("done")}  # type: ignore[index]
        mapped: dict[str, tuple[int, int]] = {}
        names: list[str] = []
    else:
        records, mapped, names = _joined(path)
        report.has_records = bool(records)
        report.hint = report.hint if records else ""  # nothing of ours to repair
        joins = [name for name in records if (path.parent / name).parent != shards_dir(path)]
        if manifest is None and records and len(joins) == len(records):  # `elvis join`'s
            report.hint = (f"a join of {' and '.join(sorted(joins))}: repair those (`elvis "
                           "verify` each), then run the same `elvis join` command again")
        report.problems += [f"{name}: mapped, but no checksum recorded"
                            for name in sorted(set(mapped) - set(records)) if records]
    report.shards = [_check_shard(path, name, record, mapped, names)
                     for name, record in sorted(records.items())]
    if report.ok:
        opener = FeatureStore.open
        if not report.has_records:  # the authors' files may be binarised (imports torch)
            from elvis_cli.features.released import open_local as opener
        try:
            with opener(path) as store:
                report.num_images = store.num_images
        except InputError as error:
            report.problems.append(str(error).removeprefix(f"{path}: "))
    return report


def _manifest(path: Path) -> dict[str, Any] | None:
    """The extraction's manifest beside `path`, if there is a readable one."""
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "shards" in manifest else None


def _joined(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, int]], list[str]]:
    """The joined file's shard records, the rows it maps from each file, and its datasets
    (every shard must hold them); anything HDF5 cannot read is an InputError naming it."""
    try:
        file = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file") from None
    try:
        with file:
            records = json.loads(file.attrs.get("shards", "{}"))
            if not isinstance(records, dict):
                raise ValueError("its 'shards' attribute is not a JSON object")
            return records, _mapped_rows(file), dataset_names(file) if records else []
    except HDF5_ERRORS as error:
        raise InputError(f"{path}: unreadable features file ({error})") from None


def _mapped_rows(file: h5py.File) -> dict[str, tuple[int, int]]:
    """Per file the `features` dataset maps rows from: (rows mapped, highest row + 1)."""
    features = file.get("features")
    if not isinstance(features, h5py.Dataset) or not features.is_virtual:
        return {}
    mapped: dict[str, tuple[int, int]] = {}
    for source in features.virtual_sources():
        (first, *_), (last, *_) = source.src_space.get_select_bounds()
        count, end = mapped.get(source.file_name, (0, 0))
        mapped[source.file_name] = (count + last - first + 1, max(end, last + 1))
    return mapped


def _check_shard(path: Path, name: str, record: dict[str, Any],
                 mapped: dict[str, tuple[int, int]], names: list[str]) -> ShardCheck:
    """One shard against its record (size and SHA-256), then, if intact, its contents: the
    joined file's datasets, of one length, holding every row the joined file maps."""
    images, end = mapped.get(name, (0, 0))
    location = path.parent / name
    damage = file_damage(location, record)
    if damage:
        return ShardCheck(name, damage, images)
    try:
        with h5py.File(location, "r") as shard:
            missing = [dataset for dataset in names if dataset not in shard]
            lengths = {len(shard[dataset]) for dataset in names if dataset in shard}
    except HDF5_ERRORS as error:
        return ShardCheck(name, f"unreadable ({error})", images)
    if missing:
        return ShardCheck(name, f"unreadable (no {', '.join(missing)})", images)
    if len(lengths) > 1 or (lengths and end > min(lengths)):
        return ShardCheck(name, f"unreadable ({sorted(lengths)} rows, {end} mapped)", images)
    return ShardCheck(name, OK, images)
