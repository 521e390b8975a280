"""Matching and non-matching pairs of a labelled set: a benchmark's features file, as `elvis
evaluate` keeps it (`<dataset>/features/<settings>/query.h5` and `gallery.h5`, the ground
truth `<dataset>/gnd_<name>.pkl` or another layout of evaluation/datasets.py).

Each query gives its positives nearest by global similarity and as many of its nearest
non-matching images (neither positive nor junk): the pairs a re-ranker has to tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elvis_cli.features.store import FeatureStore
from elvis_cli.util.errors import InputError

QUERY_FILES = ("query.h5", "query-crops.h5")
GALLERY_FILE = "gallery.h5"


@dataclass
class LabelledPairs:
    dataset: str
    queries: Path  # the query features file
    gallery: Path  # the gallery features file
    matching: np.ndarray  # (P, 2) query row, gallery row of true matches
    other: np.ndarray  # (P', 2) of non-matching pairs


def labelled_files(features: str | Path) -> tuple[Path, Path, Path]:
    """(dataset folder, query file, gallery file) of a benchmark's features file."""
    features = Path(features)
    folder = features.parent
    queries = [folder / name for name in QUERY_FILES if (folder / name).is_file()]
    if features.name not in (*QUERY_FILES, GALLERY_FILE) or not queries \
            or not (folder / GALLERY_FILE).is_file() or folder.parent.name != "features":
        raise InputError(f"{features}: not a labelled set: give the features of a benchmark "
                         "as `elvis evaluate` keeps them, <dataset>/features/<settings>/"
                         "query.h5 or gallery.h5")
    query = features if features.name in QUERY_FILES else queries[0]
    return folder.parent.parent, query, folder / GALLERY_FILE


def labelled_pairs(features: str | Path, per_query: int) -> LabelledPairs:
    """Up to `per_query` matching and as many non-matching pairs per query, nearest first by
    global similarity, of the benchmark whose features file `features` is."""
    from elvis_cli.evaluation.datasets import load_dataset
    from elvis_cli.evaluation.metrics import protocol_junk, protocols_of

    root, query_file, gallery_file = labelled_files(features)
    dataset = load_dataset(root.parent, root.name)
    protocol = protocols_of(dataset.ground_truth_kind)[0]
    with FeatureStore.open(query_file) as queries, FeatureStore.open(gallery_file) as gallery:
        _check_order(gallery, [str(p.relative_to(dataset.image_root))
                               for p in dataset.gallery_paths()], gallery_file)
        if queries.num_images != len(dataset.queries):
            raise InputError(f"{query_file}: {queries.num_images} queries, but the ground "
                             f"truth of {dataset.name} has {len(dataset.queries)}")
        similarity = queries.global_descriptors() @ gallery.global_descriptors().T
    matching, other = [], []
    for query, entry in enumerate(dataset.ground_truth):
        positives, junk = protocol_junk(entry, protocol)
        order = np.argsort(-similarity[query], kind="stable")
        is_positive = np.isin(order, positives)
        negative = ~is_positive & ~np.isin(order, junk)
        found = order[is_positive][:per_query]
        matching += [(query, row) for row in found]
        other += [(query, row) for row in order[negative][:len(found)]]
    if not matching:
        raise InputError(f"{dataset.name}: no query has a positive in the ground truth")
    return LabelledPairs(dataset.name, query_file, gallery_file, np.array(matching),
                         np.array(other))


def _check_order(store: FeatureStore, names: list[str], path: Path) -> None:
    """Refuse features whose images are not the ground truth's, in its order."""
    if list(store.paths) != names:
        raise InputError(f"{path}: its images are not those of the ground truth beside it, in "
                         "its order (extracted for another dataset?)")
