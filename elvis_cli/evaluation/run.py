"""Benchmark evaluation runs: features (from a pluggable source), global ranking, re-ranking by
each requested model at several shortlist sizes, and the rows that score them by the dataset's
own rules, with runtime per query. report.py makes tables, files and curves of those rows.

Each shortlist size is re-ranked from scratch and timed on its own, so the runtime curve
measures what a user would pay for that size (feature reads included). A fusion grid
(`FusionGrid`) adds a row per (shortlist size, lam, temp) from the raw pair scores of each size,
computed once; those rows are marked and never replace the headline rows of the defaults.
What a run is given, `EvaluateConfig` and `FusionGrid`, is in config.py (no torch there).
"""

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import faiss  # noqa: F401  (loaded with this module: the timed global search must not pay for it)
import numpy as np
import torch

from elvis_cli.backbones import create_backbone
from elvis_cli.evaluation.config import EvaluateConfig, FusionGrid
from elvis_cli.evaluation.datasets import RetrievalDataset
from elvis_cli.evaluation.metrics import (
    QueryAps,
    class_scores,
    gldv2_scores,
    ok_junk_scores,
    protocol_junk,
    protocols_of,
    revisitop_scores,
)
from elvis_cli.evaluation.registry import PAPER_AVERAGES, PAPER_SETTING, REGISTRY
from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.layout import FORMAT
from elvis_cli.features.released import open_released
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.checkpoints import Checkpoint
from elvis_cli.model.fusion import Fusion
from elvis_cli.model.registry import load_reranker
from elvis_cli.model.reranker import RerankResult, fuse_and_sort
from elvis_cli.retrieval.config import AFTER_RERANKING
from elvis_cli.retrieval.files import ASYMMETRIC_SETTING
from elvis_cli.retrieval.job import Block, Job, held, run_blocks
from elvis_cli.retrieval.post import LocalFeatures, post_processed_shortlist
from elvis_cli.retrieval.query_expansion import expand_reranked
from elvis_cli.retrieval.rerank import PairScorer, RerankConfig, digest_of, rerank_table
from elvis_cli.retrieval.shortlist import Shortlist, build_shortlist
from elvis_cli.util.errors import ElvisWarning, InputError
from elvis_cli.util.progress import ProgressCallback, with_detail


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
FeatureSource = Callable[[RetrievalDataset, EvaluateConfig, ProgressCallback | None],
                         DatasetFeatures]


@dataclass
class DatasetResult:
    dataset: str
    protocol: str  # the evaluation protocols scored, "medium/hard" or "ok"
    rows: list[dict[str, Any]]  # one per (model, shortlist size): metrics by name and runtime
    # one per (model, shortlist size, protocol, query) of the headline rows: the query's AP,
    # the values each row's mAP is the mean of (report.per_query_table)
    per_query: list[dict[str, Any]] = field(default_factory=list)
    # with `keep_ranking`: the ranking a results page shows (rerank_table's columns) and what
    # made it, e.g. "elvis@100, medium protocol"
    ranking: Any = None  # pd.DataFrame
    ranking_label: str = ""
    features_files: tuple[Path, Path] | None = None  # the ranking's queries' and gallery's


# a kept ranking holds each query's first PAGE_DEPTH entries (or its shortlist, if longer): a
# page shows the top of each list, and a gallery of millions is never copied whole
PAGE_DEPTH = 100


def extracted_source(dataset: RetrievalDataset, config: EvaluateConfig,
                     progress: ProgressCallback | None = None) -> DatasetFeatures:
    """Features extracted by `config.backbone` (cached), ranked by exact global search."""
    queries, gallery = extract_dataset(dataset, config, progress)
    started = time.perf_counter()
    ranking = build_shortlist(queries.global_descriptors(), gallery.global_descriptors(),
                              gallery.num_images)
    seconds = (time.perf_counter() - started) / max(queries.num_images, 1)
    label = (gallery.backbone_settings or {}).get("name", config.backbone)
    if config.query_image_size is not None:  # not the paper's setting: no paper number
        label += f", queries at {config.query_image_size} px"
    return DatasetFeatures(queries, gallery, ranking, seconds, label)


def released_source(dataset: RetrievalDataset, config: EvaluateConfig,
                    progress: ProgressCallback | None = None) -> DatasetFeatures:
    """The authors' released descriptor files (ELVIS_SPEC §4), ranked by their nn file.

    Only the dataset's own folder is read, so no number is ever reported under another
    dataset's name (a +1M set has its own folder, nn and gnd files).
    """
    if not config.descriptors:
        raise InputError("released descriptors: name them, e.g. --descriptors dinov2")
    if dataset.root.name != dataset.name:
        raise InputError(f"{dataset.name}: its released files must be in a folder named "
                         f"{dataset.name}, not {dataset.root}")
    queries, gallery, ranking = open_released(dataset.root, config.descriptors,
                                              len(dataset.gallery))
    return DatasetFeatures(queries, gallery, ranking, 0.0, config.descriptors)


def evaluate_dataset(
    dataset: RetrievalDataset,
    config: EvaluateConfig,
    checkpoint: Checkpoint | None = None,
    progress: ProgressCallback | None = None,
    on_stage: Callable[[str], None] | None = None,
    source: FeatureSource | None = None,
    grid: FusionGrid | None = None,
    keep_ranking: bool = False,
    parts: Path | None = None,
) -> DatasetResult:
    """Evaluate one dataset; `on_stage` hears a short label as each stage starts, `progress`
    the images of each features extraction and the queries of each re-ranking run. With
    `parts`, each re-ranking run keeps its raw scores there in parts of `config.block_size`
    queries (retrieval/job.py), so that a killed evaluation, run again, skips them.

    The global row scores the global ranking as it is (the authors' prepare_topk_global); the
    re-ranked rows score lists whose junk was moved behind every other image first (§5). With
    `grid`, rows with `grid` True follow, and the best of them per model has `best` True. The
    result's `per_query` holds each query's AP behind the rows of the default settings. Each
    of `config.post` (column `post`) makes a global ranking of its own, re-ranked by every
    model; its global row's time includes the post-processing's (GSS: training).
    `keep_ranking` keeps, for a results page, the first re-ranker's ranking at the largest
    shortlist size (of the first protocol and global ranking; none: the global ranking).
    """
    stage = on_stage or (lambda _label: None)
    stage(f"{dataset.name}: features and global ranking")
    protocols = protocols_of(dataset.ground_truth_kind)
    source = source or (released_source if config.descriptors else extracted_source)
    with source(dataset, config, progress) as features:
        common = {"dataset": dataset.name, "protocol": "/".join(protocols),
                  "metric": _metric_name(dataset), "features": features.label, "grid": False,
                  "best": False}
        per_query: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        page: list[tuple[RerankResult, str]] = []
        after = AFTER_RERANKING in config.post
        for position, post in enumerate(config.global_posts):
            ranking, post_seconds = features.ranking, 0.0
            if post != "none":
                stage(f"{dataset.name}: {post} post-processing")
                ranking, report = post_processed_shortlist(
                    features.queries.global_descriptors(), features.gallery.global_descriptors(),
                    features.gallery.num_images, features.queries is features.gallery, post,
                    config.post_config, with_detail(progress, dataset.name),
                    LocalFeatures(features.queries, features.gallery, _scoring(config),
                                  checkpoint or config.checkpoint))
                post_seconds = report.seconds / max(len(dataset.queries), 1)
            rows += _ranking_rows(dataset, features, ranking, config, per_query, stage,
                                  common, post if post in config.post else None,
                                  after and post == "none", post_seconds, checkpoint, progress,
                                  grid if post == "none" else None,
                                  page if keep_ranking and position == 0 else None,
                                  None if parts is None else parts / dataset.name)
        files = (Path(features.queries.path), Path(features.gallery.path))
        if keep_ranking and not page:  # nothing re-ranked: the global ranking
            nothing = np.full(features.ranking.indices.shape, np.nan, dtype=np.float32)
            page.append((RerankResult(features.ranking.indices, features.ranking.similarities,
                                      nothing, nothing), "global"))
    result = DatasetResult(dataset.name, "/".join(protocols), rows, per_query)
    if page:
        (kept, label), = page
        depth = max(PAGE_DEPTH, max(config.shortlists))
        result.ranking = rerank_table(
            RerankResult(*(array[:, :depth] for array in (kept.indices, kept.global_scores,
                                                          kept.raw_scores, kept.scores))),
            [str(path) for path in dataset.query_paths()],
            [str(path) for path in dataset.gallery_paths()])
        result.ranking_label, result.features_files = label, files
    return result


def _scoring(config: EvaluateConfig, num_local: int | None = None) -> RerankConfig:
    """Where and how a run's pairs are scored: by its re-rankers (`num_local`: a model's own
    count), and by gss-v's verifier."""
    return RerankConfig(num_local=num_local or config.num_local, batch_size=config.batch_size,
                        device=config.device, embedding_cache=config.embedding_cache,
                        block_size=config.block_size)


def _ranking_rows(dataset: RetrievalDataset, features: DatasetFeatures, ranking: Shortlist,
                  config: EvaluateConfig, per_query: list[dict[str, Any]],
                  stage: Callable[[str], None], common: dict[str, Any], post: str | None,
                  after: bool, post_seconds: float, checkpoint: Checkpoint | None,
                  progress: ProgressCallback | None, grid: FusionGrid | None,
                  page: list[tuple[RerankResult, str]] | None = None,
                  parts: Path | None = None) -> list[dict[str, Any]]:
    """The rows of one global ranking, made by `post` (None: the plain ranking, wanted only
    for `after`): the global row, then each model at each shortlist size (and the grid's);
    with `after`, also each re-ranked list expanded by αQE and searched again (post
    AFTER_RERANKING), from the same pair scores. Each query's AP goes to `per_query`, under
    the model's name with `+post` where a post-processing made the ranking. An empty `page`
    receives the first model's ranking at the largest size (first protocol) and its label."""
    protocols = protocols_of(dataset.ground_truth_kind)
    lists = {name: _junk_last(ranking.indices, ranking.similarities, dataset, name)
             for name in protocols}

    def scored(model_name: str, size: int, rankings: dict[str, np.ndarray], post: str
               ) -> dict[str, Any]:
        """The post and metrics of a headline row; its queries' APs go to `per_query`."""
        query_aps: QueryAps = {}
        metrics = score_rankings(dataset, rankings, query_aps)
        label = model_name if post == "none" else f"{model_name}+{post}"
        per_query.extend(_query_rows(dataset, label, size, query_aps))
        return {"post": post, **metrics}

    rows = []
    if post is not None:
        rows.append({**common, "model": "global", "shortlist": 0,
                     **scored("global", 0, dict.fromkeys(protocols, ranking.indices), post),
                     "seconds_per_query": features.seconds_per_query + post_seconds,
                     "bytes_per_image": load_reranker("global", features.gallery
                                                      ).bytes_per_image(features.gallery)})
    suffix = "" if post in ("none", None) else f"+{post}"
    # read once, outside the timed re-rankings: αQE after re-ranking expands with them
    query_globals, gallery_globals = ((features.queries.global_descriptors(),
                                       features.gallery.global_descriptors()) if after
                                      else (None, None))
    for model_name in config.rerankers:
        reranker = load_reranker(model_name, features.gallery, checkpoint or config.checkpoint,
                                 config.lam, config.temperature)
        fusion, label = reranker.fusion, reranker.label
        num_local = config.num_local_of.get(model_name, config.num_local)
        # a warm-up (compiled loops, the first kernels), so that the first size is not
        # penalised, by a scorer of its own: the timed one keeps no image from it to merge
        # with its first block
        scorer, warm_up = (PairScorer(reranker, features.queries, features.gallery,
                                      _scoring(config, num_local)) for _ in range(2))
        warm_up.score(ranking.indices[:1, :1])
        model = {**common, "model": model_name, "checkpoint": label, "lam": fusion.lam,
                 "temperature": fusion.temperature,
                 "bytes_per_image": reranker.bytes_per_image(features.gallery,
                                                             reranker.local_count(num_local))}
        raw_scores = _RawScores(scorer, lists, progress,
                                f"{dataset.name}: {model_name}{suffix}",
                                None if parts is None else parts / f"{model_name}{suffix}")
        for size in (size for size in config.shortlists if size > 0):
            stage(f"{dataset.name}: {model_name}{suffix} re-ranking, shortlist {size}")
            started = time.perf_counter()
            fused = _fused_lists(lists, raw_scores(size), reranker.fuse)
            rankings = _rankings(fused)
            seconds = ((time.perf_counter() - started + raw_scores.earlier_seconds[size])
                       / max(len(dataset.queries), 1))
            if page is not None and not page and size == max(config.shortlists):
                page.append((fused[protocols[0]],
                             f"{model_name}@{size}{suffix}, {protocols[0]} protocol"))
            if post is not None:
                rows.append({**model, "shortlist": size,
                             **scored(model_name, size, rankings, post),
                             "seconds_per_query": seconds,
                             "paper_map": _paper_map(dataset.name, features.label, model_name,
                                                     label) if post == "none" else None})
            if after:
                started = time.perf_counter()
                expanded = {name: expand_reranked(
                    query_globals, gallery_globals, indices, config.post_config.aqe_n,
                    config.post_config.aqe_alpha)
                    for name, indices in rankings.items()}
                rows.append({**model, "shortlist": size,
                             **scored(model_name, size, expanded, AFTER_RERANKING),
                             "seconds_per_query": seconds + (time.perf_counter() - started)
                             / max(len(dataset.queries), 1)})
        if grid is not None and reranker.tunable_fusion:
            stage(f"{dataset.name}: {model_name} fusion grid")
            rows += _best_marked([
                {**model, "grid": True, "shortlist": size, "post": post,
                 **score_rankings(dataset, _rankings(_fused_lists(lists, raw_scores(size),
                                                                  Fusion(lam, temperature)))),
                 "seconds_per_query": raw_scores.seconds_per_query[size], "lam": lam,
                 "temperature": temperature}
                for size in grid.shortlists for lam in grid.lams
                for temperature in grid.temperatures])
    return rows


def _query_rows(dataset: RetrievalDataset, model: str, shortlist: int,
                query_aps: QueryAps) -> list[dict[str, Any]]:
    """A row per protocol and query: its AP in percent (NaN: no positive, left out of the
    mean), and the query's split where the dataset has splits (GLDv2's `map` is the private
    split's mean)."""
    split_of = {int(query): name for name, queries in dataset.splits.items()
                for query in queries}
    return [{"dataset": dataset.name, "model": model, "shortlist": shortlist,
             "protocol": protocol, "query_index": query, "query": dataset.queries[query],
             **({"split": split_of.get(query, "")} if split_of else {}), "ap": float(ap)}
            for protocol, aps in query_aps.items() for query, ap in enumerate(aps)]


def _best_marked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, the first one with the highest headline `map` marked `best` (the authors'
    evaluate.py reports that combination)."""
    maps = np.array([row["map"] for row in rows], dtype=np.float64)
    if np.isnan(maps).all():
        return rows
    best = int(np.nanargmax(maps))
    return [{**row, "best": position == best} for position, row in enumerate(rows)]


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
    return {"revisitop": "mean of Medium and Hard mAP", "class": "mAP@100",
            "gldv2": "private mAP@100"}.get(dataset.ground_truth_kind, f"mAP@{dataset.map_k}")


def extract_dataset(
    dataset: RetrievalDataset, config: EvaluateConfig, progress: ProgressCallback | None = None
) -> tuple[FeatureStore, FeatureStore]:
    """Query (cropped with `config.query_crops`, at `config.query_image_size`) and gallery
    features, extracted once per backbone setting and reused. Truncated images are decoded as
    far as they go, as the authors' extraction does, with a warning: the ground truth needs
    every image."""
    gallery_backbone = create_backbone(config.backbone, **config.backbone_options)
    query_backbone = gallery_backbone
    if config.query_image_size is not None:
        query_backbone = create_backbone(config.backbone, **{
            **config.backbone_options, ASYMMETRIC_SETTING: config.query_image_size})
    extract_config = ExtractConfig(backbone=config.backbone,
                                   backbone_options=dict(config.backbone_options),
                                   device=config.device, decode_truncated=True)
    stores = []
    root = dataset.root / "jpg"  # stored names are relative to it
    for split, paths, boxes, backbone in (
        ("query-crops" if config.query_crops else "query", dataset.query_paths(),
         dataset.query_boxes() if config.query_crops else None, query_backbone),
        ("gallery", dataset.gallery_paths(), None, gallery_backbone),
    ):
        # each split in the folder of its own settings, the file format among them: features
        # of another format or image size are extracted anew, queries at the gallery's size
        # are shared with a symmetric run
        key = _settings_key({**backbone.settings(), "format": FORMAT})
        output = (config.features_dir or dataset.root / "features") / key / f"{split}.h5"
        report = extract_features(
            paths, output, extract_config, boxes=boxes, backbone=backbone, root=root,
            progress=with_detail(progress, f"{dataset.name}: {split}"))
        for path, warning in report.warnings:
            warnings.warn(f"{dataset.name}: {path}: {warning}", ElvisWarning, stacklevel=2)
        if report.failures:
            path, reason = report.failures[0]
            tried = os.path.abspath(root / path)
            raise InputError(
                f"{dataset.name}: {len(report.failures)} {split} image(s) could not be read, "
                f"first {tried}: {reason}; the ground truth in "
                f"{os.path.abspath(dataset.root)} needs every image"
            )
        stores.append(FeatureStore.open(output))
    return stores[0], stores[1]


def _settings_key(settings: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings.get('name', 'backbone')}-{digest}"


def _junk_last(indices: np.ndarray, similarities: np.ndarray, dataset: RetrievalDataset,
               protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """Move each query's junk for `protocol` behind every other entry, keeping order, so that
    it takes no re-ranking slot (ELVIS_SPEC §5, the authors' `rerank`).

    Every ground truth with junk does so: revisitop (Medium: junk; Hard: junk and easy), ok/junk
    sets (INSTRE, Product1M, GLDv2 with junk), and class-labelled sets, whose junk is the query's
    own gallery row (scoring then takes it out before the top-100 cut, see `class_scores`).
    """
    order = np.tile(np.arange(indices.shape[1]), (indices.shape[0], 1))
    for query, entry in enumerate(dataset.ground_truth):
        positives, junk = protocol_junk(entry, protocol)
        is_junk = np.isin(indices[query], np.setdiff1d(junk, positives))
        if is_junk.any():
            order[query] = np.concatenate([np.flatnonzero(~is_junk), np.flatnonzero(is_junk)])
    return (np.take_along_axis(indices, order, axis=1),
            np.take_along_axis(similarities, order, axis=1))


class _RawScores:
    """Raw pair scores of each protocol's top k, computed once per size k (and timed), so every
    fusion setting of that size reuses them; pairs shared by the protocols are scored once.
    `progress` hears each size's queries as they are scored ("re-ranking", detail `label`).
    With `parts`, each size's scores are kept there in parts (`parts@k/`), and the blocks an
    earlier run finished are read, not scored: their time, recorded in the parts, counts
    (`earlier_seconds`), so a resumed run reports what an uninterrupted one would."""

    def __init__(self, scorer: PairScorer, lists: dict[str, tuple[np.ndarray, np.ndarray]],
                 progress: ProgressCallback | None, label: str, parts: Path | None = None):
        self.scorer, self.lists, self.progress, self.label = scorer, lists, progress, label
        self.parts = parts
        self.by_size: dict[int, dict[str, np.ndarray]] = {}
        self.seconds_per_query: dict[int, float] = {}
        self.earlier_seconds: dict[int, float] = {}

    def __call__(self, size: int) -> dict[str, np.ndarray]:
        if size not in self.by_size:
            started = time.perf_counter()
            heads = {name: indices[:, :size] for name, (indices, _) in self.lists.items()}
            pairs = _distinct_per_query(np.concatenate(list(heads.values()), axis=1))
            raw_pairs, self.earlier_seconds[size] = self._scored(pairs, size)
            self.by_size[size] = {name: _lookup(pairs, raw_pairs, head)
                                  for name, head in heads.items()}
            self.seconds_per_query[size] = ((time.perf_counter() - started
                                             + self.earlier_seconds[size])
                                            / max(pairs.shape[0], 1))
        return self.by_size[size]

    def _scored(self, pairs: np.ndarray, size: int) -> tuple[np.ndarray, float]:
        """Raw scores of `pairs`, and the seconds earlier runs spent on the blocks read."""
        detail = f"{self.label}, shortlist {size}"
        per_query = (pairs >= 0).sum(axis=1)
        if self.parts is None:  # every query in one block
            scored: list[np.ndarray] = []
            run_blocks(lambda _start, _stop, progress: self.scorer.score(pairs, progress),
                       per_query, [Block(0, 0, len(pairs))], lambda _, raw: scored.append(raw),
                       self.progress, detail)
            return scored[0], 0.0

        def score(start: int, stop: int, progress: Callable[[], None]) -> np.ndarray:
            return self.scorer.score(pairs[start:stop], progress, first_query=start)

        job = Job(self.parts.with_name(f"{self.parts.name}@{size}"),
                  {**self.scorer.identity(), "pairs": digest_of(pairs)}, len(pairs),
                  self.scorer.config.block_size, ("raw", "seconds"))
        with held(job, job.folder) as report:
            todo = job.todo()
            run_blocks(partial(_timed, score), per_query, todo, job.write,
                       self.progress, "; ".join(filter(None, (detail, report.summary()))))
            stored = [job.read(block) for block in job.blocks]
        earlier = sum(float(part["seconds"].sum()) for block, part in
                      zip(job.blocks, stored, strict=True) if block not in todo)
        return (np.concatenate([part["raw"] for part in stored]) if stored
                else np.zeros(pairs.shape, np.float32)), earlier


def _timed(score: Callable[[int, int, Callable[[], None]], np.ndarray], start: int, stop: int,
           progress: Callable[[], None]) -> dict[str, np.ndarray]:
    """A part of an evaluation's scores: `score` of queries start..stop-1, and its time."""
    started = time.perf_counter()
    raw = score(start, stop, progress)
    return {"raw": raw, "seconds": np.full(stop - start, (time.perf_counter() - started)
                                           / (stop - start))}


def _rankings(fused: dict[str, RerankResult]) -> dict[str, np.ndarray]:
    """Each protocol's final ranking (gallery rows) of its fused lists."""
    return {name: result.indices for name, result in fused.items()}


def _fused_lists(lists: dict[str, tuple[np.ndarray, np.ndarray]],
                 raw_heads: dict[str, np.ndarray],
                 fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> dict[str, RerankResult]:
    """Final list per protocol: the scored head fused and re-sorted, the rest as listed."""
    return {name: _fused(indices, similarities, raw_heads[name], fuse)
            for name, (indices, similarities) in lists.items()}


def _fused(indices: np.ndarray, similarities: np.ndarray, raw_head: np.ndarray,
           fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> RerankResult:
    """One list re-ranked: its head, scored `raw_head`, fused and re-sorted."""
    size = raw_head.shape[1]
    full_raw = np.full(indices.shape, np.nan, dtype=np.float32)
    full_raw[:, :size] = raw_head
    return fuse_and_sort(indices, similarities, full_raw, size, fuse)


def _distinct_per_query(heads: np.ndarray) -> np.ndarray:
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


def score_rankings(dataset: RetrievalDataset, rankings: dict[str, np.ndarray],
                   query_aps: QueryAps | None = None) -> dict[str, float]:
    """Every metric of the dataset's kind of ground truth, by name (ELVIS_SPEC §6), from a
    ranking per protocol; `map` is the headline. `query_aps`, when given, receives each
    protocol's per-query APs (the metrics module's scorers).

    Lists are cut to map_k before junk is removed: unlimited for revisitop sets (ROxford,
    RParis, +1M), the dataset's `map_k` (100 unless the registry says otherwise) for ok/junk
    sets and GLDv2, the top 100 for class-labelled sets.
    """
    gnd = dataset.ground_truth
    if dataset.ground_truth_kind == "revisitop":
        return revisitop_scores(rankings["medium"], rankings["hard"], gnd, query_aps)
    split = [protocol_junk(entry, "ok") for entry in gnd]
    positives, junk = [pos for pos, _ in split], [junk for _, junk in split]
    ranking = rankings["ok"]
    if dataset.ground_truth_kind == "class":
        return class_scores(ranking, positives, junk, query_aps)
    if dataset.ground_truth_kind == "gldv2":
        return gldv2_scores(ranking, positives, junk, dataset.splits, dataset.map_k, query_aps)
    return ok_junk_scores(ranking, positives, junk, dataset.map_k, query_aps)
