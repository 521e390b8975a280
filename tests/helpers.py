"""Fixtures shared by several test files (test files do not import each other)."""

from pathlib import Path

import numpy as np

from elvis_cli.features.layout import shard_path
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.writer import finalize, write_shard


def write_store(path: Path, rng: np.random.Generator, count: int, stored: int, real: list[int],
                dim: int = 48) -> FeatureStore:
    """A joined features file whose image i has real[i] descriptors, the rest padding."""
    rows = np.zeros((count, stored, 5 + dim), dtype=np.float32)
    descriptors = rng.standard_normal((count, stored, dim))
    rows[..., 5:] = descriptors / np.linalg.norm(descriptors, axis=-1, keepdims=True)
    rows[..., 5:] += 50.0 * (np.arange(stored)[None, :, None] >= np.array(real)[:, None, None])
    rows[..., 3] = np.arange(stored)[None, :] >= np.array(real)[:, None]  # padding flag
    names = [f"img{i}.jpg" for i in range(count)]
    write_shard(shard_path(path, 0), rows, np.zeros((count, 3), np.float32), names, names,
                np.ones((count, 2), np.int32))
    finalize(path, [shard_path(path, 0)], {"name": "test"}, path.parent)
    return FeatureStore.open(path)
