"""What every backbone shares: the output record, the interface, resizing and top-K selection."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from elvis_cli.errors import InputError

# Column layout of the per-descriptor metadata, identical to the official files (ELVIS_SPEC §4).
META_X, META_Y, META_SCALE, META_PADDING, META_WEIGHT = range(5)
NUM_META = 5


@dataclass
class ImageFeatures:
    """Descriptors of a batch of images, local ones sorted by descending weight."""

    global_desc: torch.Tensor  # (B, Dg) float32, L2-normalised
    local_desc: torch.Tensor  # (B, K, D) float32, rows L2-normalised, zero rows where padding
    metadata: torch.Tensor  # (B, K, 5): x, y, scale index, padding flag (1 = padding), weight


class Backbone(torch.nn.Module, ABC):
    """An image encoder that yields one global and K weighted local descriptors per image."""

    name: str
    local_dim: int
    global_dim: int
    num_local: int

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable options that recreate this backbone ("name" included)."""

    @abstractmethod
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float (3, h, w); images with equal output shapes can share a batch."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> ImageFeatures: ...


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


def resize_to_multiple(image: np.ndarray, longer_side: int, multiple: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, h, w) in [0, 1], longer side ~`longer_side`, sides % multiple.

    Bicubic with antialias on the float tensor, as the official DINOv2 extraction does, so both
    down- and up-scaling are smooth; values are clamped because bicubic overshoots.
    """
    height, width = image.shape[:2]
    scale = longer_side / max(height, width)
    new_h = max(multiple, round(height * scale / multiple) * multiple)
    new_w = max(multiple, round(width * scale / multiple) * multiple)
    pixels = np.require(image, dtype=np.uint8, requirements=["C", "W"])  # copies only if needed
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
    if (new_h, new_w) != (height, width):
        tensor = F.interpolate(
            tensor[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
        )[0]
    return tensor.clamp_(0.0, 1.0)


def grid_centres(height: int, width: int) -> torch.Tensor:
    """(height * width, 2) x, y centres of a feature grid in [0, 1], in row-major order."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def select_top_k(
    local: torch.Tensor,
    weights: torch.Tensor,
    xy: torch.Tensor,
    k: int,
    scale_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k highest-weight positions: (B, k, D) L2-normalised descriptors, (B, k, 5) metadata.

    local (B, N, D), weights (B, N), xy (B, N, 2) or (N, 2). With N < k the tail is padding: zero
    descriptors, padding flag 1, weight 0, so every image has exactly k rows.
    """
    batch, positions, dim = local.shape
    if xy.dim() == 2:
        xy = xy.expand(batch, -1, -1)
    kept = min(k, positions)
    top_weights, order = weights.float().topk(kept, dim=1, largest=True, sorted=True)
    desc = F.normalize(local.gather(1, order[..., None].expand(-1, -1, dim)).float(), dim=-1)
    meta = torch.zeros(batch, k, NUM_META, dtype=torch.float32, device=local.device)
    meta[:, :kept, META_X : META_Y + 1] = xy.gather(1, order[..., None].expand(-1, -1, 2)).float()
    meta[:, :kept, META_SCALE] = float(scale_index)
    meta[:, :kept, META_WEIGHT] = top_weights
    meta[:, kept:, META_PADDING] = 1.0
    padded = torch.zeros(batch, k, dim, dtype=torch.float32, device=local.device)
    padded[:, :kept] = desc
    return padded, meta
