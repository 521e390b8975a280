"""Benchmark evaluation: features (from a pluggable source), global ranking, re-ranking by
each requested model at several shortlist sizes, metrics by the dataset's own rules, runtime
per query, and the tables and curves that summarise them across datasets.

Each shortlist size is re-ranked from scratch and timed on its own, so the runtime curve
measures what a user would pay for that size (feature reads included).
"""

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from elvis_cli.atomic import atomic_path, write_text_atomic
from elvis_cli.backbones import DEFAULT_BACKBONE, create_backbone
from elvis_cli.chamfer import Chamfer
from elvis_cli.checkpoints import (
    Checkpoint,
    Fusion,
    check_compatible,
    default_checkpoint_for,
    load_checkpoint,
)
from elvis_cli.datasets import RetrievalDataset
from elvis_cli.errors import ElvisWarning, InputError
from elvis_cli.extract import ExtractConfig, extract_features
from elvis_cli.feature_store import FORMAT, FeatureStore
from elvis_cli.metrics import EVAL_PROTOCOLS, map_at_k, protocol_junk, recall_at_k, revisitop_map
from elvis_cli.registry import PAPER_AVERAGES, PAPER_SETTING, REGISTRY
from elvis_cli.released import open_released
from elvis_cli.rerank import PairScorer, RerankConfig, fuse_and_sort
from elvis_cli.shortlist import Shortlist, build_shortlist

MODELS = ("global", "elvis", "chamfer")  # global: the global ranking alone, no re-ranking
# Chamfer has no trained fusion: its shortlist is re-sorted by the chamfer score alone.
CHAMFER_FUSION = Fusion(lam=0.0, temperature=1.0)


@dataclass
class EvaluateConfig:
    backbone: str = DEFAULT_BACKBONE
    backbone_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # None: the checkpoint that matches the backbone
    shortlists: Sequence[int] = (0, 25, 50, 100)  # 0 = global ranking only
    models: Sequence[str] = ("global", "elvis")
    lam: float | None = None  # None: the checkpoint's own fusion (ELViS only)
    temperature: float | None = None
    num_local: int | None = 600
    batch_size: int = 100
    device: str = "auto"
    features_dir: Path | None = None  # None: <dataset>/features/
    descriptors: str | None = None  # released files of this name instead of extraction
    embedding_cache: Path | None = None  # keeps ELViS embeddings between runs (EmbeddingCache)
    # queries cut to their ground-truth `bbx`, scaled like the full image: the authors' `bbox`
    # switch, off by default as in their conf/extract.yaml
    query_crops: bool = False

    def __post_init__(self) -> None:
        if not self.shortlists or any(size < 0 for size in self.shortlists):
            raise InputError("shortlist sizes must be zero (global only) or positive")
        self.shortlists = sorted(set(self.shortlists))
        unknown = [name for name in self.models if name not in MODELS]
        if unknown or not self.models:
            raise InputError(f"unknown model {unknown[0] if unknown else '(none)'!r}; "
                             f"use {', '.join(MODELS)}")
        self.models = list(dict.fromkeys(self.models))

    @property
    def rerankers(self) -> list[str]:
        return [name for name in self.models if name != "global"]

    def num_stages(self) -> int:
        """Stages per dataset, for a progress display: features, then each re-ranking run."""
        return 1 + len(self.rerankers) * sum(size > 0 for size in self.shortlists)


@dataclass
class DatasetFeatures:
    """What re-ranking needs of one dataset, wherever it came from."""

    queries: FeatureStore
    gallery: FeatureStore
    ranking: Shortlist  # each query's global ranking of the whole gallery
    seconds_per_query: float  # time of the global search
    label: str  # backbone (or released descriptor) name, matched against the paper's setting

    def __enter__(self) -> "DatasetFeatures":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.queries.close()
        if self.gallery is not self.queries:
            self.gallery.close()


# (dataset, config, progress) -> features; extraction by default, released files as another.
FeatureSource = Callable[[RetrievalDataset, EvaluateConfig, bool], DatasetFeatures]


@dataclass
class DatasetResult:
    dataset: str
    protocol: str
    rows: list[dict[str, Any]]  # one per (model, shortlist size): metrics by name and runtime


def extracted_source(dataset: RetrievalDataset, config: EvaluateConfig,
                     progress: bool = True) -> DatasetFeatures:
    """Features extracted by `config.backbone` (cached), ranked by exact global search."""
    queries, gallery = extract_dataset(dataset, config, progress)
    started = time.perf_counter()
    ranking = build_shortlist(queries.global_descriptors(), gallery.global_descriptors(),
                              gallery.num_images)
    seconds = (time.perf_counter() - started) / max(queries.num_images, 1)
    label = (gallery.backbone_settings or {}).get("name", config.backbone)
    return DatasetFeatures(queries, gallery, ranking, seconds, label)


def released_source(dataset: RetrievalDataset, config: EvaluateConfig,
                    progress: bool = True) -> DatasetFeatures:
    """The authors' released descriptor files (ELVIS_SPEC §4), ranked by their nn file."""
    if not config.descriptors:
        raise InputError("released descriptors: name them, e.g. --descriptors dinov2")
    queries, gallery, ranking = open_released(dataset.root, config.descriptors,
                                              len(dataset.gallery))
    return DatasetFeatures(queries, gallery, ranking, 0.0, config.descriptors)


def evaluate_dataset(
    dataset: RetrievalDataset,
    config: EvaluateConfig,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
    source: FeatureSource | None = None,
) -> DatasetResult:
    """Evaluate one dataset; `on_stage` hears a short label as each stage starts."""
    stage = on_stage or (lambda _label: None)
    stage(f"{dataset.name}: features and global ranking")
    protocols = EVAL_PROTOCOLS.get(dataset.protocol, ("ok",))
    source = source or (released_source if config.descriptors else extracted_source)
    with source(dataset, config, progress) as features:
        ranking = features.ranking
        lists = {name: _junk_last(ranking.indices, ranking.similarities, dataset, name)
                 for name in protocols}
        common = {"dataset": dataset.name, "protocol": "/".join(protocols),
                  "metric": _metric_name(dataset), "features": features.label}
        rows = [{**common, "model": "global", "shortlist": 0,
                 **score_rankings(dataset, {name: idx for name, (idx, _) in lists.items()}),
                 "seconds_per_query": features.seconds_per_query}]
        for model_name in config.rerankers:
            module, fusion, label = _reranker(model_name, config, features, checkpoint)
            scorer = PairScorer(module, features.queries, features.gallery, RerankConfig(
                num_local=config.num_local, batch_size=config.batch_size, device=config.device,
                embedding_cache=config.embedding_cache if model_name == "elvis" else None))
            scorer.score(ranking.indices[:1, :1])  # warm-up, so the first size is not penalised
            for size in (size for size in config.shortlists if size > 0):
                stage(f"{dataset.name}: {model_name} re-ranking, shortlist {size}")
                started = time.perf_counter()
                rankings = _rerank_protocols(scorer, lists, size, fusion)
                seconds = (time.perf_counter() - started) / max(len(dataset.queries), 1)
                rows.append({**common, "model": model_name, "shortlist": size,
                             **score_rankings(dataset, rankings), "seconds_per_query": seconds,
                             "checkpoint": label, "lam": fusion.lam,
                             "temperature": fusion.temperature,
                             "paper_map": _paper_map(dataset.name, features.label, model_name,
                                                     label)})
    return DatasetResult(dataset.name, "/".join(protocols), rows)


def _reranker(name: str, config: EvaluateConfig, features: DatasetFeatures,
              checkpoint: Checkpoint | None) -> tuple[nn.Module, Fusion, str]:
    """The scoring module PairScorer runs, its fusion with the global score, and its label."""
    if name == "chamfer":
        return Chamfer(), CHAMFER_FUSION, "chamfer"
    gallery = features.gallery
    if checkpoint is None:
        checkpoint = load_checkpoint(
            config.checkpoint or default_checkpoint_for(gallery.backbone_settings))
    check_compatible(checkpoint, gallery.backbone_settings, gallery.local_dim)
    fusion = Fusion(
        checkpoint.fusion.lam if config.lam is None else config.lam,
        checkpoint.fusion.temperature if config.temperature is None else config.temperature,
    )
    return checkpoint.model, fusion, checkpoint.name


def _paper_map(dataset: str, features: str, model: str, checkpoint: str) -> float | None:
    """§7's number for this dataset, only in the configuration §7 was measured in."""
    entry = REGISTRY.get(dataset)
    setting = (features, model, checkpoint)
    if entry is None or setting != tuple(PAPER_SETTING[key] for key in
                                         ("backbone", "model", "checkpoint")):
        return None
    if entry.paper_map is None and entry.distractors is not None:
        return PAPER_AVERAGES.get(str(entry.paper_group))
    return entry.paper_map


def _metric_name(dataset: RetrievalDataset) -> str:
    entry = REGISTRY.get(dataset.name)
    if entry is not None:
        return entry.metric
    return {"revisitop": "mean of Medium and Hard mAP", "class": "mAP",
            "gldv2": "private mAP@100"}.get(dataset.protocol, f"mAP@{dataset.map_k}")


def extract_dataset(
    dataset: RetrievalDataset, config: EvaluateConfig, progress: bool = True
) -> tuple[FeatureStore, FeatureStore]:
    """Query (cropped with `config.query_crops`) and gallery features, extracted once per
    backbone and reused. Truncated images are decoded as far as they go, as the authors'
    extraction does, with a warning: the ground truth needs every image."""
    backbone = create_backbone(config.backbone, **config.backbone_options)
    # the file format is in the key: features of another format are extracted anew
    key = _settings_key({**backbone.settings(), "format": FORMAT})
    folder = (config.features_dir or dataset.root / "features") / key
    extract_config = ExtractConfig(backbone=config.backbone,
                                   backbone_options=dict(config.backbone_options),
                                   device=config.device, decode_truncated=True)
    stores = []
    for split, paths, boxes in (
        ("query-crops" if config.query_crops else "query", dataset.query_paths(),
         dataset.query_boxes() if config.query_crops else None),
        ("gallery", dataset.gallery_paths(), None),
    ):
        output = folder / f"{split}.h5"
        report = extract_features(paths, output, extract_config, boxes=boxes, progress=progress,
                                  backbone=backbone, root=dataset.root / "jpg")
        for path, warning in report.warnings:
            warnings.warn(f"{dataset.name}: {path}: {warning}", ElvisWarning, stacklevel=2)
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
    """Move each query's junk for `protocol` to the end, keeping order (ELVIS_SPEC §5).

    The spec does this for the revisitop protocols; class-labelled sets use it for the query's
    own gallery row, which the protocol excludes. INSTRE-style junk keeps its slot.
    """
    if dataset.protocol not in ("revisitop", "class"):
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
    """Every metric of the dataset's protocol, by name (ELVIS_SPEC §6); `map` is the headline."""
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
    recalls = {"recall@1": recall_at_k(ranking, positives, 1, junk),
               "recall@5": recall_at_k(ranking, positives, 5, junk)}
    if dataset.protocol == "gldv2":
        splits = {"map": dataset.splits.get("private"), "map_public": dataset.splits.get("public"),
                  "map_all": np.arange(len(gnd))}
        return {name: _split_map(ranking, positives, junk, rows)
                for name, rows in splits.items()} | recalls
    return {"map": map_at_k(ranking, positives, junk, dataset.map_k)["map"], **recalls}


def _split_map(ranking: np.ndarray, positives: Sequence[Any], junk: Sequence[Any],
               rows: np.ndarray | None) -> float:
    """mAP@100 over the queries of one split; NaN for a split with no query."""
    if rows is None or len(rows) == 0:
        return float("nan")
    return map_at_k(ranking[rows], [positives[i] for i in rows], [junk[i] for i in rows],
                    100)["map"]


def results_table(results: Sequence[DatasetResult]) -> pd.DataFrame:
    return pd.DataFrame([row for result in results for row in result.rows])


def write_results(table: pd.DataFrame, json_path: Path | None, csv_path: Path | None) -> None:
    """JSON (a list of rows) and CSV with every metric by name, each written atomically."""
    if json_path is not None:
        write_text_atomic(json_path, table.to_json(orient="records", indent=2))
    if csv_path is not None:
        write_text_atomic(csv_path, table.to_csv(index=False))


def _column(model: str, shortlist: int) -> str:
    return "global" if model == "global" else f"{model}@{shortlist}"


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset: its metric, global mAP, mAP of each model at each shortlist size,
    the paper's number where the configuration matches; then the average rows.

    "average (out-of-domain)" averages the registry's datasets outside the landmark domain of
    the paper's GLDv2 training set; custom datasets have no known domain and count only in
    "average (all)". The paper's averages appear only when every §7 dataset is in the table.
    """
    table = table.assign(column=[_column(m, s) for m, s in zip(table["model"], table["shortlist"],
                                                              strict=True)])
    order = list(dict.fromkeys(table.sort_values(["model", "shortlist"], key=_model_order)
                               ["column"]))
    wide = table.pivot_table(index="dataset", columns="column", values="map", aggfunc="first",
                             sort=False)[order]
    first = table.groupby("dataset", sort=False).first()
    paper = table.groupby("dataset", sort=False)["paper_map"].max() if "paper_map" in table \
        else pd.Series(np.nan, index=wide.index)
    summary = pd.concat([first[["metric"]], wide, paper.rename("paper")], axis=1)
    ood = [name for name in summary.index
           if REGISTRY.get(name) is not None and REGISTRY[name].in_domain is False]
    complete = {entry.name for entry in REGISTRY.values()
                if entry.paper_map is not None or entry.distractors} <= set(summary.index)
    averages = {"average (all)": (list(summary.index), "avg"),
                "average (out-of-domain)": (ood, "ood avg")}
    for label, (names, paper_key) in averages.items():
        row = summary.loc[names, order].mean() if names else pd.Series(np.nan, index=order)
        summary.loc[label, order] = row
        summary.loc[label, "metric"] = f"mean of {len(names)}"
        summary.loc[label, "paper"] = PAPER_AVERAGES[paper_key] if complete and paper.notna(
        ).any() else np.nan
    return _with_protocol_rows(summary, table, order).reset_index(names="dataset")


def _with_protocol_rows(summary: pd.DataFrame, table: pd.DataFrame,
                        order: list[str]) -> pd.DataFrame:
    """Revisitop datasets get their Medium and Hard mAP on rows of their own under the headline
    (not counted in the averages): Hard is where re-ranking shows."""
    rows = []
    for name in summary.index:
        rows.append(summary.loc[[name]])
        for protocol in ("medium", "hard"):
            metric = f"map_{protocol}"
            if metric not in table or table.loc[table["dataset"] == name, metric].isna().all():
                continue
            values = table[table["dataset"] == name].set_index("column")[metric]
            row = pd.DataFrame([values.reindex(order)], index=[f"  {name} {protocol}"])
            rows.append(row.assign(metric=f"mAP {protocol.capitalize()}"))
    return pd.concat(rows)[summary.columns]


def _model_order(column: pd.Series) -> pd.Series:
    if column.name == "model":
        return column.map({name: rank for rank, name in enumerate(MODELS)})
    return column


def runtime_curve(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and shortlist size, seconds per query and mAP averaged over the datasets; each
    model's curve starts at the global ranking (size 0)."""
    parts = [table[table["model"] == "global"].assign(model=name)
             for name in table["model"].unique() if name != "global"]
    curves = pd.concat([table, *parts]) if parts else table
    return (curves.groupby(["model", "shortlist"], sort=False)
            .agg(seconds_per_query=("seconds_per_query", "mean"), map=("map", "mean"),
                 datasets=("dataset", "nunique"))
            .reset_index().sort_values(["model", "shortlist"], key=_model_order)
            .reset_index(drop=True))


def plot_runtime(table: pd.DataFrame, path: Path) -> None:
    """Seconds per query and mAP against shortlist size: one thin line per dataset and model,
    a thick one per model for the mean over datasets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (runtime_axis, map_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    curve = runtime_curve(table)
    reranked = [name for name in curve["model"].unique() if name != "global"] or ["global"]
    colours = dict(zip(reranked, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    for name in reranked:
        for _, rows in table[table["model"].isin(["global", name])].groupby("dataset"):
            rows = rows.sort_values("shortlist")
            for axis, value in ((runtime_axis, "seconds_per_query"), (map_axis, "map")):
                axis.plot(rows["shortlist"], rows[value], color=colours[name], alpha=0.35,
                          linewidth=1)
        mean = curve[curve["model"] == name]
        for axis, value in ((runtime_axis, "seconds_per_query"), (map_axis, "map")):
            axis.plot(mean["shortlist"], mean[value], color=colours[name], marker="o",
                      linewidth=2.5, label=f"{name} (mean of {int(mean['datasets'].max())})")
    runtime_axis.set(xlabel="shortlist size (0 = global only)", ylabel="seconds per query",
                     title="re-ranking runtime")
    map_axis.set(xlabel="shortlist size (0 = global only)", ylabel="mAP", title="accuracy")
    for axis in (runtime_axis, map_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("thin: one dataset; thick: mean over datasets", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
