"""A round's views as features: the frozen backbone runs once over them, batched, and the
features stay in memory for every step of the round; raw ELViS scores of pairs of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from elvis_cli.backbones import Backbone
from elvis_cli.backbones.base import Inputs, batch_inputs, input_shape
from elvis_cli.features.layout import META_PADDING
from elvis_cli.model.elvis import Elvis
from elvis_cli.training.photos import PhotoSet
from elvis_cli.util.batching import batches_by_shape
from elvis_cli.util.errors import InputError


@dataclass
class ViewPool:
    """Features of rendered views, kept in memory for a round (local ones in float16)."""

    global_desc: torch.Tensor  # (N, Dg) float32, L2-normalised
    local_desc: torch.Tensor  # (N, K, D) float16
    padding: torch.Tensor  # (N, K) bool
    photo: np.ndarray  # (N,) index into the PhotoSet
    instance: np.ndarray  # (N,)
    backdrop: np.ndarray  # (N,) instance of the photo a view was pasted into, -1 for none

    def __len__(self) -> int:
        return len(self.photo)

    def related(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Whether two views share content of some instance (as object or as backdrop): such
        pairs are neither positives nor negatives, so they are never drawn or scored."""
        a_in = (self.instance[rows], self.backdrop[rows])
        b_in = (self.instance[others], self.backdrop[others])
        shared = np.zeros(np.broadcast_shapes(a_in[0].shape, b_in[0].shape), dtype=bool)
        for a in a_in:
            for b in b_in:
                shared |= (a == b) & (a >= 0)
        return shared

    def local(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rows)
        return (self.local_desc[index].to(device, torch.float32), self.padding[index].to(device))


@torch.inference_mode()
def extract_pool(
    backbone: Backbone,
    views: Iterator[tuple[int, np.ndarray, int]],
    photos: PhotoSet,
    num_local: int,
    batch_size: int,
    device: torch.device,
    advance: Callable[[], None] = lambda: None,
) -> ViewPool:
    """Run the backbone once over a stream of views, batching views of equal input shape
    (batches_by_shape). No cap on views waiting for company, as training always had: a cap
    would regroup batches, which can change the features' last bits on CPU."""
    results: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    photo_of, backdrop_of = [], []

    def run(items: list[tuple[int, Inputs]]) -> None:
        features = backbone(batch_inputs([inputs for _, inputs in items], device))
        local = features.local_desc[:, :num_local].to("cpu", torch.float16)
        padding = features.metadata[:, :num_local, META_PADDING].cpu() > 0.5
        global_desc = features.global_desc.float().cpu()
        for row, (order, _) in enumerate(items):
            results[order] = (global_desc[row], local[row], padding[row])

    def preprocessed() -> Iterator[tuple[int, Inputs]]:
        for order, (photo, image, backdrop) in enumerate(views):
            photo_of.append(photo)
            backdrop_of.append(backdrop)
            yield order, backbone.preprocess(image)
            advance()

    for batch in batches_by_shape(preprocessed(), lambda item: input_shape(item[1]), batch_size):
        run(batch)
    if not results:
        raise InputError("none of the photos could be read")
    rows = [results[order] for order in range(len(photo_of))]
    photo = np.asarray(photo_of, dtype=np.int64)
    backdrop = np.asarray(backdrop_of, dtype=np.int64)
    return ViewPool(
        torch.stack([row[0] for row in rows]),
        torch.stack([row[1] for row in rows]),
        torch.stack([row[2] for row in rows]),
        photo,
        photos.instances[photo],
        np.where(backdrop >= 0, photos.instances[np.maximum(backdrop, 0)], -1),
    )


@torch.inference_mode()
def raw_scores(
    model: Elvis, pool: ViewPool, src: np.ndarray, tgt: np.ndarray, device: torch.device,
    batch_size: int = 64,
) -> np.ndarray:
    """Raw ELViS scores of pairs of pool rows."""
    model.eval()
    out = np.empty(len(src), dtype=np.float32)
    for start in range(0, len(src), batch_size):
        chunk = slice(start, start + batch_size)
        src_desc, src_mask = pool.local(src[chunk], device)
        tgt_desc, tgt_mask = pool.local(tgt[chunk], device)
        out[chunk] = model(src_desc, tgt_desc, src_mask, tgt_mask).float().cpu().numpy()
    return out
