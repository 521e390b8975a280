"""Benchmark evaluation: cached extraction, global ranking, ELViS re-ranking at several
shortlist sizes, metrics by the dataset's own rules, and runtime per query.

Each shortlist size is re-ranked from scratch and timed on its own, so the runtime curve
measures what a user would pay for that size (feature reads included).
"""

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from elvis_cli.atomic import atomic_path, write_text_atomic
from elvis_cli.backbones import DEFAULT_BACKBONE, create_backbone
from elvis_cli.checkpoints import (
    Checkpoint,
    Fusion,
    check_compatible,
    default_checkpoint_for,
    load_checkpoint,
)
from elvis_cli.datasets import RetrievalDataset
from elvis_cli.errors import InputError
from elvis_cli.extract import ExtractConfig, extract_features
from elvis_cli.feature_store import FeatureStore
from elvis_cli.metrics import EVAL_PROTOCOLS, map_at_k, protocol_junk, recall_at_k, revisitop_map
from elvis_cli.released import open_released
from elvis_cli.rerank import PairScorer, RerankConfig, fuse_and_sort
from elvis_cli.shortlist import build_shortlist


@dataclass
class EvaluateConfig:
    backbone: str = DEFAULT_BACKBONE
    backbone_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # None: the checkpoint that matches the backbone
    shortlists: Sequence[int] = (0, 25, 50, 100)  # 0 = global ranking only
    lam: float | None = None  # None: the checkpoint's own fusion
    temperature: float | None = None
    num_local: int | None = 600
    batch_size: int = 100
    device: str = "auto"
    features_dir: Path | None = None  # None: <dataset>/features/
    descriptors: str | None = None  # released files of this name instead of extraction

    def __post_init__(self) -> None:
        if not self.shortlists or any(size < 0 for size in self.shortlists):
            raise InputError("shortlist sizes must be zero (global only) or positive")
        self.shortlists = sorted(set(self.shortlists))


@dataclass
class DatasetResult:
    dataset: str
    protocol: str
    rows: list[dict[str, Any]]  # one per shortlist size: metrics by name and seconds_per_query


def evaluate_dataset(
    dataset: RetrievalDataset,
    config: EvaluateConfig,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> DatasetResult:
    """Evaluate one dataset; `on_stage` hears a short label as each stage starts."""
    stage = on_stage or (lambda _label: None)
    stage(f"{dataset.name}: features")
    if config.descriptors:
        queries, gallery, ranking = open_released(dataset.root, config.descriptors,
                                                  len(dataset.gallery))
    else:
        queries, gallery = extract_dataset(dataset, config, progress)
        ranking = None
    with queries, gallery:
        if checkpoint is None:
            checkpoint = load_checkpoint(
                config.checkpoint or default_checkpoint_for(gallery.backbone_settings)
            )
        check_compatible(checkpoint, gallery.backbone_settings, gallery.local_dim)
        fusion = Fusion(
            checkpoint.fusion.lam if config.lam is None else config.lam,
            checkpoint.fusion.temperature if config.temperature is None else config.temperature,
        )
        stage(f"{dataset.name}: global ranking")
        if ranking is None:
            ranking = build_shortlist(
                queries.global_descriptors(), gallery.global_descriptors(), gallery.num_images
            )
        protocols = EVAL_PROTOCOLS[dataset.protocol]
        lists = {name: _junk_last(ranking.indices, ranking.similarities, dataset, name)
                 for name in protocols}
        scorer = PairScorer(checkpoint.model, queries, gallery, RerankConfig(
            num_local=config.num_local, batch_size=config.batch_size, device=config.device))
        rows = []
        for size in config.shortlists:
            stage(f"{dataset.name}: shortlist {size}")
            started = time.perf_counter()
            rankings = _rerank_protocols(scorer, lists, size, fusion)
            seconds = (time.perf_counter() - started) / max(len(dataset.queries), 1)
            metrics = score_rankings(dataset, rankings)
            rows.append({"dataset": dataset.name, "protocol": "/".join(protocols),
                         "shortlist": size, **metrics, "seconds_per_query": seconds,
                         "lam": fusion.lam, "temperature": fusion.temperature,
                         "checkpoint": checkpoint.name})
    return DatasetResult(dataset.name, "/".join(protocols), rows)


def extract_dataset(
    dataset: RetrievalDataset, config: EvaluateConfig, progress: bool = True
) -> tuple[FeatureStore, FeatureStore]:
    """Query (cropped) and gallery features, extracted once per backbone and reused."""
    backbone = create_backbone(config.backbone, **config.backbone_options)
    folder = (config.features_dir or dataset.root / "features") / _settings_key(backbone.settings())
    extract_config = ExtractConfig(backbone=config.backbone,
                                   backbone_options=dict(config.backbone_options),
                                   device=config.device)
    stores = []
    for split, paths, boxes in (
        ("query", dataset.query_paths(), dataset.query_boxes()),
        ("gallery", dataset.gallery_paths(), None),
    ):
        output = folder / f"{split}.h5"
        report = extract_features(paths, output, extract_config, boxes=boxes, progress=progress,
                                  backbone=backbone, root=dataset.root / "jpg")
        if report.failures:
            path, reason = report.failures[0]
            raise InputError(
                f"{dataset.name}: {len(report.failures)} {split} image(s) could not be read, "
                f"first {path}: {reason}; the ground truth needs every image"
            )
        stores.append(FeatureStore.open(output))
    return stores[0], stores[1]


def _settings_key(settings: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings.get('name', 'backbone')}-{digest}"


def _junk_last(indices: np.ndarray, similarities: np.ndarray, dataset: RetrievalDataset,
               protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """Move each query's junk for `protocol` to the end, keeping order (ELVIS_SPEC §5)."""
    if protocol == "ok":  # the spec moves junk only for the revisitop protocols
        return indices, similarities
    order = np.empty_like(indices)
    for query, entry in enumerate(dataset.ground_truth):
        positives, junk = protocol_junk(entry, protocol)
        is_junk = np.isin(indices[query], np.setdiff1d(junk, positives))
        order[query] = np.concatenate([np.flatnonzero(~is_junk), np.flatnonzero(is_junk)])
    return (np.take_along_axis(indices, order, axis=1),
            np.take_along_axis(similarities, order, axis=1))


def _rerank_protocols(scorer: PairScorer, lists: dict[str, tuple[np.ndarray, np.ndarray]],
                      size: int, fusion: Fusion) -> dict[str, np.ndarray]:
    """Final ranking per protocol; pairs shared by the protocols are scored once."""
    if size == 0:
        return {name: indices for name, (indices, _) in lists.items()}
    heads = np.concatenate([indices[:, :size] for indices, _ in lists.values()], axis=1)
    pairs = _unique_rows(heads)
    raw_pairs = scorer.score(pairs)
    rankings = {}
    for name, (indices, similarities) in lists.items():
        raw = _lookup(pairs, raw_pairs, indices[:, :size])
        full_raw = np.full(indices.shape, np.nan, dtype=np.float32)
        full_raw[:, :size] = raw
        rankings[name] = fuse_and_sort(indices, similarities, full_raw, size, fusion).indices
    return rankings


def _unique_rows(heads: np.ndarray) -> np.ndarray:
    """Per row, the sorted distinct non-negative entries, padded with -1 to a common width."""
    rows = [np.unique(row[row >= 0]) for row in heads]
    width = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _lookup(pairs: np.ndarray, raw_pairs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    out = np.full(wanted.shape, np.nan, dtype=np.float32)
    for query, row in enumerate(wanted):
        valid = pairs[query] >= 0
        keys = pairs[query][valid]
        where = np.searchsorted(keys, row)
        found = (row >= 0) & (where < len(keys))
        found[found] &= keys[where[found]] == row[found]
        out[query, found] = raw_pairs[query][valid][where[found]]
    return out


def score_rankings(dataset: RetrievalDataset, rankings: dict[str, np.ndarray]) -> dict[str, float]:
    """Every metric of the dataset's protocol, by name (ELVIS_SPEC §6)."""
    gnd = dataset.ground_truth
    if dataset.protocol == "revisitop":
        medium = revisitop_map(rankings["medium"], gnd, "medium")["map"]
        hard = revisitop_map(rankings["hard"], gnd, "hard")["map"]
        positives, junk = zip(*(protocol_junk(entry, "medium") for entry in gnd), strict=True)
        return {"map_medium": medium, "map_hard": hard, "map": (medium + hard) / 2,
                "recall@1": recall_at_k(rankings["medium"], positives, 1, junk),
                "recall@5": recall_at_k(rankings["medium"], positives, 5, junk)}
    positives, junk = zip(*(protocol_junk(entry, "ok") for entry in gnd), strict=True)
    ranking = rankings["ok"]
    return {"map@100": map_at_k(ranking, positives, junk, 100)["map"],
            "map": map_at_k(ranking, positives, junk, None)["map"],
            "recall@1": recall_at_k(ranking, positives, 1, junk),
            "recall@5": recall_at_k(ranking, positives, 5, junk)}


def results_table(results: Sequence[DatasetResult]) -> pd.DataFrame:
    return pd.DataFrame([row for result in results for row in result.rows])


def write_results(table: pd.DataFrame, json_path: Path | None, csv_path: Path | None) -> None:
    """JSON (a list of rows) and CSV with every metric by name, each written atomically."""
    if json_path is not None:
        write_text_atomic(json_path, table.to_json(orient="records", indent=2))
    if csv_path is not None:
        write_text_atomic(csv_path, table.to_csv(index=False))


def plot_runtime(table: pd.DataFrame, path: Path) -> None:
    """Seconds per query and mAP against shortlist size, one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (runtime_axis, map_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in table.groupby("dataset"):
        rows = rows.sort_values("shortlist")
        runtime_axis.plot(rows["shortlist"], rows["seconds_per_query"], marker="o", label=name)
        map_axis.plot(rows["shortlist"], rows["map"], marker="o", label=name)
    runtime_axis.set(xlabel="shortlist size", ylabel="seconds per query",
                     title="re-ranking runtime")
    map_axis.set(xlabel="shortlist size (0 = global only)", ylabel="mAP", title="accuracy")
    for axis in (runtime_axis, map_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
