"""Which gallery images some query's head holds, and their rows in a file of only those.

The authors' +1M galleries keep local descriptors only for the union of every query's top h
(find_unique_shortlist), in order of first appearance, rank-major: rank 0 of every query,
then rank 1, ... A 3-row nn file (ELVIS_SPEC §4) maps each listed image to its row in such a
file, or to its own index when it has none. Both directions live here: released.py rebuilds
h from a released file, shortlisted.py writes one.
"""

from __future__ import annotations

import numpy as np


def first_appearance(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images of the lists `indices` (Q, K) in order of first appearance, rank-major, and
    the position of each in the rank-major list; -1 pads are left out."""
    rank_major = indices.T.reshape(-1)
    images, first = np.unique(rank_major, return_index=True)
    keep = images >= 0
    images, first = images[keep], first[keep]
    order = np.argsort(first, kind="stable")
    return images[order], first[order]


def head_images(indices: np.ndarray, head: int) -> np.ndarray:
    """The gallery images in the top `head` of some list, in a shortlisted-only file's row
    order."""
    held, first_seen = first_appearance(indices)
    return held[:np.searchsorted(first_seen, head * indices.shape[0])]


def head_file_rows(indices: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Each entry's row in the file holding `held`, or its own index when it has none (-1 pads
    stay -1)."""
    valid = indices >= 0
    row_of = np.arange(max(int(indices.max(initial=-1)) + 1, 1), dtype=np.int64)  # own index,
    row_of[held] = np.arange(len(held))  # but the held images' rows (+1M lists are long)
    return np.where(valid, row_of[np.where(valid, indices, 0)], indices)
