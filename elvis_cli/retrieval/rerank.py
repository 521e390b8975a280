"""The re-ranking engine: a re-ranker's scores for shortlisted pairs, fused with global
similarity.

Per-image work (ELViS: projection, normalisation, dustbin gains) is done once per image by an
ImageEmbedder and kept for every pair that image takes part in; queries are processed in
blocks whose gallery images fit a fixed cache, so memory is bounded by options, not by the
gallery size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from elvis_cli.features.store import FeatureStore
from elvis_cli.model.reranker import Reranker, RerankResult, fuse_and_sort
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.retrieval.embedder import EmbeddedImages, ImageEmbedder
from elvis_cli.retrieval.shortlist import Shortlist
from elvis_cli.util.devices import resolve_device
from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

# Pairs a CPU worker scores per call: the model computes them one at a time, so this only
# amortises per-call work (Python, gathering the chunk's embeddings) and never changes a bit.
CPU_PAIRS_PER_CALL = 32


class PairScorer:
    """Raw scores of (query, gallery) pairs read from two feature stores, by any re-ranker.

    Each side's images are embedded once per block of queries (ImageEmbedder; the gallery's
    last block is kept for the next). Pairs of a block are scored in chunks, across queries
    when shortlists are short: on CPU each worker thread takes CPU_PAIRS_PER_CALL pairs (ELViS
    keeps one pair's kernel in cache at a time); on CUDA a chunk is `batch_size` pairs, with
    no host sync per pair.
    """

    def __init__(self, reranker: Reranker, queries: FeatureStore, gallery: FeatureStore,
                 config: RerankConfig | None = None) -> None:
        self.config = config = config or RerankConfig()
        self.device, dtype, self.workers = _placement(config)
        self.reranker = reranker.to(self.device).eval()
        self.pairs_per_call = (CPU_PAIRS_PER_CALL if self.device.type == "cpu"
                               else config.batch_size)
        # wall time per phase over all calls: reads overlap both, so they show only as waits
        self.seconds = {"read and embed": 0.0, "score": 0.0}
        embedder = partial(_embedder, self.reranker, config=config, device=self.device,
                           dtype=dtype, workers=self.workers)
        self.queries = embedder(queries)
        # the last block's gallery rows stay embedded for the next block or call (evaluate
        # scores several shortlist sizes); a changed model needs a new PairScorer
        self.gallery = embedder(gallery, keep=True)

    @torch.inference_mode()
    def score(self, candidates: np.ndarray, progress: Callable[[], None] | None = None
              ) -> np.ndarray:
        """Raw scores (Q, L) for gallery rows `candidates` (Q, L) of queries 0..Q-1; -1 → NaN."""
        raw = np.full(candidates.shape, np.nan, dtype=np.float32)
        blocks = list(self._query_blocks(candidates))
        needed = [_gallery_rows(candidates[queries]) for queries in blocks]
        with _workers(self.workers) as pool, \
                self.queries.blocks(blocks, pool) as query_blocks, \
                self.gallery.blocks(needed, pool) as gallery_blocks:
            for queries, rows in zip(blocks, needed, strict=True):
                started = time.perf_counter()
                query_images, gallery_images = next(query_blocks), next(gallery_blocks)
                embedded = time.perf_counter()
                pairs = _block_pairs(candidates[queries], rows)
                chunks = [pairs[:, start : start + self.pairs_per_call]
                          for start in range(0, pairs.shape[1], self.pairs_per_call)]
                scored, reported = [], 0
                for chunk, values in zip(chunks, pool.map(
                        partial(self._score_chunk, query_images, gallery_images), chunks),
                        strict=True):
                    scored.append(values)
                    reported = _report(progress, reported, chunk[0, -1])  # earlier slots done
                if scored:
                    values = torch.cat(scored).float().cpu().numpy()  # the block's scores: one sync
                    raw[queries[pairs[0]], pairs[2]] = values
                _report(progress, reported, len(queries))
                self.seconds["read and embed"] += embedded - started
                self.seconds["score"] += time.perf_counter() - embedded
        return raw

    @torch.inference_mode()  # grad mode is per thread: workers need their own
    def _score_chunk(self, queries: EmbeddedImages, gallery: EmbeddedImages, chunk: np.ndarray
                     ) -> torch.Tensor:
        query_slots = chunk[0]
        if (query_slots == query_slots[0]).all():  # one query: broadcast it, no copies
            query_slots = query_slots[:1]
        return self.reranker.score(queries.take(query_slots, self.device),
                                   gallery.take(chunk[1], self.device))

    def _query_blocks(self, candidates: np.ndarray) -> Iterator[np.ndarray]:
        """Consecutive queries whose distinct gallery rows fit `cache_images`."""
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


@torch.inference_mode()
def cache_embeddings(reranker: Reranker, store: FeatureStore, config: RerankConfig
                     ) -> tuple[int, int]:
    """Embed every image of `store` that the embedding cache (`config.embedding_cache`) lacks
    and keep them there, `cache_images` at a time; returns how many, and their bytes. This is
    how `elvis extract --embedding-cache` spares the first re-ranking run its embedding."""
    if config.embedding_cache is None or not reranker.worth_caching:
        raise InputError(f"caching {reranker.name} embeddings needs a re-ranker whose "
                         "embeddings are worth it and RerankConfig(embedding_cache=...)")
    device, dtype, workers = _placement(config)
    embedder = _embedder(reranker.to(device).eval(), store, config=config, device=device,
                         dtype=dtype, workers=workers)
    unread = embedder.uncached(np.arange(store.num_images))
    step = config.cache_images
    with _workers(workers) as pool, embedder.blocks(
            [unread[start : start + step] for start in range(0, len(unread), step)],
            pool) as blocks:
        for _ in blocks:
            pass
    return len(unread), len(unread) * embedder.bytes_per_image()


def _placement(config: RerankConfig) -> tuple[torch.device, torch.dtype, int]:
    """The device, the precision of embedded descriptors and the worker threads of `config`."""
    device = resolve_device(config.device)
    cpu = device.type == "cpu"
    if cpu and config.precision == "float16":
        raise InputError("float16 precision needs a CUDA device (no float16 GEMM with "
                         "float32 results on CPU)")
    half = config.precision == "float16" or (config.precision == "auto" and not cpu)
    workers = (config.workers or torch.get_num_threads()) if cpu else 1
    return device, torch.float16 if half else torch.float32, workers


def _embedder(reranker: Reranker, store: FeatureStore, *, config: RerankConfig,
              device: torch.device, dtype: torch.dtype, workers: int,
              keep: bool = False) -> ImageEmbedder:
    return ImageEmbedder(reranker, store, device=device, dtype=dtype,
                         num_local=config.num_local, read_images=config.read_images,
                         workers=workers, cache_root=config.embedding_cache, keep=keep)


def _report(progress: Callable[[], None] | None, reported: int, finished: int) -> int:
    """Call progress once per query in [reported, finished); returns the new count."""
    for _ in range(reported, finished):
        if progress is not None:
            progress()
    return max(reported, finished)


def _gallery_rows(candidates: np.ndarray) -> np.ndarray:
    """The distinct gallery rows of a block's candidates, sorted, without the -1 padding."""
    rows = np.unique(candidates)
    return rows[rows >= 0]


def _block_pairs(candidates: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """(3, P) query slot, gallery slot and list position of every valid pair, query-major."""
    query_slots, positions = np.nonzero(candidates >= 0)
    gallery_slots = np.searchsorted(needed, candidates[query_slots, positions])
    return np.stack([query_slots, gallery_slots, positions])


@contextmanager
def _workers(count: int) -> Iterator[ThreadPoolExecutor]:
    """Threads that embed and score side by side, each single-threaded inside torch.

    A pair per thread at a time keeps each kernel in its core's cache, and avoids intra-op
    thread barriers, which stall badly when other processes share the cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=count,
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def rerank(
    reranker: Reranker,
    queries: FeatureStore,
    gallery: FeatureStore,
    shortlist: Shortlist,
    config: RerankConfig | None = None,
    progress: Callable[[], None] | None = None,
) -> RerankResult:
    """Re-rank the top `config.shortlist` of every query's list and fuse the scores with the
    global similarity by `reranker.fuse` (ELVIS_SPEC §5); the global ranking re-ranks none."""
    config = config or RerankConfig()
    if shortlist.indices.shape[0] != queries.num_images:
        raise InputError(
            f"shortlist has {shortlist.indices.shape[0]} queries but the query features hold "
            f"{queries.num_images} images"
        )
    if shortlist.indices.max(initial=-1) >= gallery.num_images:
        raise InputError("shortlist refers to gallery rows beyond the gallery features")
    head = min(config.shortlist, shortlist.length) if reranker.scores_pairs else 0
    candidates = shortlist.indices.copy()
    candidates[:, head:] = -1
    raw = (PairScorer(reranker, queries, gallery, config).score(candidates, progress) if head
           else np.full(candidates.shape, np.nan, dtype=np.float32))
    return fuse_and_sort(shortlist.indices, shortlist.similarities, raw, head, reranker.fuse)


def rerank_table(result: RerankResult, query_paths: list[str], gallery_paths: list[str]
                 ) -> pd.DataFrame:
    """One row per (query, rank): the output format of `elvis rerank`."""
    import pandas as pd

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
