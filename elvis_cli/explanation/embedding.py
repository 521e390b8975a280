"""One image of a features file embedded by ELViS as the re-ranking engine embeds it: the first
`num_local` stored rows, padding zeroed and masked, projected and given their dustbin gains.

Shared by the pair explanation and the checkpoint curves, so that both see exactly the numbers
`elvis rerank` scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from elvis_cli.features.layout import META_COL, META_PADDING, META_ROW, NUM_META
from elvis_cli.features.store import DescriptorStore
from elvis_cli.model.elvis import Elvis
from elvis_cli.model.reranker import Embedded


@dataclass
class EmbeddedImage:
    """An image's ELViS embedding (1, k, d) and where its k descriptor slots lie."""

    embedded: Embedded  # its mask is None when no slot is padding, as the engine passes it
    positions: np.ndarray  # (k, 2) row, column of each slot as fractions of the image
    padding: np.ndarray  # (k,) True for padding slots

    @property
    def gains(self) -> np.ndarray:
        """(k,) the dustbin gain h of each slot."""
        return self.embedded.gains[0].float().cpu().numpy()


def embed_row(model: Elvis, store: DescriptorStore, row: int, num_local: int | None,
              device: torch.device) -> EmbeddedImage:
    """Image `row` of `store` embedded by `model` (on `device`), from its first `num_local`
    stored descriptors (None: all)."""
    count = store.num_local if num_local is None else min(num_local, store.num_local)
    stored = store.read_local([row], count)[0]
    padding = stored[:, META_PADDING] > 0.5
    descriptors = torch.from_numpy(stored[None, :, NUM_META:]).to(device)
    mask = torch.from_numpy(padding[None]).to(device) if padding.any() else None
    if mask is not None:
        descriptors.masked_fill_(mask[..., None], 0.0)
    with torch.inference_mode():
        embedded = model.embed(descriptors, mask)
    return EmbeddedImage(embedded, stored[:, [META_ROW, META_COL]].astype(np.float64), padding)
