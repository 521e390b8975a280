"""What every re-ranker is to the engine and the evaluation, and how its scores make a ranking.

A re-ranker prepares each image once (`embed`: the engine keeps the result for every pair the
image takes part in, and on disk with an embedding cache), scores (query, gallery) pairs of
prepared images (`score`), and fuses its raw score with the global similarity (`fuse`). Global
ranking, ELViS, chamfer and spatial verification are implementations (registry.RERANKERS); a
new one needs no change to the engine. One that needs where its descriptors lie (spatial
verification) says so with `uses_positions`, and `score` then gets the stored positions too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from elvis_cli.model.fusion import Fusion

# local descriptors per image a re-ranker reads when a run names no count: the paper's, ELViS
# on the first 600 of the 700 stored (ELVIS_SPEC §3); files that store fewer give all theirs
PAPER_NUM_LOCAL = 600

if TYPE_CHECKING:
    from elvis_cli.features.store import DescriptorStore, FeatureStore
    from elvis_cli.model.checkpoints import Checkpoint


@dataclass
class Embedded:
    """Per-image part of a re-ranker, computed once per image and reused for every pair."""

    descriptors: torch.Tensor  # (B, m, d), e.g. ELViS's projection, rows L2-normalised
    gains: torch.Tensor  # (B, m) per-descriptor values (ELViS: dustbin gains in [-1, 1])
    mask: torch.Tensor | None = None  # (B, m) True where the slot is padding
    # (B, m, 2) each slot's stored row, column (features/layout.py), set by the engine for
    # re-rankers that use positions; None for the others
    positions: torch.Tensor | None = None


class Reranker(nn.Module, ABC):
    """One way of re-ranking a shortlist; a module, so the engine can move it to its device."""

    name: ClassVar[str]  # what `--model` takes and the results table shows
    scores_pairs: ClassVar[bool] = True  # False: the global ranking is kept as it is
    tunable_fusion: ClassVar[bool] = False  # lam/temp overrides and the fusion grid apply
    worth_caching: ClassVar[bool] = True  # its embeddings are worth an embedding cache
    # True: the engine hands `score` each slot's stored position beside its embedding
    # (Embedded.positions); the embedding cache keeps no positions, so such a re-ranker is
    # not worth_caching
    uses_positions: ClassVar[bool] = False

    def __init__(self, fusion: Fusion, label: str | None = None,
                 num_local: int | None = PAPER_NUM_LOCAL) -> None:
        super().__init__()
        self.fusion = fusion
        self.label = label or self.name  # what was loaded (a checkpoint's name), for tables
        # its own count of local descriptors per image (None: all stored), for runs that
        # name none: a checkpoint's accuracy and speed were measured at one
        self.num_local = num_local

    def local_count(self, requested: int | None) -> int | None:
        """The local descriptors per image a run reads: `requested`, else its own count."""
        return self.num_local if requested is None else requested

    @classmethod
    def load(cls, features: FeatureStore, checkpoint: str | Path | Checkpoint | None = None,
             lam: float | None = None, temperature: float | None = None) -> Reranker:
        """The re-ranker for these features; only a trained one uses the checkpoint (None: the
        one matching the features) and the fusion overrides (None: its own)."""
        return cls()

    @abstractmethod
    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        """Per-image work on (B, m, D) descriptors, padding zeroed."""

    @abstractmethod
    def score(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        """(B,) raw scores of B pairs; a single (1, m, d) query broadcasts over the gallery."""

    def fuse(self, global_score: torch.Tensor, raw_score: torch.Tensor) -> torch.Tensor:
        """The final score of a pair from its global similarity and raw score."""
        return self.fusion(global_score, raw_score)

    def bytes_per_image(self, store: DescriptorStore, num_local: int | None = None) -> int:
        """Bytes per gallery image this method needs, as stored in `store`: the global
        descriptor (every method shortlists with it) and the first `num_local` local rows it
        reads (None: all stored), metadata included. An embedding cache comes on top
        (`bytes_per_descriptor`)."""
        used = store.num_local if num_local is None else min(num_local, store.num_local)
        return store.global_bytes + used * store.local_row_bytes

    @abstractmethod
    def bytes_per_descriptor(self, descriptor_dim: int, dtype: torch.dtype) -> int:
        """Memory and embedding-cache bytes of one embedded descriptor of `descriptor_dim`
        input dimensions, its embedding stored in `dtype`."""


@dataclass
class RerankResult:
    """Each query's list in final order: re-ranked head, then the tail in global order."""

    indices: np.ndarray  # (Q, L) gallery rows; -1 pads
    global_scores: np.ndarray  # (Q, L)
    raw_scores: np.ndarray  # (Q, L) raw score; NaN where not re-ranked
    scores: np.ndarray  # (Q, L) fused score; NaN where not re-ranked


# Scores fused per call: whole vectors of every x86 CPU's widest unrolled loop (64 floats), and
# fewer than torch splits among threads (its grain size, 32768), so that each call runs every
# element through the same vector code.
FUSED_PER_CALL = 16384
VECTOR_FLOATS = 64


def _fused_in_whole_vectors(fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            global_scores: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """`fuse` of (Q, L) scores, each element's bits independent of Q and of its place:
    torch's vectorised sigmoid rounds otherwise than its scalar loop over an array's last
    elements, which would make a score depend on how the queries were split into blocks (or
    among threads). The scores are padded to whole vectors and fused a slice at a time."""
    count = global_scores.numel()
    padded = -(-count // VECTOR_FLOATS) * VECTOR_FLOATS
    flat = [torch.zeros(padded, dtype=values.dtype) for values in (global_scores, raw)]
    for whole, values in zip(flat, (global_scores, raw), strict=True):
        whole[:count] = values.reshape(-1)
    fused = [fuse(flat[0][start : start + FUSED_PER_CALL], flat[1][start : start + FUSED_PER_CALL])
             for start in range(0, padded, FUSED_PER_CALL)]
    return torch.cat(fused)[:count].reshape(global_scores.shape) if fused else global_scores.clone()


def fuse_and_sort(indices: np.ndarray, global_scores: np.ndarray, raw: np.ndarray, top: int,
                  fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> RerankResult:
    """Fuse the first `top` entries of each list (`fuse`: a Fusion or Reranker.fuse) and
    re-sort them; the rest keep their order. A fused score's bits depend only on its two
    inputs (`_fused_in_whole_vectors`), so `rerank`, `evaluate` and training's validation
    rank a pair alike however many lists they fuse at once."""
    head = min(top, indices.shape[1])
    raw = raw.copy()
    raw[:, head:] = np.nan
    fused = _fused_in_whole_vectors(fuse, torch.from_numpy(global_scores),
                                    torch.from_numpy(raw)).numpy()
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
