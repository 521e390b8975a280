"""The re-ranking engine: ELViS scores for shortlisted pairs, fused with global similarity.

Per-image work (projection, normalisation, dustbin gains) is done once per image and kept for
every pair that image takes part in; queries are processed in blocks whose gallery images fit
a fixed cache, so memory is bounded by options, not by the gallery size.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from elvis_cli.checkpoints import Fusion
from elvis_cli.devices import resolve_device
from elvis_cli.errors import InputError
from elvis_cli.feature_store import FeatureStore
from elvis_cli.model import Elvis, Embedded
from elvis_cli.shortlist import Shortlist


@dataclass
class RerankConfig:
    shortlist: int = 100  # how many of each query's list are scored by ELViS
    num_local: int | None = 600  # first descriptors per image used (ELViS: 600 of the 700 stored);
    # files that store fewer use all of theirs
    batch_size: int = 100  # pairs scored at once
    cache_images: int = 2048  # gallery images whose embeddings are held at once
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("shortlist", "batch_size", "cache_images"):
            value = getattr(self, name)
            if value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.num_local is not None and self.num_local <= 0:
            raise InputError(f"num local must be positive, got {self.num_local}")


@dataclass
class RerankResult:
    """Each query's list in final order: re-ranked head, then the tail in global order."""

    indices: np.ndarray  # (Q, L) gallery rows; -1 pads
    global_scores: np.ndarray  # (Q, L)
    raw_scores: np.ndarray  # (Q, L) raw ELViS score; NaN where not re-ranked
    scores: np.ndarray  # (Q, L) fused score; NaN where not re-ranked


class PairScorer:
    """Raw ELViS scores of (query, gallery) pairs read from two feature stores."""

    def __init__(
        self,
        model: Elvis,
        queries: FeatureStore,
        gallery: FeatureStore,
        config: RerankConfig | None = None,
    ) -> None:
        self.config = config or RerankConfig()
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device).eval()
        self.queries, self.gallery = queries, gallery

    @torch.inference_mode()
    def score(self, candidates: np.ndarray, progress=None) -> np.ndarray:
        """Raw scores (Q, L) for gallery rows `candidates` (Q, L) of queries 0..Q-1; -1 → NaN."""
        raw = np.full(candidates.shape, np.nan, dtype=np.float32)
        for query_rows in self._query_blocks(candidates):
            needed = np.unique(candidates[query_rows])
            needed = needed[needed >= 0]
            cache = self._embed(self.gallery, needed)
            slot_of = {int(row): slot for slot, row in enumerate(needed)}
            queries = self._embed(self.queries, query_rows)
            for position, query in enumerate(query_rows):
                self._score_query(queries, position, cache, slot_of, candidates[query], raw[query])
                if progress is not None:
                    progress()
        return raw

    def _score_query(self, queries: Embedded, position: int, cache: Embedded, slot_of: dict,
                     rows: np.ndarray, out: np.ndarray) -> None:
        valid = np.flatnonzero(rows >= 0)
        query = _select(queries, torch.tensor([position], device=self.device))
        for start in range(0, len(valid), self.config.batch_size):
            chunk = valid[start : start + self.config.batch_size]
            slots = torch.tensor([slot_of[int(r)] for r in rows[chunk]], device=self.device)
            scores = self.model.score(query, _select(cache, slots))
            out[chunk] = scores.float().cpu().numpy()

    def _query_blocks(self, candidates: np.ndarray) -> Iterator[np.ndarray]:
        """Consecutive queries whose distinct gallery rows fit the embedding cache."""
        block: list[int] = []
        seen: set[int] = set()
        for query, rows in enumerate(candidates):
            rows_set = {int(r) for r in rows if r >= 0}
            if block and len(seen | rows_set) > self.config.cache_images:
                yield np.array(block)
                block, seen = [], set()
            block.append(query)
            seen |= rows_set
        if block:
            yield np.array(block)

    def _num_local(self, store: FeatureStore) -> int:
        wanted = self.config.num_local
        return store.num_local if wanted is None else min(wanted, store.num_local)

    def _embed(self, store: FeatureStore, rows: np.ndarray) -> Embedded:
        parts = []
        chunk = self.config.batch_size
        for start in range(0, len(rows), chunk):
            descriptors, mask = store.local_descriptors(rows[start : start + chunk],
                                                        self._num_local(store))
            descriptors = torch.from_numpy(descriptors).to(self.device)
            mask = torch.from_numpy(mask).to(self.device)
            parts.append(self.model.embed(_finite(descriptors, mask), mask))
        if not parts:
            empty = torch.empty(0, device=self.device)
            return Embedded(empty, empty, empty)
        return Embedded(*(torch.cat([getattr(p, name) for p in parts])
                          for name in ("descriptors", "gains", "mask")))


def _finite(descriptors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padding slots may hold anything in released files; zero them so they stay harmless."""
    return descriptors.masked_fill(mask.unsqueeze(-1), 0.0)


def _select(embedded: Embedded, slots: torch.Tensor) -> Embedded:
    return Embedded(embedded.descriptors[slots], embedded.gains[slots], embedded.mask[slots])


def fuse_and_sort(
    indices: np.ndarray, global_scores: np.ndarray, raw: np.ndarray, top: int, fusion: Fusion
) -> RerankResult:
    """Fuse the first `top` entries of each list and re-sort them; the rest keep their order."""
    head = min(top, indices.shape[1])
    raw = raw.copy()
    raw[:, head:] = np.nan
    fused = fusion(torch.from_numpy(global_scores), torch.from_numpy(raw)).numpy()
    fused[:, head:] = np.nan
    fused[indices < 0] = np.nan
    raw[indices < 0] = np.nan
    sort_key = np.where(np.isnan(fused[:, :head]), -np.inf, fused[:, :head])
    # stable sort on the negated score keeps global order among ties
    order = np.argsort(-sort_key, axis=1, kind="stable")
    order = np.concatenate(
        [order, np.broadcast_to(np.arange(head, indices.shape[1]), (indices.shape[0],
                                                                   indices.shape[1] - head))],
        axis=1,
    )
    take = lambda array: np.take_along_axis(array, order, axis=1)  # noqa: E731
    return RerankResult(take(indices), take(global_scores), take(raw), take(fused))


def rerank(
    model: Elvis,
    queries: FeatureStore,
    gallery: FeatureStore,
    shortlist: Shortlist,
    fusion: Fusion,
    config: RerankConfig | None = None,
    progress=None,
) -> RerankResult:
    """Re-rank the top `config.shortlist` of every query's list (ELVIS_SPEC §5)."""
    config = config or RerankConfig()
    if shortlist.indices.shape[0] != queries.num_images:
        raise InputError(
            f"shortlist has {shortlist.indices.shape[0]} queries but the query features hold "
            f"{queries.num_images} images"
        )
    if shortlist.indices.max(initial=-1) >= gallery.num_images:
        raise InputError("shortlist refers to gallery rows beyond the gallery features")
    head = min(config.shortlist, shortlist.length)
    candidates = shortlist.indices.copy()
    candidates[:, head:] = -1
    raw = PairScorer(model, queries, gallery, config).score(candidates, progress)
    return fuse_and_sort(shortlist.indices, shortlist.similarities, raw, head, fusion)


def rerank_table(result: RerankResult, query_paths: list[str], gallery_paths: list[str]
                 ) -> pd.DataFrame:
    """One row per (query, rank): the output format of `elvis rerank`."""
    queries, ranks = np.nonzero(result.indices >= 0)
    gallery = result.indices[queries, ranks]
    return pd.DataFrame({
        "query_index": queries,
        "query_path": np.asarray(query_paths, dtype=object)[queries],
        "rank": ranks + 1,
        "gallery_index": gallery,
        "gallery_path": np.asarray(gallery_paths, dtype=object)[gallery],
        "global_score": result.global_scores[queries, ranks],
        "raw_score": result.raw_scores[queries, ranks],
        "score": result.scores[queries, ranks],
    })
