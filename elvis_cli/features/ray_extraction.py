"""`elvis extract --ray`: the shards still to extract as Ray tasks (util/ray_cluster.py), one
per GPU when the cluster has GPUs, else a set number of CPU workers.

A shard is a pure function of its images, the backbone and the config, so a worker extracts it
with the code of one process (extraction.py's `extract_shard`) and writes it with the same
atomic writer; the command records each shard in the manifest as it finishes, as one process
does, so a killed command keeps the shards done and the same command again does the rest. A
worker that dies has its shard done again (Ray's retries). The backbone, weights included,
travels once through Ray's object store (the nodes need no weights of their own) and each
worker keeps it for its next shards.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elvis_cli.util.ray_cluster import RayExecutor, ray_cluster, run_tasks

if TYPE_CHECKING:
    from elvis_cli.backbones import Backbone
    from elvis_cli.features.collection import Item
    from elvis_cli.features.extraction import ExtractConfig, ShardOutcome


@dataclass(frozen=True)
class ShardTask:
    """Shard `number` of the manifest: its images and the file it is written to, at paths
    every node sees (absolute)."""

    number: int
    items: list[Item]
    target: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", [replace(item, path=item.path.absolute())
                                           for item in self.items])
        object.__setattr__(self, "target", self.target.absolute())


def extract_shards_on_ray(executor: RayExecutor, backbone: Backbone, config: ExtractConfig,
                          shards: Sequence[ShardTask],
                          done: Callable[[ShardTask, ShardOutcome], None]) -> None:
    """Extract `shards` as Ray tasks; `done` hears each shard's outcome as it finishes."""
    with ray_cluster(executor) as ray:
        run_tasks(ray, executor, _extract, (config, [ray.put(backbone.eval())]), shards, done)


_held: dict[str, Any] = {}  # this worker's backbone, by its object's id; at most one


def _extract(config: ExtractConfig, backbone: list[Any], shard: ShardTask) -> ShardOutcome:
    """A Ray task: extract `shard` and write it. `backbone` holds the backbone's object
    reference (inside a list, so that Ray hands it over unresolved: it is fetched once)."""
    import ray

    from elvis_cli.features.extraction import extract_shard
    from elvis_cli.util.devices import resolve_device

    device = resolve_device(config.device)
    key = backbone[0].hex()
    if key not in _held:
        _held.clear()
        _held[key] = ray.get(backbone[0]).to(device).eval()
    return extract_shard(_held[key], shard.items, shard.target, device, config)
