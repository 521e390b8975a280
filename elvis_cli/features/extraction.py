"""Images -> descriptors -> sharded features file: resumable, growable, tolerant of bad images.

The images are extracted in shards (`ExtractConfig.shard_size` images each), each written
atomically and recorded in `FILE.h5.shards/manifest.json` with its size and checksum
(collection.py). Re-running on the same source brings the output up to date and extracts only
what is missing: shards a killed run (even SIGKILL) or a full disk left unfinished, finished
shards that no longer match their checksum, and images the source gained or whose file changed
(new shards, of the current shard size). Finished shards are never rewritten: images removed
from the source are left out of the joined file, which lists the images in listing order,
exactly as a fresh extraction would. Other backbone settings, global types or file format are
refused rather than mixed in, unless `force` starts over. One process at a time writes an
output (lock.py). Failed images are left out of their shard and reported in the manifest and
in the returned ExtractReport; they never stop the run. With `decode_truncated` (benchmark
images, whose ground truth needs every one) a truncated image is decoded as far as it goes, as
the authors' extraction does, and reported as a warning instead. With a RayExecutor the shards
to do are Ray tasks (ray_extraction.py), written by the same code.
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
from typing import TYPE_CHECKING, Any

import numpy as np

from elvis_cli.backbones import DEFAULT_BACKBONE, check_backbone_name, create_backbone
from elvis_cli.features import collection
from elvis_cli.features.collection import Item
from elvis_cli.features.images import Box, ImageError, collect_images, decode_image
from elvis_cli.features.layout import (
    CLASS_GLOBAL,
    FEATURES_SUFFIXES,
    NUM_META,
    lock_path,
    manifest_path,
    shard_files,
    shard_path,
    shards_dir,
)
from elvis_cli.features.writer import finalize, joined_layout, write_shard
from elvis_cli.util.atomic import writable_output
from elvis_cli.util.batching import batches_by_shape
from elvis_cli.util.devices import resolve_device
from elvis_cli.util.errors import DiskFullError, InputError
from elvis_cli.util.lock import exclusive_lock
from elvis_cli.util.ordered import in_order
from elvis_cli.util.progress import ProgressCallback, track

if TYPE_CHECKING:
    import torch

    from elvis_cli.backbones import Backbone, ImageFeatures
    from elvis_cli.backbones.base import Inputs
    from elvis_cli.util.ray_cluster import RayExecutor

MAX_PENDING_BATCHES = 4  # decoded images waiting for a same-shape batch, in batches
# a shard's failures and warnings ([name, reason, position] each) and its file's record
ShardOutcome = tuple[list[list[Any]], list[list[Any]], dict[str, Any]]


@dataclass
class ExtractConfig:
    backbone: str = DEFAULT_BACKBONE
    backbone_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    batch_size: int = 16
    shard_size: int = 256  # images per new shard: the unit of resumption
    # global descriptors stored: "cls" (always; the one shortlists use) and, for the ViTs, the
    # authors' "w-avg" and "og-avg"
    global_types: Sequence[str] = (CLASS_GLOBAL,)
    # decode truncated images as far as they go, with a warning, instead of skipping them
    decode_truncated: bool = False

    def __post_init__(self) -> None:
        check_backbone_name(self.backbone)
        self.global_types = [CLASS_GLOBAL,
                             *dict.fromkeys(t for t in self.global_types if t != CLASS_GLOBAL)]


@dataclass
class ExtractReport:
    output: Path
    num_images: int
    num_extracted: int  # images extracted by this run (new, changed or in damaged shards)
    num_resumed: int  # images kept from shards finished by an earlier run
    failures: list[tuple[str, str]]  # (path relative to root, reason) of listed images
    repaired: list[str] = field(default_factory=list)  # finished shards found damaged, redone
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, what): images used
    num_removed: int = 0  # images of the joined file no longer in the source, left out now


@dataclass
class _Decoded:
    item: Item
    inputs: Inputs | None = None  # the backbone's preprocess output
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
    force: bool = False,
    executor: RayExecutor | None = None,
) -> ExtractReport:
    """Extract descriptors of every image of `source` into `output` (FILE.h5 + FILE.h5.shards),
    or bring an earlier extraction of it up to date (see the module's notes).

    `source` is anything collect_images accepts: a folder, a .txt list, a glob, or a list of
    these or of image paths (stored relative to `root`, by default their common folder).
    Row i of the joined file is the i-th image of the listing (failed ones left out), however
    the collection grew or shrank. `boxes` optionally crops each image (query crops).
    `backbone` overrides config.backbone/backbone_options with a ready-made instance.
    `force` starts over: the old output and its shards are deleted first.
    `progress` hears the images of the shards still to do ("extracting"), one by one (on Ray,
    a shard's at a time). `executor` extracts the shards as tasks on a Ray cluster
    (ray_extraction.py), writing the same files.
    """
    config = config or ExtractConfig()
    output = writable_output(output, FEATURES_SUFFIXES)
    if config.batch_size < 1 or config.shard_size < 1:
        raise InputError("batch_size and shard_size must be at least 1")
    root_dir, paths = collect_images(source)
    root_dir = Path(root) if root is not None else root_dir
    if boxes is not None and len(boxes) != len(paths):
        raise InputError(f"{len(boxes)} crop boxes given for {len(paths)} images")
    if executor is not None:
        from elvis_cli.util.ray_cluster import check_cluster

        check_cluster(executor)  # before any work: nothing planned or written for a bad --ray
    if not force and output.exists() and not manifest_path(output).exists():
        raise InputError(f"{output} already exists and is no output of elvis extract: use a new "
                         "output, or --force to replace it")
    if backbone is None:
        backbone = create_backbone(config.backbone, **config.backbone_options)
    missing = [kind for kind in config.global_types if kind not in backbone.global_types]
    if missing:
        raise InputError(f"backbone {backbone.name!r} has no {missing[0]} global descriptor; "
                         f"it has {', '.join(backbone.global_types)}")
    with exclusive_lock(lock_path(output), str(output)):
        if force:
            _remove_extraction(output)
        _remove_partial_files(output)
        items = [Item(path, _stored_name(path, root_dir), _box(boxes, index),
                      collection.stat_of(path)) for index, path in enumerate(paths)]
        try:
            return _run(output, items, root_dir, backbone, config, progress, executor)
        except DiskFullError as error:
            raise DiskFullError(f"{error}; free some space and re-run the same command: "
                                "finished shards are kept") from None


def _run(
    output: Path,
    items: list[Item],
    root_dir: Path,
    backbone: Backbone,
    config: ExtractConfig,
    progress: ProgressCallback | None,
    executor: RayExecutor | None,
) -> ExtractReport:
    """The extraction proper, under the output's lock."""
    settings = json.loads(json.dumps(backbone.settings()))
    top = collection.header(settings, list(config.global_types), root_dir)
    manifest = collection.load_manifest(output)
    if manifest is not None:
        collection.check_compatible(output, manifest, top)
    plan = collection.plan(output, manifest, top, items, config.shard_size)
    manifest = plan.manifest
    collection.save_manifest(output, manifest)
    advance = track(progress, "extracting", sum(map(len, plan.todo.values())))

    def finished(number: int, outcome: ShardOutcome) -> None:
        failures, warnings, record = outcome
        manifest["shards"][number].update(done=True, failures=failures, warnings=warnings,
                                          **record)
        collection.save_manifest(output, manifest)

    todo = [(number, shard_items, shard_path(output, manifest["shards"][number]["index"]))
            for number, shard_items in sorted(plan.todo.items())]
    if executor is None:
        device = resolve_device(config.device)
        backbone = backbone.to(device).eval()
        with _decoding_pool() as pool:
            for number, shard_items, target in todo:
                finished(number, extract_shard(backbone, shard_items, target, device, config,
                                               pool, advance))
    else:
        _extract_on_ray(executor, backbone, config, todo, finished, advance)
        _remove_partial_files(output)  # of workers killed while writing
    done = collection.outcome(manifest, plan.placement)
    _join(output, manifest, done.rows, root_dir)
    for stale in collection.stale_shards(output, manifest):
        stale.unlink()
    extracted = sum(number in plan.todo for number, _ in done.rows)
    return ExtractReport(output, len(items), extracted, len(done.rows) - extracted,
                         done.failures, plan.repaired, done.warnings, plan.num_removed)


def _extract_on_ray(executor: RayExecutor, backbone: Backbone, config: ExtractConfig,
                    todo: list[tuple[int, list[Item], Path]],
                    finished: Callable[[int, ShardOutcome], None], advance: Callable[[], None]
                    ) -> None:
    from elvis_cli.features.ray_extraction import ShardTask, extract_shards_on_ray

    def done(shard: ShardTask, outcome: ShardOutcome) -> None:
        finished(shard.number, outcome)
        for _ in shard.items:
            advance()

    extract_shards_on_ray(executor, backbone, config, [ShardTask(*shard) for shard in todo],
                          done)


def _decoding_pool() -> ThreadPoolExecutor:
    """Threads that read and decode images ahead of the backbone."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def _join(output: Path, manifest: dict[str, Any], rows: list[tuple[int, int]], root: Path
          ) -> None:
    """Build the joined file over the manifest's shards, unless the one there already maps
    exactly these rows and is intact; its record goes into the manifest."""
    shards = [shard_path(output, shard["index"]) for shard in manifest["shards"]]
    records = [{"bytes": shard["bytes"], "sha256": shard["sha256"]}
               for shard in manifest["shards"]]
    layout = joined_layout(output, shards, records, rows, root)
    if not collection.joined_is_current(output, manifest, layout):
        record = finalize(output, shards, manifest["backbone"], root, rows, records)
        manifest["joined"] = {"layout": layout, **record}
        collection.save_manifest(output, manifest)


def _stored_name(path: Path, root: Path) -> str:
    """The path relative to root, as UTF-8 text: bytes that are not UTF-8 (a Latin-1 file name)
    are written as backslash escapes, since HDF5 strings must be valid UTF-8."""
    relative = Path(os.path.relpath(path, root)).as_posix()
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


def _box(boxes: Sequence[Box | None] | None, index: int) -> Box | None:
    if boxes is None or boxes[index] is None:
        return None
    return tuple(float(v) for v in boxes[index])  # type: ignore[return-value]


def _remove_partial_files(output: Path) -> None:
    """Temporary files of a killed run: never complete, and ours to delete under the lock."""
    for partial in [
        *shards_dir(output).glob(".*.tmp"),
        *output.parent.glob(f".{glob.escape(output.name)}.*.tmp"),
    ]:
        partial.unlink(missing_ok=True)


def _remove_extraction(output: Path) -> None:
    """What an earlier extraction wrote for `output`, to start over (under the lock, which
    stays): the joined file, the manifest and the shards. Other files are left alone."""
    for path in [output, manifest_path(output), *shard_files(output)]:
        path.unlink(missing_ok=True)


def _decode(item: Item, backbone: Backbone, decode_truncated: bool) -> _Decoded:
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


def _encode(backbone: Backbone, inputs: list[Inputs], device: torch.device) -> ImageFeatures:
    """The backbone's output for a batch; on CPU image by image, so that an image's descriptors
    are the same bits whatever batch it shares (convolutions and GEMMs of another batch size
    can take other kernels, which round differently on some CPUs). Batching pays on GPUs."""
    import torch

    from elvis_cli.backbones import ImageFeatures
    from elvis_cli.backbones.base import batch_inputs

    with torch.inference_mode():
        if device.type != "cpu" or len(inputs) == 1:
            return backbone(batch_inputs(inputs, device))
        return ImageFeatures.concatenate([backbone(batch_inputs([one], device))
                                          for one in inputs])


def extract_shard(
    backbone: Backbone,
    items: list[Item],
    target: Path,
    device: torch.device,
    config: ExtractConfig,
    pool: ThreadPoolExecutor | None = None,
    advance: Callable[[], None] = lambda: None,
) -> ShardOutcome:
    """Encode one shard's images and write it to `target`; returns its failures and warnings
    as [name, reason, position] and the written shard's record. `pool` decodes the images
    (None: threads of its own); `advance` hears each image done.

    Images whose preprocessed inputs have the same shapes share batches (batches_by_shape).
    Odd shapes wait for company only while few images are pending (MAX_PENDING_BATCHES), which
    bounds memory; results are put back in planned order before writing.
    """
    import torch

    from elvis_cli.backbones.base import input_shape

    if pool is None:
        with _decoding_pool() as own:
            return extract_shard(backbone, items, target, device, config, own, advance)
    batch_size = config.batch_size
    results: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    decoded: dict[int, _Decoded] = {}
    failures: list[list[Any]] = []
    warnings: list[list[Any]] = []

    def run(positions: list[int]) -> None:
        features = _encode(backbone, [decoded[p].inputs for p in positions], device)
        rows = torch.cat([features.metadata, features.local_desc], dim=-1).cpu().numpy()
        globals_ = {kind: (features.global_desc if kind == CLASS_GLOBAL
                           else features.pooled[kind]).cpu().numpy()
                    for kind in config.global_types}
        for offset, position in enumerate(positions):
            results[position] = (rows[offset], {k: v[offset] for k, v in globals_.items()})
            decoded[position].inputs = None  # free the pixels early
            advance()

    def decodable() -> Iterator[int]:
        """Positions of the decoded images, decoded ahead in the pool (at most two batches'
        images held); failures are recorded and skipped."""
        decoding = (functools.partial(_decode, item, backbone, config.decode_truncated)
                    for item in items)
        for position, item in enumerate(in_order(decoding, pool, 2 * batch_size)):
            decoded[position] = item
            if item.inputs is None:
                failures.append([item.item.name, item.error, position])
                advance()
                continue
            if item.warning:
                warnings.append([item.item.name, item.warning, position])
            yield position

    for positions in batches_by_shape(decodable(), lambda p: input_shape(decoded[p].inputs),
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
        target,
        np.stack([results[p][0] for p in kept]) if kept else np.zeros(local_shape, np.float32),
        globals_.pop(CLASS_GLOBAL),
        [decoded[p].item.name for p in kept],
        [decoded[p].image_id for p in kept],
        np.array([decoded[p].size for p in kept], dtype=np.int32).reshape(-1, 2),
        pooled=globals_,
    )
    return failures, warnings, record
