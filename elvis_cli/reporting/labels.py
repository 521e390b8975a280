"""Ground truth on a results page: each (query, gallery image) pair of a re-ranking output as
positive, negative or junk under one protocol of the benchmark the run was made on.

Results name images by path and benchmarks by their own lists, so both are compared as the
file each names: a path as it opens from the current folder, or, where it does not exist (the
authors' released descriptors keep bare image names), under the benchmark's image folder, an
image suffix dropped where the benchmark's names have none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from elvis_cli.evaluation.datasets import RetrievalDataset
from elvis_cli.evaluation.metrics import protocol_junk, protocols_of
from elvis_cli.features.images import IMAGE_SUFFIXES
from elvis_cli.util.errors import InputError

POSITIVE, NEGATIVE, JUNK, UNLABELLED = "positive", "negative", "junk", "unlabelled"
# revisitop sets are coloured by the Medium protocol (easy and hard views are positives),
# every other kind of ground truth by its only one, ok/junk
PROTOCOL_NAMES = {"medium": "Medium protocol: easy and hard views are positives",
                  "ok": "ok/junk ground truth"}


@dataclass(frozen=True)
class GroundTruthLabels:
    """Positives and junk of each query of a results file, by image key (`image_key`)."""

    dataset: str
    protocol: str  # a key of PROTOCOL_NAMES
    positives: dict[str, frozenset[str]]  # query key -> gallery keys
    junk: dict[str, frozenset[str]]
    gallery: frozenset[str]  # every gallery image the ground truth knows
    root: Path  # where bare names resolve

    @property
    def description(self) -> str:
        return f"{self.dataset}, {PROTOCOL_NAMES[self.protocol]}"

    def label(self, query_path: str, gallery_path: str) -> str:
        query, image = image_key(query_path, self.root), image_key(gallery_path, self.root)
        if image in self.positives[query]:
            return POSITIVE
        if image in self.junk[query]:
            return JUNK
        return NEGATIVE if image in self.gallery else UNLABELLED


def image_key(path: str | Path, root: Path) -> str:
    """The file an image name points to, as an absolute path without its image suffix."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = root / path
    if path.suffix.lower() in IMAGE_SUFFIXES:
        path = path.with_suffix("")
    return os.path.abspath(path)


def ground_truth_labels(dataset: RetrievalDataset, query_paths: Iterable[str]
                        ) -> GroundTruthLabels:
    """The labels of `dataset` for the queries of a results file; InputError for a query the
    ground truth does not have (the results were made on other images)."""
    root = dataset.image_root
    protocol = protocols_of(dataset.ground_truth_kind)[0]  # revisitop: medium
    gallery = [image_key(path, root) for path in dataset.gallery_paths()]
    by_query = {image_key(path, root): entry
                for path, entry in zip(dataset.query_paths(), dataset.ground_truth, strict=True)}
    positives, junk = {}, {}
    for query in dict.fromkeys(query_paths):
        key = image_key(query, root)
        if key not in by_query:
            raise InputError(f"query {query} of the results is not a query of {dataset.name}'s "
                             f"ground truth in {dataset.root}: were the results made on "
                             f"{dataset.name}'s queries?")
        positive, junky = protocol_junk(by_query[key], protocol)
        positives[key] = frozenset(gallery[index] for index in positive)
        junk[key] = frozenset(gallery[index] for index in junky)
    return GroundTruthLabels(dataset.name, protocol, positives, junk, frozenset(gallery), root)
