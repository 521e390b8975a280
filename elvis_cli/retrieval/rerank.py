"""The re-ranking engine: a re-ranker's scores for shortlisted pairs, fused with global
similarity.

Per-image work (ELViS: projection, normalisation, dustbin gains) is done once per image by an
ImageEmbedder and kept for every pair that image takes part in; queries are processed in
blocks whose gallery images fit a fixed cache, so memory is bounded by options, not by the
gallery size.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from elvis_cli.features.store import FeatureStore
from elvis_cli.model.reranker import Reranker, RerankResult, fuse_and_sort
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.retrieval.embedder import EmbeddedImages, ImageEmbedder
from elvis_cli.retrieval.embedding_cache import update_with_weights
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

    def identity(self) -> dict[str, Any]:
        """What its scores depend on (`scoring_identity`)."""
        return scoring_identity(self.reranker, self.queries.store, self.gallery.store,
                                self.config)

    @torch.inference_mode()
    def score(self, candidates: np.ndarray, progress: Callable[[], None] | None = None,
              first_query: int = 0) -> np.ndarray:
        """Raw scores (Q, L) for gallery rows `candidates` (Q, L) of the queries from
        `first_query` on (a block of a longer list); -1 → NaN."""
        raw = np.full(candidates.shape, np.nan, dtype=np.float32)
        blocks = list(self._query_blocks(candidates))
        needed = [_gallery_rows(candidates[queries]) for queries in blocks]
        with _workers(self.workers) as pool, \
                self.queries.blocks([first_query + queries for queries in blocks],
                                    pool) as query_blocks, \
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
                         num_local=reranker.local_count(config.num_local),
                         read_images=config.read_images,
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


class BlockReranker:
    """Re-ranks any block of consecutive queries of one shortlist, on its own: a block's result
    depends only on the features, its rows of the shortlist and the config (the scores are
    the same bits however the queries are split), so blocks can be computed in any order, by
    any process, and written as parts of a job (job.py)."""

    def __init__(self, reranker: Reranker, queries: FeatureStore, gallery: FeatureStore,
                 shortlist: Shortlist, config: RerankConfig | None = None) -> None:
        self.config = config = config or RerankConfig()
        if shortlist.indices.shape[0] != queries.num_images:
            raise InputError(
                f"shortlist has {shortlist.indices.shape[0]} queries but the query features "
                f"hold {queries.num_images} images"
            )
        if shortlist.indices.max(initial=-1) >= gallery.num_images:
            raise InputError("shortlist refers to gallery rows beyond the gallery features")
        self.reranker, self.queries, self.gallery, self.shortlist = (reranker, queries, gallery,
                                                                     shortlist)
        self.head = min(config.shortlist, shortlist.length) if reranker.scores_pairs else 0
        self.scorer = PairScorer(reranker, queries, gallery, config) if self.head else None

    def __call__(self, start: int, stop: int, progress: Callable[[], None] | None = None
                 ) -> RerankResult:
        """The fused ranking of queries start..stop-1; `progress` hears each query scored."""
        indices = self.shortlist.indices[start:stop]
        candidates = indices.copy()
        candidates[:, self.head:] = -1
        raw = (np.full(candidates.shape, np.nan, dtype=np.float32) if self.scorer is None
               else self.scorer.score(candidates, progress, first_query=start))
        return fuse_and_sort(indices, self.shortlist.similarities[start:stop], raw, self.head,
                             self.reranker.fuse)

    def pairs_per_query(self) -> np.ndarray:
        """How many pairs each query's re-ranking scores: its work, for throughput and ETA."""
        return (self.shortlist.indices[:, :self.head] >= 0).sum(axis=1)

    def identity(self) -> dict[str, Any]:
        """Everything a block's bits depend on: what its pairs' scores depend on
        (`scoring_identity`), the candidate lists' contents, how many of each are scored,
        and the fusion."""
        identity = scoring_identity(self.reranker, self.queries, self.gallery, self.config)
        identity["settings"]["shortlist"] = self.head
        identity["model"].update(lam=self.reranker.fusion.lam,
                                 temperature=self.reranker.fusion.temperature)
        return {**identity, "candidate lists": digest_of(self.shortlist.indices,
                                                         self.shortlist.similarities)}


def scoring_identity(reranker: Reranker, queries: FeatureStore, gallery: FeatureStore,
                     config: RerankConfig) -> dict[str, Any]:
    """Everything the raw score of a pair depends on: the features files, the re-ranker and
    its weights, and the settings that change scores (CPU scores are the same for any
    workers, batch, read and cache sizes)."""
    device, dtype, _ = _placement(config)
    weights = hashlib.sha256()
    update_with_weights(weights, reranker)
    return {
        "queries": queries.identity(), "gallery": gallery.identity(),
        "model": {"name": reranker.name, "label": reranker.label,
                  "weights": weights.hexdigest()},
        "settings": {"num_local": reranker.local_count(config.num_local), "device": device.type,
                     "precision": str(dtype),
                     **({} if device.type == "cpu" else {"batch_size": config.batch_size})},
    }


def digest_of(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' types, shapes and contents."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


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
    return BlockReranker(reranker, queries, gallery, shortlist, config)(
        0, queries.num_images, progress)


def rerank_table(result: RerankResult, query_paths: Sequence[str], gallery_paths: Sequence[str],
                 first_query: int = 0) -> pd.DataFrame:
    """One row per (query, rank): the output format of `elvis rerank`. `result` holds the
    queries from `first_query` on (a block of a longer run); paths given as object arrays
    are used as they are, not copied per block."""
    import pandas as pd

    rows, ranks = np.nonzero(result.indices >= 0)
    gallery = result.indices[rows, ranks]
    return pd.DataFrame({
        "query_index": rows + first_query,
        "query_path": np.asarray(query_paths, dtype=object)[rows + first_query],
        "rank": ranks + 1,
        "gallery_index": gallery,
        "gallery_path": np.asarray(gallery_paths, dtype=object)[gallery],
        "global_score": result.global_scores[rows, ranks],
        "raw_score": result.raw_scores[rows, ranks],
        "score": result.scores[rows, ranks],
    })
