"""Chamfer similarity: the training-free floor any learned re-ranker has to beat.

score = mean over the query's descriptors of their best cosine match in the gallery image. Its
shortlist is re-sorted by that score alone: its fusion (lam 0, temperature 1) is its definition,
not a setting.
"""

import torch
import torch.nn.functional as F

from elvis_cli.model.reranker import Embedded, Fusion, Reranker


class Chamfer(Reranker):
    name = "chamfer"
    # its embedding is a normalisation: cheaper to redo than to load, and as large as the input
    worth_caching = False

    def __init__(self) -> None:
        super().__init__(Fusion(lam=0.0, temperature=1.0))

    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        """L2-normalised (B, m, D) descriptors; no learned part, so no gains (zeros)."""
        normalised = F.normalize(descriptors.float(), dim=-1)
        return Embedded(normalised, normalised.new_zeros(normalised.shape[:2]), mask)

    def score(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        """(B,) mean best cosine; a (1, m, D) query broadcasts over B gallery images.

        Padded gallery slots never win a match; padded query slots do not count in the mean;
        a pair with no real descriptor on either side scores 0.
        """
        similarity = torch.matmul(src.descriptors, tgt.descriptors.transpose(-1, -2))
        if tgt.mask is not None:
            similarity = similarity.masked_fill(tgt.mask.unsqueeze(1), -torch.inf)
        best = similarity.amax(dim=2)
        valid = torch.isfinite(best)
        if src.mask is not None:
            valid &= ~src.mask.expand_as(best)
        total = torch.where(valid, best, torch.zeros_like(best)).sum(dim=1)
        return total / valid.sum(dim=1).clamp(min=1)

    def bytes_per_descriptor(self, descriptor_dim: int, dtype: torch.dtype) -> int:
        """The normalised descriptor, a (zero) gain and a padding flag."""
        return descriptor_dim * dtype.itemsize + 4 + 1
