"""The global ranking as a re-ranker that re-ranks nothing: the baseline row of every table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elvis_cli.model.reranker import Embedded, Fusion, Reranker
from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    from elvis_cli.features.store import DescriptorStore


class GlobalRanking(Reranker):
    name = "global"
    scores_pairs = False
    worth_caching = False

    def __init__(self) -> None:
        super().__init__(Fusion(lam=1.0, temperature=1.0))

    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        raise InputError("the global ranking embeds no image")

    def score(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        raise InputError("the global ranking scores no pair")

    def fuse(self, global_score: torch.Tensor, raw_score: torch.Tensor) -> torch.Tensor:
        return global_score.clone()

    def bytes_per_descriptor(self, descriptor_dim: int, dtype: torch.dtype) -> int:
        return 0

    def bytes_per_image(self, store: DescriptorStore, num_local: int | None = None) -> int:
        """The global descriptor only: no local row is read."""
        return store.global_bytes
