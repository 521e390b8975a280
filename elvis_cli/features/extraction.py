"""Images -> descriptors -> sharded features file, resumable and tolerant of bad images.

The image list is split into fixed-size shards in its planned order. `FILE.h5.shards/manifest.json`
records the backbone settings, every shard's images (and crop boxes), whether it is finished and
which of its images failed with what reason, and each finished shard's size and checksum. A
re-run skips finished shards that still match their checksum and redoes the rest, so a run
killed at any moment (even SIGKILL) or stopped by a full disk resumes where it stopped; a run
with other settings or images is refused rather than mixed in. One process at a time writes an
output (lock.py). Failed images are left out of their shard and reported in the manifest and
in the returned ExtractReport; they never stop the run. With `decode_truncated` (benchmark
images, whose ground truth needs every one) a truncated image is decoded as far as it goes, as
the authors' extraction does, and reported as a warning instead.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elvis_cli.backbones import DEFAULT_BACKBONE, Backbone, ImageFeatures, create_backbone
from elvis_cli.backbones.base import CLASS_GLOBAL
from elvis_cli.features.images import Box, ImageError, collect_images, decode_image
from elvis_cli.features.layout import FORMAT, NUM_META, shard_path, shards_dir
from elvis_cli.features.writer import finalize, shard_damage, write_shard
from elvis_cli.util.atomic import write_text_atomic
from elvis_cli.util.batching import batches_by_shape
from elvis_cli.util.devices import resolve_device
from elvis_cli.util.errors import DiskFullError, InputError
from elvis_cli.util.lock import exclusive_lock
from elvis_cli.util.ordered import in_order
from elvis_cli.util.progress import ProgressCallback, track

MANIFEST_NAME = "manifest.json"
LOCK_NAME = "lock"
MAX_PENDING_BATCHES = 4  # decoded images waiting for a same-shape batch, in batches


@dataclass
class ExtractConfig:
    backbone: str = DEFAULT_BACKBONE
    backbone_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    batch_size: int = 16
    shard_size: int = 256  # images per shard: the unit of resumption
    # global descriptors stored: "cls" (always; the one shortlists use) and, for the ViTs, the
    # authors' "w-avg" and "og-avg"
    global_types: Sequence[str] = (CLASS_GLOBAL,)
    # decode truncated images as far as they go, with a warning, instead of skipping them
    decode_truncated: bool = False

    def __post_init__(self) -> None:
        self.global_types = [CLASS_GLOBAL,
                             *dict.fromkeys(t for t in self.global_types if t != CLASS_GLOBAL)]


@dataclass
class ExtractReport:
    output: Path
    num_images: int
    num_extracted: int
    num_resumed: int  # images found in shards finished by an earlier run
    failures: list[tuple[str, str]]  # (path relative to root, reason)
    repaired: list[str] = field(default_factory=list)  # finished shards found damaged, redone
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, what): images used


@dataclass
class _Item:
    path: Path
    name: str  # path relative to the root, as stored
    box: Box | None


@dataclass
class _Decoded:
    item: _Item
    tensor: torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)
    image_id: str = ""
    error: str = ""
    warning: str = ""


def extract_features(
    source: str | Path | Sequence[str | Path],
    output: str | Path,
    config: ExtractConfig | None = None,
    boxes: Sequence[Box | None] | None = None,
    progress: ProgressCallback | None = None,
    backbone: Backbone | None = None,
    root: str | Path | None = None,
) -> ExtractReport:
    """Extract descriptors of every image of `source` into `output` (FILE.h5 + FILE.h5.shards).

    `source` is anything collect_images accepts, or an explicit list of paths (stored relative to
    `root`, by default their common folder). `boxes` optionally crops each image (query crops).
    `backbone` overrides config.backbone/backbone_options with a ready-made instance.
    `progress` hears the images of the shards still to do ("extracting"), one by one.
    """
    config = config or ExtractConfig()
    if config.batch_size < 1 or config.shard_size < 1:
        raise InputError("batch_size and shard_size must be at least 1")
    root_dir, paths = _resolve_source(source, root)
    if boxes is not None and len(boxes) != len(paths):
        raise InputError(f"{len(boxes)} crop boxes given for {len(paths)} images")
    items = [
        _Item(path, _stored_name(path, root_dir), _box(boxes, index))
        for index, path in enumerate(paths)
    ]
    output = Path(output)
    if output.exists() and not _manifest_path(output).exists():
        raise InputError(f"{output} already exists: use a new output or delete it")
    if backbone is None:
        backbone = create_backbone(config.backbone, **config.backbone_options)
    missing = [kind for kind in config.global_types if kind not in backbone.global_types]
    if missing:
        raise InputError(f"backbone {backbone.name!r} has no {missing[0]} global descriptor; "
                         f"it has {', '.join(backbone.global_types)}")
    with exclusive_lock(shards_dir(output) / LOCK_NAME, str(output)):
        _remove_partial_files(output)
        try:
            return _run(output, items, root_dir, backbone, config, progress)
        except DiskFullError as error:
            raise DiskFullError(f"{error}; free some space and re-run the same command: "
                                "finished shards are kept") from None


def _run(
    output: Path,
    items: list[_Item],
    root_dir: Path,
    backbone: Backbone,
    config: ExtractConfig,
    progress: ProgressCallback | None,
) -> ExtractReport:
    """The extraction proper, under the output's lock."""
    manifest = _plan(output, items, backbone, root_dir, config)
    device = resolve_device(config.device)
    backbone = backbone.to(device).eval()
    damage = {i: _damage(output, i, shard) for i, shard in enumerate(manifest["shards"])}
    todo = [i for i, reason in damage.items() if reason]
    repaired = [
        f"{shard_path(output, i).name} {damage[i]}"
        for i in todo
        if manifest["shards"][i]["done"]
    ]
    num_todo = sum(len(manifest["shards"][i]["images"]) for i in todo)
    extracted = 0
    advance = track(progress, "extracting", num_todo)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for index in todo:
            shard = manifest["shards"][index]
            shard_items = items[shard["start"] : shard["start"] + len(shard["images"])]
            failures, warnings, record = _extract_shard(
                backbone,
                shard_items,
                output,
                index,
                device,
                config,
                pool,
                advance,
            )
            shard.update(done=True, failures=failures, warnings=warnings, **record)
            extracted += len(shard_items) - len(failures)
            _save_manifest(output, manifest)
    if todo or not output.exists():
        shards = [shard_path(output, i) for i in range(len(manifest["shards"]))]
        finalize(output, shards, manifest["backbone"], root_dir)
    failures = [tuple(f) for shard in manifest["shards"] for f in shard["failures"]]
    warnings = [tuple(w) for shard in manifest["shards"] for w in shard.get("warnings", [])]
    resumed = sum(
        len(shard["images"]) - len(shard["failures"])
        for i, shard in enumerate(manifest["shards"])
        if i not in todo
    )
    return ExtractReport(output, len(items), extracted, resumed, failures, repaired, warnings)


def _resolve_source(
    source: str | Path | Sequence[str | Path], root: str | Path | None
) -> tuple[Path, list[Path]]:
    if isinstance(source, (str, Path)):
        found_root, paths = collect_images(source)
        return Path(root) if root is not None else found_root, paths
    paths = [Path(p) for p in source]
    if not paths:
        raise InputError("no images given")
    if root is None:
        root = os.path.commonpath([p.absolute().parent for p in paths])
    return Path(root), paths


def _stored_name(path: Path, root: Path) -> str:
    """The path relative to root, as UTF-8 text: bytes that are not UTF-8 (a Latin-1 file name)
    are written as backslash escapes, since HDF5 strings must be valid UTF-8."""
    relative = Path(os.path.relpath(path, root)).as_posix()
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


def _box(boxes: Sequence[Box | None] | None, index: int) -> Box | None:
    if boxes is None or boxes[index] is None:
        return None
    return tuple(float(v) for v in boxes[index])  # type: ignore[return-value]


def _manifest_path(output: Path) -> Path:
    return shards_dir(output) / MANIFEST_NAME


def _save_manifest(output: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(_manifest_path(output), json.dumps(manifest, indent=1))


def _remove_partial_files(output: Path) -> None:
    """Temporary files of a killed run: never complete, and ours to delete under the lock."""
    for partial in [
        *shards_dir(output).glob(".*.tmp"),
        *output.parent.glob(f".{glob.escape(output.name)}.*.tmp"),
    ]:
        partial.unlink(missing_ok=True)


def _plan(
    output: Path, items: list[_Item], backbone: Backbone, root: Path, config: ExtractConfig
) -> dict[str, Any]:
    """The shard plan, fresh or from an earlier compatible run (which it must match exactly)."""
    settings = json.loads(json.dumps(backbone.settings()))
    shard_size = config.shard_size
    shards = [
        {
            "start": start,
            "images": [item.name for item in items[start : start + shard_size]],
            "boxes": [item.box and list(item.box) for item in items[start : start + shard_size]],
            "done": False,
            "failures": [],
        }
        for start in range(0, len(items), shard_size)
    ]
    root_name = str(root.resolve())
    planned = {"format": FORMAT, "backbone": settings, "globals": list(config.global_types),
               "root": root_name, "shards": shards}
    manifest_file = _manifest_path(output)
    if not manifest_file.exists():
        _save_manifest(output, planned)
        return planned
    try:
        existing = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{manifest_file}: unreadable manifest; delete {output}.shards") from None
    if existing.get("format") != FORMAT:
        difference = f"file format ({existing.get('format')}, now {FORMAT})"
    elif existing.get("backbone") != settings:
        difference = "backbone settings"
    elif existing.get("globals") != planned["globals"]:
        difference = "global descriptor types"
    elif [_layout(s) for s in existing.get("shards", [])] != [_layout(s) for s in shards]:
        difference = "image list or crop boxes"
    else:
        return existing
    raise InputError(
        f"{output} was started with different {difference}: "
        "use a new output or delete the old one (and its .shards folder)"
    )


def _layout(shard: dict[str, Any]) -> tuple[Any, ...]:
    return shard.get("start"), shard.get("images"), shard.get("boxes")


def _damage(output: Path, index: int, shard: dict[str, Any]) -> str | None:
    """Why a shard must be (re-)extracted: not done yet, or no longer what was written."""
    if not shard["done"]:
        return "not done"
    return shard_damage(shard_path(output, index), shard)


def _decode(item: _Item, backbone: Backbone, decode_truncated: bool) -> _Decoded:
    """Runs in a worker thread: read, hash, decode and preprocess one image (a crop scaled
    like its full image, as the authors do)."""
    try:
        image_id = hashlib.sha1(item.path.read_bytes()).hexdigest()[:16]
        image = decode_image(item.path, item.box, accept_truncated=decode_truncated)
    except ImageError as error:
        return _Decoded(item, error=error.reason)
    except OSError as error:
        return _Decoded(item, error=f"cannot read ({error.strerror or error})")
    size = (image.pixels.shape[1], image.pixels.shape[0])
    return _Decoded(item, backbone.preprocess(image.pixels, image.full_side), size, image_id,
                    warning=image.warning)


@torch.inference_mode()
def _encode(backbone: Backbone, batch: torch.Tensor) -> ImageFeatures:
    """The backbone's output for a batch; on CPU image by image, so that an image's descriptors
    are the same bits whatever batch it shares (convolutions and GEMMs of another batch size
    can take other kernels, which round differently on some CPUs). Batching pays on GPUs."""
    if batch.device.type != "cpu" or len(batch) == 1:
        return backbone(batch)
    return ImageFeatures.concatenate([backbone(image[None]) for image in batch])


def _extract_shard(
    backbone: Backbone,
    items: list[_Item],
    output: Path,
    index: int,
    device: torch.device,
    config: ExtractConfig,
    pool: ThreadPoolExecutor,
    advance: Callable[[], None],
) -> tuple[list[list[str]], list[list[str]], dict[str, Any]]:
    """Encode one shard's images and write it; returns its failures and warnings as
    [name, reason] pairs and the written shard's record.

    Images whose preprocessed tensors have the same shape share batches (batches_by_shape).
    Odd shapes wait for company only while few images are pending (MAX_PENDING_BATCHES), which
    bounds memory; results are put back in planned order before writing.
    """
    batch_size = config.batch_size
    results: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    decoded: dict[int, _Decoded] = {}
    failures: list[list[str]] = []
    warnings: list[list[str]] = []

    def run(positions: list[int]) -> None:
        batch = torch.stack([decoded[p].tensor for p in positions]).to(device)  # type: ignore[misc]
        features = _encode(backbone, batch)
        rows = torch.cat([features.metadata, features.local_desc], dim=-1).cpu().numpy()
        globals_ = {kind: (features.global_desc if kind == CLASS_GLOBAL
                           else features.pooled[kind]).cpu().numpy()
                    for kind in config.global_types}
        for offset, position in enumerate(positions):
            results[position] = (rows[offset], {k: v[offset] for k, v in globals_.items()})
            decoded[position].tensor = None  # free the pixels early
            advance()

    def decodable() -> Iterator[int]:
        """Positions of the decoded images, decoded ahead in the pool (at most two batches'
        images held); failures are recorded and skipped."""
        decoding = (functools.partial(_decode, item, backbone, config.decode_truncated)
                    for item in items)
        for position, item in enumerate(in_order(decoding, pool, 2 * batch_size)):
            decoded[position] = item
            if item.tensor is None:
                failures.append([item.item.name, item.error])
                advance()
                continue
            if item.warning:
                warnings.append([item.item.name, item.warning])
            yield position

    for positions in batches_by_shape(decodable(), lambda p: tuple(decoded[p].tensor.shape),
                                      batch_size, MAX_PENDING_BATCHES * batch_size):
        run(positions)

    kept = sorted(results)
    local_shape = (0, backbone.num_local, NUM_META + backbone.local_dim)
    globals_ = {
        kind: np.stack([results[p][1][kind] for p in kept]) if kept
        else np.zeros((0, backbone.global_dim))
        for kind in config.global_types
    }
    record = write_shard(
        shard_path(output, index),
        np.stack([results[p][0] for p in kept]) if kept else np.zeros(local_shape, np.float32),
        globals_.pop(CLASS_GLOBAL),
        [decoded[p].item.name for p in kept],
        [decoded[p].image_id for p in kept],
        np.array([decoded[p].size for p in kept], dtype=np.int32).reshape(-1, 2),
        pooled=globals_,
    )
    return failures, warnings, record
