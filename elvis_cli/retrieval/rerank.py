"""The re-ranking engine: ELViS scores for shortlisted pairs, fused with global similarity.

Per-image work (projection, normalisation, dustbin gains) is done once per image and kept for
every pair that image takes part in; queries are processed in blocks whose gallery images fit
a fixed cache, so memory is bounded by options, not by the gallery size.
"""

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from elvis_cli.features.layout import META_PADDING, NUM_META
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.checkpoints import Fusion
from elvis_cli.model.elvis import Elvis, Embedded
from elvis_cli.retrieval.embedding_cache import EmbeddingCache
from elvis_cli.retrieval.shortlist import Shortlist
from elvis_cli.util.devices import resolve_device
from elvis_cli.util.errors import InputError

T = TypeVar("T")

# Pairs a CPU worker scores per call: the model computes them one at a time, so this only
# amortises per-call work (Python, gathering the chunk's embeddings) and never changes a bit.
CPU_PAIRS_PER_CALL = 32


@dataclass
class RerankConfig:
    shortlist: int = 100  # how many of each query's list are scored by ELViS
    num_local: int | None = 600  # first descriptors per image used (ELViS: 600 of the 700 stored);
    # files that store fewer use all of theirs
    batch_size: int = 100  # pairs scored at once on CUDA (CPU: a fixed CPU_PAIRS_PER_CALL, so
    # that CPU scores are bitwise the same for every batch size)
    cache_images: int = 2048  # gallery images of a block of queries, embedded at once (the last
    # block's stay for the next block or call, so up to twice this is held while one is built)
    read_images: int = 16  # images per HDF5 read; reads run one step ahead of compute (16 was
    # faster than 64 in benchmarks/rerank_speed.py: smaller conversions, workers start sooner)
    device: str = "auto"
    workers: int | None = None  # CPU threads scoring pairs side by side; default: torch's threads
    embedding_cache: Path | None = None  # a folder that keeps images' embeddings between runs
    # (EmbeddingCache), for galleries re-ranked again and again
    precision: str = "auto"  # of the similarity product: float32, or float16 (CUDA only: about
    # 1e-4 off the float32 raw score, spec tolerance 1e-3); auto: float16 on CUDA, else float32

    def __post_init__(self) -> None:
        for name in ("shortlist", "batch_size", "cache_images", "read_images"):
            value = getattr(self, name)
            if value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.precision not in ("auto", "float32", "float16"):
            raise InputError(f"precision must be auto, float32 or float16, got {self.precision!r}")
        for name in ("num_local", "workers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")


@dataclass
class RerankResult:
    """Each query's list in final order: re-ranked head, then the tail in global order."""

    indices: np.ndarray  # (Q, L) gallery rows; -1 pads
    global_scores: np.ndarray  # (Q, L)
    raw_scores: np.ndarray  # (Q, L) raw ELViS score; NaN where not re-ranked
    scores: np.ndarray  # (Q, L) fused score; NaN where not re-ranked


@dataclass
class _Images:
    """Embedded images (the model's per-image part); slot i is the i-th image read."""

    embedded: Embedded  # descriptors (N, K, d), gains (N, K), mask (N, K)
    padded: np.ndarray  # (N,) whether an image has any padding, known without a device sync

    @staticmethod
    def of(descriptors: torch.Tensor, gains: torch.Tensor, padding: np.ndarray,
           device: torch.device) -> "_Images":
        """From embeddings and the host's (N, K) padding flags, sent along as the mask."""
        return _Images(Embedded(descriptors, gains, torch.from_numpy(padding).to(device)),
                       padding.any(axis=1))

    def take(self, slots: np.ndarray, device: torch.device) -> Embedded:
        if len(slots) == 1:  # the CPU case: views, no copies
            index: slice | torch.Tensor = slice(slots[0], slots[0] + 1)
        else:
            index = torch.from_numpy(slots).to(device)
        embedded = self.embedded
        mask = embedded.mask[index] if self.padded[slots].any() else None
        return Embedded(embedded.descriptors[index], embedded.gains[index], mask)

    def subset(self, slots: np.ndarray) -> "_Images":
        index = torch.from_numpy(slots).to(self.embedded.descriptors.device)
        embedded = self.embedded
        return _Images(Embedded(embedded.descriptors[index], embedded.gains[index],
                                embedded.mask[index]), self.padded[slots])

    @staticmethod
    def join(parts: list["_Images"]) -> "_Images":
        if len(parts) == 1:
            return parts[0]
        return _Images(Embedded(*(torch.cat([getattr(p.embedded, name) for p in parts])
                                  for name in ("descriptors", "gains", "mask"))),
                       np.concatenate([p.padded for p in parts]))


@dataclass
class _Read:
    """Rows of images read from a store, as stored (pinned when bound for CUDA)."""

    store: FeatureStore
    rows: np.ndarray  # (n,) image indices in the store
    stored: torch.Tensor  # (n, K, 5 + D) metadata and descriptors
    padding: np.ndarray  # (n, K) True where a slot is padding


class PairScorer:
    """Raw scores of (query, gallery) pairs read from two feature stores, by ELViS or any module
    with its interface (`embed` once per image, `score` per pair; the chamfer baseline).

    Per image, projection and dustbin gains are computed once. Pairs of a block of queries are
    scored in chunks, across queries when shortlists are short: on CPU each worker thread takes
    CPU_PAIRS_PER_CALL pairs (the model keeps one pair's kernel in cache at a time); on CUDA a
    chunk is `batch_size` pairs, with no host sync per pair.
    HDF5 reads run in a background thread one step ahead of compute.
    """

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
        cpu = self.device.type == "cpu"
        if cpu and self.config.precision == "float16":
            raise InputError("float16 precision needs a CUDA device (no float16 GEMM with "
                             "float32 results on CPU)")
        half = self.config.precision == "float16" or (self.config.precision == "auto" and not cpu)
        self.embedded_dtype = torch.float16 if half else torch.float32
        self.workers = (self.config.workers or torch.get_num_threads()) if cpu else 1
        self.pairs_per_call = CPU_PAIRS_PER_CALL if cpu else self.config.batch_size
        # wall time per phase over all calls: reads overlap both, so they show only as waits
        self.seconds = {"read and embed": 0.0, "score": 0.0}
        # the last block's gallery rows stay embedded for the next block or call (evaluate
        # scores several shortlist sizes); a changed model needs a new PairScorer
        self._kept_ids = np.zeros(0, dtype=np.int64)
        self._kept: _Images | None = None
        self._buffers = threading.local()
        root = self.config.embedding_cache
        self._caches = {} if root is None else {
            id(store): EmbeddingCache(root, store, self.model, self._num_local(store),
                                      self.embedded_dtype) for store in (queries, gallery)}

    @torch.inference_mode()
    def score(self, candidates: np.ndarray, progress=None) -> np.ndarray:
        """Raw scores (Q, L) for gallery rows `candidates` (Q, L) of queries 0..Q-1; -1 → NaN."""
        raw = np.full(candidates.shape, np.nan, dtype=np.float32)
        blocks, kept = [], self._kept_ids
        for queries in self._query_blocks(candidates):
            needed = _unique_rows(candidates[queries])
            missing = np.setdiff1d(needed, kept)  # not embedded for the last block
            blocks.append((queries, needed, missing, self._unread(self.queries, queries),
                           self._unread(self.gallery, missing)))
            kept = needed
        plan = [(store, rows) for *_, query_reads, gallery_reads in blocks
                for store, rows in ((self.queries, query_reads), (self.gallery, gallery_reads))]
        with self._pipeline(plan) as (reads, pool):
            for queries, needed, missing, query_reads, gallery_reads in blocks:
                started = time.perf_counter()
                query_images = self._images(pool, reads, self.queries, queries, query_reads)
                gallery_images = self._with_kept(needed, missing, self._images(
                    pool, reads, self.gallery, missing, gallery_reads))
                self._kept_ids, self._kept = needed, gallery_images
                embedded = time.perf_counter()
                pairs = _block_pairs(candidates[queries], needed)
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

    @torch.inference_mode()
    def cache_embeddings(self, store: FeatureStore) -> int:
        """Embed every image of `store` (this scorer's queries or gallery) that the embedding
        cache lacks, and keep them there, `cache_images` at a time; returns how many. This is
        how `elvis extract --embedding-cache` spares the first re-ranking run its embedding."""
        if id(store) not in self._caches:
            raise InputError("cache_embeddings needs RerankConfig(embedding_cache=...)")
        unread = self._unread(store, np.arange(store.num_images))
        blocks = [unread[start : start + self.config.cache_images]
                  for start in range(0, len(unread), self.config.cache_images)]
        with self._pipeline([(store, block) for block in blocks]) as (reads, pool):
            for block in blocks:
                self._images(pool, reads, store, block, block)
        return len(unread)

    @contextmanager
    def _pipeline(self, plan: list[tuple[FeatureStore, np.ndarray]]
                  ) -> Iterator[tuple[Iterator[_Read], ThreadPoolExecutor]]:
        """The reads of `plan`'s rows in order, `read_images` at a time and one step ahead of
        compute, and the worker threads that embed and score them."""
        reads = _read_ahead([partial(self._read, store, part)
                             for store, rows in plan for part in self._parts(rows)])
        with closing(reads), _workers(self.workers) as pool:
            yield reads, pool

    @torch.inference_mode()  # grad mode is per thread: workers need their own
    def _score_chunk(self, queries: _Images, gallery: _Images, chunk: np.ndarray
                     ) -> torch.Tensor:
        query_slots = chunk[0]
        if (query_slots == query_slots[0]).all():  # one query: broadcast it, no copies
            query_slots = query_slots[:1]
        return self.model.score(queries.take(query_slots, self.device),
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

    def _with_kept(self, needed: np.ndarray, missing: np.ndarray, new: _Images) -> _Images:
        """Rows of `needed` (sorted): `new` holds `missing`, the kept block holds the rest."""
        kept_rows = np.setdiff1d(needed, missing)
        kept = (self._kept.subset(np.searchsorted(self._kept_ids, kept_rows)) if len(kept_rows)
                else None)
        return _merged([kept_rows, missing], [kept, new])

    def _unread(self, store: FeatureStore, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` to read and embed: all, but for those the embedding cache holds."""
        cache = self._caches.get(id(store))
        return rows if cache is None else rows[~cache.holds(rows)]

    def _images(self, pool: ThreadPoolExecutor, reads: Iterator[_Read], store: FeatureStore,
                rows: np.ndarray, unread: np.ndarray) -> _Images:
        """Embeddings of `rows` (sorted): `unread` ones embedded from the reader's rows, the
        others loaded from the embedding cache, which then keeps the new ones."""
        new = self._embed(pool, reads, len(unread))
        cache = self._caches.get(id(store))
        if cache is None:
            return new
        cache.add(unread, new.embedded)
        cached = np.setdiff1d(rows, unread)
        if not len(cached):
            return new
        good, loaded, damaged = cache.load(cached)
        redone = self._embed(pool, iter([self._read(store, part)  # parts found damaged
                                         for part in self._parts(damaged)]), len(damaged))
        cache.add(damaged, redone.embedded)
        if loaded is not None:
            descriptors, gains, padding = loaded
            loaded = _Images.of(descriptors.to(self.device, self.embedded_dtype),
                                gains.to(self.device), padding, self.device)
        return _merged([good, damaged, unread], [loaded, redone, new])

    def _parts(self, rows: np.ndarray) -> list[np.ndarray]:
        step = self.config.read_images
        return [rows[start : start + step] for start in range(0, len(rows), step)]

    def _num_local(self, store: FeatureStore) -> int:
        wanted = self.config.num_local
        return store.num_local if wanted is None else min(wanted, store.num_local)

    def _read(self, store: FeatureStore, rows: np.ndarray) -> _Read:
        """Rows as stored (float16 in our files), converted later by torch on the workers or
        the GPU: HDF5's own float16 conversion is several times slower."""
        stored = store.read_local(rows, self._num_local(store), dtype=None, check_finite=False)
        padding = stored[..., META_PADDING] > 0.5
        tensor = torch.from_numpy(stored)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return _Read(store, rows, tensor, padding)

    def _embed(self, pool: ThreadPoolExecutor, reads: Iterator[_Read], count: int) -> _Images:
        """Embeddings of the next `count` images that the reader delivers.

        Each read is split among the workers, and the next read's pieces are queued before this
        one's are done, so that no worker waits for the others; at most two reads are in
        flight, so memory stays bounded by read_images.
        """
        parts, masks, pending = [], [], deque()
        for _ in range(-(-count // self.config.read_images)):
            read = next(reads)
            masks.append(read.padding)
            pieces = np.array_split(np.arange(len(read.rows)), min(self.workers, len(read.rows)))
            pending.extend(pool.submit(self._embed_part, read, (piece[0], piece[-1] + 1))
                           for piece in pieces)
            while len(pending) > 2 * len(pieces):
                parts.append(pending.popleft().result())
        parts += [future.result() for future in pending]
        if not parts:
            empty = torch.empty(0)
            return _Images(Embedded(empty, empty, empty), np.zeros(0, dtype=bool))
        return _Images.of(torch.cat([part.descriptors for part in parts]),
                          torch.cat([part.gains for part in parts]), np.concatenate(masks),
                          self.device)

    @torch.inference_mode()
    def _embed_part(self, read: _Read, span: tuple[int, int]) -> Embedded:
        """Embed images span[0]..span[1]-1 of a read, padding zeroed (released files may hold
        anything there). A NaN or inf descriptor leaves its image's embedding non-finite, which
        is checked here, on 6x fewer numbers than the stored rows."""
        start, stop = span
        if self.device.type == "cpu":
            stored = read.stored[start:stop, :, NUM_META:]
            descriptors = self._float32_buffer(stored.shape).copy_(stored)
        else:  # the contiguous pinned rows travel as stored; sliced and converted on the GPU
            stored = read.stored[start:stop].to(self.device, non_blocking=True)
            descriptors = stored[..., NUM_META:].float()
        padding = read.padding[start:stop]
        if padding.any():
            descriptors.masked_fill_(torch.from_numpy(padding).to(self.device)[..., None], 0.0)
        embedded = self.model.embed(descriptors)
        bad = ~embedded.descriptors.sum(dim=(1, 2)).isfinite()
        if bad.any():
            read.store.raise_if_not_finite(bad.cpu().numpy(), read.rows[start:stop])
        return Embedded(embedded.descriptors.to(self.embedded_dtype), embedded.gains)

    def _float32_buffer(self, shape: torch.Size) -> torch.Tensor:
        """This thread's conversion buffer, reused: a fresh tensor per read costs the kernel's
        page faults on every call, more than the conversion itself. embed copies out of it."""
        size = shape.numel()
        buffer = getattr(self._buffers, "float32", None)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers.float32 = torch.empty(size)
        return buffer[:size].view(shape)


def _merged(rows: list[np.ndarray], parts: list[_Images | None]) -> _Images:
    """One _Images in the sorted order of all `rows`; parts[i] holds rows[i] in order (None or
    anything where rows[i] is empty)."""
    present = [(part_rows, part) for part_rows, part in zip(rows, parts, strict=True)
               if len(part_rows)]
    if len(present) <= 1:
        return present[0][1] if present else parts[-1]
    order = np.argsort(np.concatenate([part_rows for part_rows, _ in present]))
    return _Images.join([part for _, part in present]).subset(order)


def _report(progress: Callable[[], None] | None, reported: int, finished: int) -> int:
    """Call progress once per query in [reported, finished); returns the new count."""
    for _ in range(reported, finished):
        if progress is not None:
            progress()
    return max(reported, finished)


def _unique_rows(candidates: np.ndarray) -> np.ndarray:
    rows = np.unique(candidates)
    return rows[rows >= 0]


def _block_pairs(candidates: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """(3, P) query slot, gallery slot and list position of every valid pair, query-major."""
    query_slots, positions = np.nonzero(candidates >= 0)
    gallery_slots = np.searchsorted(needed, candidates[query_slots, positions])
    return np.stack([query_slots, gallery_slots, positions])


def _read_ahead(reads: list[Callable[[], T]], depth: int = 1) -> Iterator[T]:
    """Results of `reads` in order, computed in a background thread `depth` steps ahead."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending: deque[Future[T]] = deque()
        for read in reads:
            pending.append(reader.submit(read))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def _workers(count: int) -> Iterator[ThreadPoolExecutor]:
    """Threads that score side by side, each single-threaded inside torch.

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
