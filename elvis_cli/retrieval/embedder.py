"""Images of one feature store embedded by a re-ranker: the engine's per-image half.

Each image is read and embedded once per block of queries, not once per pair. Reads run in a
background thread one step ahead of the workers that embed them; rows travel as stored and are
converted by torch (into a reused per-thread buffer on CPU). With an embedding cache, images an
earlier run embedded are loaded instead; with `keep`, the last block's images stay embedded for
the next block or call (evaluate scores several shortlist sizes).
"""

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from elvis_cli.features.layout import META_COL, META_PADDING, META_ROW, NUM_META
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.reranker import Embedded, Reranker
from elvis_cli.retrieval.embedding_cache import EmbeddingCache
from elvis_cli.util.ordered import in_order

_BUFFERS = threading.local()  # each worker thread's conversion buffer, shared by the stores

@dataclass
class EmbeddedImages:
    """Embedded images; slot i is the i-th image of the rows asked for."""

    embedded: Embedded  # descriptors (N, K, d), gains (N, K), mask (N, K), positions or None
    padded: np.ndarray  # (N,) whether an image has any padding, known without a device sync

    @staticmethod
    def of(descriptors: torch.Tensor, gains: torch.Tensor, padding: np.ndarray,
           device: torch.device, positions: torch.Tensor | None = None) -> "EmbeddedImages":
        """From embeddings and the host's (N, K) padding flags, sent along as the mask."""
        return EmbeddedImages(Embedded(descriptors, gains, torch.from_numpy(padding).to(device),
                                       positions), padding.any(axis=1))

    def take(self, slots: np.ndarray, device: torch.device) -> Embedded:
        if len(slots) == 1:  # the CPU case: views, no copies
            index: slice | torch.Tensor = slice(slots[0], slots[0] + 1)
        else:
            index = torch.from_numpy(slots).to(device)
        embedded = self.embedded
        mask = embedded.mask[index] if self.padded[slots].any() else None
        return Embedded(embedded.descriptors[index], embedded.gains[index], mask,
                        _indexed(embedded.positions, index))

    def subset(self, slots: np.ndarray) -> "EmbeddedImages":
        index = torch.from_numpy(slots).to(self.embedded.descriptors.device)
        embedded = self.embedded
        return EmbeddedImages(Embedded(embedded.descriptors[index], embedded.gains[index],
                                       embedded.mask[index], _indexed(embedded.positions, index)),
                              self.padded[slots])

    @staticmethod
    def join(parts: list["EmbeddedImages"]) -> "EmbeddedImages":
        if len(parts) == 1:
            return parts[0]
        names = ("descriptors", "gains", "mask")
        if parts[0].embedded.positions is not None:
            names += ("positions",)
        return EmbeddedImages(Embedded(*(torch.cat([getattr(p.embedded, name) for p in parts])
                                         for name in names)),
                              np.concatenate([p.padded for p in parts]))


@dataclass
class _Read:
    """Rows of images read from the store, as stored (pinned when bound for CUDA)."""

    rows: np.ndarray  # (n,) image indices in the store
    stored: torch.Tensor  # (n, K, 5 + D) metadata and descriptors
    padding: np.ndarray  # (n, K) True where a slot is padding


class ImageEmbedder:
    """Embeddings of a store's images by `reranker` (already on `device`), `dtype` being the
    embedded descriptors' precision; `workers` threads of the pool share each read."""

    def __init__(self, reranker: Reranker, store: FeatureStore, *, device: torch.device,
                 dtype: torch.dtype, num_local: int | None, read_images: int, workers: int,
                 cache_root: Path | None = None, keep: bool = False) -> None:
        self.reranker, self.store = reranker, store
        self.device, self.dtype = device, dtype
        self.num_local = store.num_local if num_local is None else min(num_local,
                                                                       store.num_local)
        self.read_images, self.workers, self.keep = read_images, workers, keep
        self._kept_ids = np.zeros(0, dtype=np.int64)
        self._kept: EmbeddedImages | None = None
        self.cache = (EmbeddingCache(cache_root, store, reranker, self.num_local, dtype)
                      if cache_root is not None and reranker.worth_caching
                      and not store.temporary else None)

    @contextmanager
    def blocks(self, row_sets: list[np.ndarray], pool: ThreadPoolExecutor
               ) -> Iterator[Iterator[EmbeddedImages]]:
        """The embeddings of each of `row_sets` (sorted) in turn, computed as they are taken:
        every read is queued at once and runs one step ahead of the embedding."""
        plan, kept = [], self._kept_ids
        for rows in row_sets:
            missing = np.setdiff1d(rows, kept) if self.keep else rows  # not kept from before
            plan.append((rows, missing, self.uncached(missing)))
            kept = rows
        with ThreadPoolExecutor(max_workers=1) as reader:
            reads = in_order((partial(self._read, part) for *_, unread in plan
                              for part in self._parts(unread)), reader, window=2)
            with closing(reads):
                yield (self._block(pool, reads, *step) for step in plan)

    def bytes_per_image(self) -> int:
        """What one image's embedding holds in memory and in the embedding cache."""
        return self.num_local * self.reranker.bytes_per_descriptor(self.store.local_dim,
                                                                   self.dtype)

    def _block(self, pool: ThreadPoolExecutor, reads: Iterator[_Read], rows: np.ndarray,
               missing: np.ndarray, unread: np.ndarray) -> EmbeddedImages:
        images = self._cached_or_embedded(pool, reads, missing, unread)
        if self.keep:
            images = self._with_kept(rows, missing, images)
            self._kept_ids, self._kept = rows, images
        return images

    def _with_kept(self, needed: np.ndarray, missing: np.ndarray,
                   new: EmbeddedImages) -> EmbeddedImages:
        """Rows of `needed` (sorted): `new` holds `missing`, the kept block holds the rest."""
        kept_rows = np.setdiff1d(needed, missing)
        if len(kept_rows) == len(self._kept_ids):  # every kept row, in order: no copy
            kept = self._kept
        else:
            kept = (self._kept.subset(np.searchsorted(self._kept_ids, kept_rows))
                    if len(kept_rows) else None)
        return _merged([kept_rows, missing], [kept, new])

    def uncached(self, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` to read and embed: all, but for those the embedding cache holds."""
        return rows if self.cache is None else rows[~self.cache.holds(rows)]

    def _cached_or_embedded(self, pool: ThreadPoolExecutor, reads: Iterator[_Read],
                            rows: np.ndarray, unread: np.ndarray) -> EmbeddedImages:
        """Embeddings of `rows` (sorted): `unread` ones embedded from the reader's rows, the
        others loaded from the embedding cache, which then keeps the new ones."""
        new = self._embed(pool, reads, len(unread))
        cache = self.cache
        if cache is None:
            return new
        cache.add(unread, new.embedded)
        cached = np.setdiff1d(rows, unread)
        if not len(cached):
            return new
        good, loaded, damaged = cache.load(cached)
        redone = self._embed(pool, iter([self._read(part)  # parts found damaged
                                         for part in self._parts(damaged)]), len(damaged))
        cache.add(damaged, redone.embedded)
        if loaded is not None:
            descriptors, gains, padding = loaded
            loaded = EmbeddedImages.of(descriptors.to(self.device, self.dtype),
                                       gains.to(self.device), padding, self.device)
        return _merged([good, damaged, unread], [loaded, redone, new])

    def _parts(self, rows: np.ndarray) -> list[np.ndarray]:
        step = self.read_images
        return [rows[start : start + step] for start in range(0, len(rows), step)]

    def _read(self, rows: np.ndarray) -> _Read:
        """Rows as stored (float16 in our files), converted later by torch on the workers or
        the GPU: HDF5's own float16 conversion is several times slower."""
        stored = self.store.read_local(rows, self.num_local, dtype=None, check_finite=False)
        padding = stored[..., META_PADDING] > 0.5
        tensor = torch.from_numpy(stored)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return _Read(rows, tensor, padding)

    def _embed(self, pool: ThreadPoolExecutor, reads: Iterator[_Read],
               count: int) -> EmbeddedImages:
        """Embeddings of the next `count` images that the reader delivers.

        Each read is split among the workers, and the next read's pieces are queued before this
        one's are done, so that no worker waits for the others; at most two reads are in
        flight, so memory stays bounded by read_images.
        """
        parts, masks, pending = [], [], deque()
        for _ in range(-(-count // self.read_images)):
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
            return EmbeddedImages(Embedded(empty, empty, empty), np.zeros(0, dtype=bool))
        positions = (torch.cat([part.positions for part in parts])
                     if self.reranker.uses_positions else None)
        return EmbeddedImages.of(torch.cat([part.descriptors for part in parts]),
                                 torch.cat([part.gains for part in parts]),
                                 np.concatenate(masks), self.device, positions)

    @torch.inference_mode()  # grad mode is per thread: workers need their own
    def _embed_part(self, read: _Read, span: tuple[int, int]) -> Embedded:
        """Embed images span[0]..span[1]-1 of a read, padding zeroed (released files may hold
        anything there). A NaN or inf descriptor leaves its image's embedding non-finite, which
        is checked here, on 6x fewer numbers than the stored rows. Re-rankers that use
        positions get each slot's stored row and column beside its embedding."""
        start, stop = span
        if self.device.type == "cpu":
            stored = read.stored[start:stop]
            descriptors = self._float32_buffer(stored[..., NUM_META:].shape).copy_(
                stored[..., NUM_META:])
        else:  # the contiguous pinned rows travel as stored; sliced and converted on the GPU
            stored = read.stored[start:stop].to(self.device, non_blocking=True)
            descriptors = stored[..., NUM_META:].float()
        padding = read.padding[start:stop]
        if padding.any():
            descriptors.masked_fill_(torch.from_numpy(padding).to(self.device)[..., None], 0.0)
        embedded = self.reranker.embed(descriptors)
        bad = ~embedded.descriptors.sum(dim=(1, 2)).isfinite()
        if bad.any():
            self.store.raise_if_not_finite(bad.cpu().numpy(), read.rows[start:stop])
        positions = (stored[..., META_ROW : META_COL + 1].float()
                     if self.reranker.uses_positions else None)
        return Embedded(embedded.descriptors.to(self.dtype), embedded.gains, positions=positions)

    @staticmethod
    def _float32_buffer(shape: torch.Size) -> torch.Tensor:
        """This thread's conversion buffer, reused: a fresh tensor per read costs the kernel's
        page faults on every call, more than the conversion itself. embed copies out of it."""
        size = shape.numel()
        buffer = getattr(_BUFFERS, "float32", None)
        if buffer is None or buffer.numel() < size:
            buffer = _BUFFERS.float32 = torch.empty(size)
        return buffer[:size].view(shape)


def _indexed(values: torch.Tensor | None, index: slice | torch.Tensor) -> torch.Tensor | None:
    """values[index], or None for a re-ranker that keeps none (positions)."""
    return None if values is None else values[index]


def _merged(rows: list[np.ndarray], parts: list[EmbeddedImages | None]) -> EmbeddedImages:
    """One EmbeddedImages in the sorted order of all `rows`; parts[i] holds rows[i] in order
    (None or anything where rows[i] is empty)."""
    present = [(part_rows, part) for part_rows, part in zip(rows, parts, strict=True)
               if len(part_rows)]
    if len(present) <= 1:
        return present[0][1] if present else parts[-1]
    order = np.argsort(np.concatenate([part_rows for part_rows, _ in present]))
    return EmbeddedImages.join([part for _, part in present]).subset(order)
