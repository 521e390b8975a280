"""What every backbone shares: the output record, the interface, resizing and top-K selection."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from elvis_cli.features.layout import (
    CLASS_GLOBAL,
    META_COL,
    META_PADDING,
    META_ROW,
    META_SCALE,
    META_WEIGHT,
    NUM_META,
)
from elvis_cli.util.errors import InputError


@dataclass
class ImageFeatures:
    """Descriptors of a batch of images, local ones sorted by descending weight."""

    global_desc: torch.Tensor  # (B, Dg) float32, L2-normalised
    local_desc: torch.Tensor  # (B, K, D) float32, rows L2-normalised, zero rows where padding
    # (B, K, 5): row, column (centres), scale index (keypoints: size in px), padding flag
    # (1 = padding), weight
    metadata: torch.Tensor
    # further global descriptors by type (the authors' "w-avg", "og-avg"), (B, Dg) each
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def concatenate(parts: list[ImageFeatures]) -> ImageFeatures:
        """The features of several batches as one, in order."""
        return ImageFeatures(
            *(torch.cat([getattr(part, name) for part in parts])
              for name in ("global_desc", "local_desc", "metadata")),
            {kind: torch.cat([part.pooled[kind] for part in parts]) for kind in parts[0].pooled})


# What `preprocess` makes of one image and `forward` takes stacked: the network's input, or a
# tuple of it and per-image results of work done outside the network (RootSIFT's rows), which
# then runs in extraction's loader threads beside the network. Images share a batch where the
# shapes of all their tensors agree (input_shape).
Inputs: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]


def input_shape(inputs: Inputs) -> tuple[tuple[int, ...], ...]:
    """The shapes that images must share to be batched together."""
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    return tuple(tuple(tensor.shape) for tensor in tensors)


def batch_inputs(items: Sequence[Inputs], device: torch.device | str = "cpu") -> Inputs:
    """Several images' `preprocess` outputs as one batch for `forward`, on `device`."""
    if isinstance(items[0], tuple):
        return tuple(torch.stack(part).to(device) for part in zip(*items, strict=True))
    return torch.stack(list(items)).to(device)  # type: ignore[arg-type]


class Backbone(torch.nn.Module, ABC):
    """An image encoder that yields one global and K weighted local descriptors per image."""

    name: str
    local_dim: int
    global_dim: int
    num_local: int
    global_types: tuple[str, ...] = (CLASS_GLOBAL,)  # what `forward` yields: cls, then `pooled`

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable options that recreate this backbone ("name" included)."""

    @abstractmethod
    def preprocess(self, image: np.ndarray, reference_side: int | None = None) -> Inputs:
        """uint8 (H, W, 3) -> float (3, h, w), or a tuple of it and further per-image tensors
        (Inputs); images with equal shapes can share a batch (batch_inputs).

        `reference_side`: the longer side of the image the scale is taken from, when `image` is
        a crop of it (the authors' query crops); by default the image's own.
        """

    @abstractmethod
    def forward(self, images: Inputs) -> ImageFeatures: ...


def parse_options(options_type: type, options: dict[str, Any], backbone: str) -> Any:
    """Build an options dataclass, turning an unknown key into a message that lists valid ones."""
    known = {field.name for field in dataclasses.fields(options_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(
            f"unknown option(s) {', '.join(unknown)} for backbone {backbone!r}; "
            f"known: {', '.join(sorted(known))}"
        )
    return options_type(**options)


def resize_to_multiple(
    image: np.ndarray, longer_side: int, multiple: int, reference_side: int | None = None
) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, h, w), scaled by longer_side / reference_side, sides % multiple.

    The authors' recipe (ELVIS_SPEC §3): s = longer_side / the longer side of the full image
    (`reference_side`, by default this image's), each side becomes
    multiple * max(round(side * s / multiple), 1) (Python's round, half to even), bicubic with
    antialias on the [0, 1] float tensor. Bicubic overshoots and the values are NOT clamped: the
    authors do not clamp, a backbone trained on clamped input clamps itself.
    """
    height, width = image.shape[:2]
    scale = longer_side / (reference_side or max(height, width))
    new_h = multiple * max(round(height * scale / multiple), 1)
    new_w = multiple * max(round(width * scale / multiple), 1)
    pixels = np.require(image, dtype=np.uint8, requirements=["C", "W"])  # copies only if needed
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
    if (new_h, new_w) == (height, width):
        return tensor
    return F.interpolate(
        tensor[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
    )[0]


def grid_centres(height: int, width: int) -> torch.Tensor:
    """(height * width, 2) row, column centres of a feature grid, (i + 0.5) / height and
    (j + 0.5) / width, in row-major order: the official metadata columns 0 and 1."""
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_rows.reshape(-1), grid_cols.reshape(-1)], dim=1)


def select_top_k(
    descriptors: torch.Tensor,
    weights: torch.Tensor,
    centres: torch.Tensor,
    k: int,
    scale_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k highest-weight positions: (B, k, D) descriptors, (B, k, 5) metadata.

    descriptors (B, N, D), already L2-normalised by the backbone (each backbone has its own
    normalisation), weights (B, N), centres (B, N, 2) or (N, 2) row, column. With N < k the
    tail is padding: zero descriptors, padding flag 1, weight 0, so every image has k rows.
    """
    batch, positions, dim = descriptors.shape
    if centres.dim() == 2:
        centres = centres.expand(batch, -1, -1)
    kept = min(k, positions)
    top_weights, order = weights.float().topk(kept, dim=1, largest=True, sorted=True)
    desc = descriptors.gather(1, order[..., None].expand(-1, -1, dim)).float()
    meta = torch.zeros(batch, k, NUM_META, dtype=torch.float32, device=descriptors.device)
    meta[:, :kept, META_ROW : META_COL + 1] = centres.gather(
        1, order[..., None].expand(-1, -1, 2)).float()
    meta[:, :kept, META_SCALE] = float(scale_index)
    meta[:, :kept, META_WEIGHT] = top_weights
    meta[:, kept:, META_PADDING] = 1.0
    padded = torch.zeros(batch, k, dim, dtype=torch.float32, device=descriptors.device)
    padded[:, :kept] = desc
    return padded, meta
