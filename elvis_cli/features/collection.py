"""What an extracted collection holds, and what a run must do to bring it up to date.

`FILE.h5.shards/manifest.json` records the backbone settings and every shard: its images (name
relative to the root, crop box, file size and modification time at listing), whether it is
finished, which images failed with what reason, and the finished file's size and checksum.
A run lists its images and matches each to a row of a finished shard by name, box, size and
modification time: a match is kept as it is; an image no finished shard holds (new, or whose
file changed) goes into new shards of the current shard size; rows no image matches any more
are left out of the joined file (a shard none of whose images is left is deleted). A shard
that is unfinished, or finished but damaged, is (re-)extracted under its own number with its
images that are still listed. The joined file lists the images in listing order, exactly as a
fresh extraction would: which shard holds a row never shows.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elvis_cli.features.images import Box
from elvis_cli.features.layout import FORMAT, manifest_path, shard_files, shard_path
from elvis_cli.features.writer import file_damage
from elvis_cli.util.atomic import write_text_atomic
from elvis_cli.util.errors import InputError

Stat = list[int] | None  # [size, modification time in ns] of an image file; None: unreadable


@dataclass
class Item:
    """One image of a run's listing."""

    path: Path
    name: str  # path relative to the root, as stored
    box: Box | None
    stat: Stat


@dataclass
class Plan:
    """A run's plan: the manifest to work through, the shards to (re-)extract and where each
    listed image is."""

    manifest: dict[str, Any]
    todo: dict[int, list[Item]]  # position in manifest["shards"] -> its images, in order
    placement: list[tuple[int, int]]  # per listed image: (shard position, image position)
    repaired: list[str] = field(default_factory=list)  # "shard-NNNNN.h5 <damage>"
    num_removed: int = 0  # images of the joined file no longer listed


def stat_of(path: Path) -> Stat:
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def load_manifest(output: Path) -> dict[str, Any] | None:
    """The manifest of `output`, or None when no extraction was started there."""
    path = manifest_path(output)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{path}: unreadable manifest; start over with --force") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise InputError(f"{path}: not a manifest of elvis extract; start over with --force")
    return manifest


def save_manifest(output: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(manifest_path(output), json.dumps(manifest, indent=1))


def check_compatible(output: Path, manifest: dict[str, Any], header: dict[str, Any]) -> None:
    """Refuse to mix descriptors of other settings into `output`, naming what differs."""
    if manifest.get("format") != header["format"]:
        difference = f"file format ({manifest.get('format')}, now {header['format']})"
    elif manifest.get("backbone") != header["backbone"]:
        difference = f"backbone settings ({_changes(manifest.get('backbone'), header['backbone'])})"
    elif manifest.get("globals") != header["globals"]:
        difference = (f"global descriptor types ({', '.join(manifest.get('globals') or [])}, "
                      f"now {', '.join(header['globals'])})")
    else:
        return
    raise InputError(f"{output} was extracted with other {difference}: use a new output, or "
                     "--force to start over")


def _changes(before: Any, now: dict[str, Any]) -> str:
    """`key: old -> new` for each setting that differs."""
    before = before if isinstance(before, dict) else {}
    keys = sorted(set(before) | set(now), key=str)
    return "; ".join(f"{key}: {before.get(key, '-')} -> {now.get(key, '-')}"
                     for key in keys if before.get(key) != now.get(key))


def header(settings: dict[str, Any], global_types: list[str], root: Path) -> dict[str, Any]:
    """The manifest's fields besides the shards: what every shard was extracted with."""
    return {"format": FORMAT, "backbone": settings, "globals": list(global_types),
            "root": str(root.resolve())}


def plan(output: Path, manifest: dict[str, Any] | None, top: dict[str, Any], items: list[Item],
         shard_size: int) -> Plan:
    """Match the listing to the shards of `manifest` (None: nothing extracted yet) and plan
    the rest; every finished shard that still holds a listed image is checked against its
    checksum."""
    old = manifest["shards"] if manifest else []
    listed: dict[int, list[tuple[int, int]]] = {}  # old shard -> [(image position, listing)]
    for at, match in enumerate(_match(old, items)):
        if match is not None:
            listed.setdefault(match[0], []).append((match[1], at))
    names = {(item.name, _box_key(item.box)) for item in items}
    shards: list[dict[str, Any]] = []
    placement: list[tuple[int, int] | None] = [None] * len(items)
    todo: dict[int, list[Item]] = {}
    repaired: list[str] = []
    removed = 0
    for number, shard in enumerate(old):
        mine = sorted(listed.get(number, []))
        unlisted = set(range(len(shard["images"]))) - {position for position, _ in mine}
        done = shard.get("done", False)
        removed += _removed(shard, unlisted, names) if done else 0
        if not mine:
            continue  # no image left: the shard goes once the joined file no longer maps it
        index = shard.get("index", number)
        damage = file_damage(shard_path(output, index), shard) if done else "not done"
        if damage is None:  # kept as it is
            stats = _stats(shard)
            for position, at in mine:
                stats[position] = items[at].stat
                placement[at] = (len(shards), position)
            shard.pop("start", None)  # of manifests that planned shards by listing position
            shard.update(index=index, stats=stats, dropped=sorted(unlisted))
            shards.append(shard)
            continue
        if done:
            repaired.append(f"{shard_path(output, index).name} {damage}")
        for position, (_, at) in enumerate(mine):
            placement[at] = (len(shards), position)
        todo[len(shards)] = [items[at] for _, at in mine]
        shards.append(_planned(index, todo[len(shards)]))
    next_index = max([manifest.get("next_shard", len(old)) if manifest else 0,
                      *(shard["index"] + 1 for shard in shards)])
    new = [at for at, place in enumerate(placement) if place is None]
    for start in range(0, len(new), shard_size):
        for position, at in enumerate(new[start : start + shard_size]):
            placement[at] = (len(shards), position)
        todo[len(shards)] = [items[at] for at in new[start : start + shard_size]]
        shards.append(_planned(next_index, todo[len(shards)]))
        next_index += 1
    manifest = {**(manifest or {}), **top, "next_shard": next_index, "shards": shards}
    return Plan(manifest, todo, placement, repaired, removed)  # type: ignore[arg-type]


def _removed(shard: dict[str, Any], unlisted: set[int], names: set[tuple[str, Any]]) -> int:
    """Images of a finished shard that were in the joined file and whose name the listing no
    longer has (a changed file is extracted again, not removed)."""
    rows = _written(shard)[0]
    return sum((shard["images"][position], _box_key(shard["boxes"][position])) not in names
               for position in unlisted - set(shard.get("dropped", [])) if position in rows)


_UNKNOWN = "unknown"  # the file of an image recorded by a version that kept no sizes and times


def _stats(shard: dict[str, Any]) -> list[Any]:
    return list(shard.get("stats") or [_UNKNOWN] * len(shard["images"]))


def _box_key(box: Any) -> tuple[float, ...] | None:
    return None if box is None else tuple(box)


def _match(shards: list[dict[str, Any]], items: list[Item]) -> list[tuple[int, int] | None]:
    """Per listed image, the (shard, image position) that holds it as its file is now, or None:
    same name, box, size and modification time. An image listed twice takes two entries."""
    holders: dict[tuple[str, Any], list[tuple[int, int, Any]]] = {}
    for number, shard in enumerate(shards):
        for position, (name, box, stat) in enumerate(
                zip(shard["images"], shard["boxes"], _stats(shard), strict=True)):
            holders.setdefault((name, _box_key(box)), []).append((number, position, stat))
    matched: list[tuple[int, int] | None] = []
    for item in items:
        candidates = holders.get((item.name, _box_key(item.box)), [])
        found = next((i for i, (_, _, stat) in enumerate(candidates)
                      if stat in (_UNKNOWN, item.stat)), None)
        matched.append(None if found is None else candidates.pop(found)[:2])
    return matched


def _planned(index: int, items: list[Item]) -> dict[str, Any]:
    """A shard to extract: these images, under this number."""
    return {"index": index, "images": [item.name for item in items],
            "boxes": [item.box and list(item.box) for item in items],
            "stats": [item.stat for item in items], "done": False, "failures": []}


@dataclass
class Outcome:
    """What the collection holds once every shard is done."""

    rows: list[tuple[int, int]]  # per image of the joined file: (shard position, row)
    failures: list[tuple[str, str]]  # (name, reason) of the listed images that failed
    warnings: list[tuple[str, str]]  # (name, what) of the listed images used with a warning


def outcome(manifest: dict[str, Any], placement: list[tuple[int, int]]) -> Outcome:
    """The joined file's rows in listing order, and the failures and warnings of the listed
    images (those of images no longer listed are forgotten)."""
    written = [_written(shard) for shard in manifest["shards"]]
    result = Outcome([], [], [])
    for number, position in placement:
        shard = manifest["shards"][number]
        name = shard["images"][position]
        rows, failed, warned = written[number]
        if position in failed:
            result.failures.append((name, failed[position]))
            continue
        result.rows.append((number, rows[position]))
        if position in warned:
            result.warnings.append((name, warned[position]))
    return result


def _written(shard: dict[str, Any]) -> tuple[dict[int, int], dict[int, str], dict[int, str]]:
    """A finished shard's image positions -> rows, -> failure reasons, -> warnings."""
    names = shard["images"]
    failed = _by_position(shard["failures"], names, range(len(names)))
    kept = [position for position in range(len(names)) if position not in failed]
    warned = _by_position(shard.get("warnings", []), names, kept)
    return {position: row for row, position in enumerate(kept)}, failed, warned


def _by_position(entries: list[list[Any]], names: list[str], positions: Any) -> dict[int, str]:
    """Image position -> text of failure or warning entries, each [name, text, position] or,
    as earlier versions wrote them, [name, text]; both come in image order."""
    queue = deque(entries)
    found: dict[int, str] = {}
    for position in positions:
        if queue and (queue[0][2] == position if len(queue[0]) > 2
                      else queue[0][0] == names[position]):
            found[position] = queue.popleft()[1]
    return found


def stale_shards(output: Path, manifest: dict[str, Any]) -> list[Path]:
    """Shard files of `output` its manifest no longer lists (all their images gone, or left by
    a killed run): deleted once the joined file is rebuilt without them."""
    kept = {shard_path(output, shard["index"]) for shard in manifest["shards"]}
    return [path for path in shard_files(output) if path not in kept]


def joined_is_current(output: Path, manifest: dict[str, Any], layout: str) -> bool:
    """Whether `output` is the joined file of exactly `layout`, intact (checksum)."""
    joined = manifest.get("joined")
    return (isinstance(joined, dict) and joined.get("layout") == layout
            and file_damage(output, joined) is None)
