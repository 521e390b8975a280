"""Spatial verification: the classic re-ranker, RANSAC on the matches between two images.

Each pair's descriptors are matched (cosine, padding never matches), by mutual nearest
neighbours or by Lowe's ratio test; RANSAC (OpenCV, chosen by measurement: BENCHMARKS.md) fits
an affine map or a homography from the query's stored positions to the gallery image's, and
the raw score is its inlier count. The shortlist is re-sorted by inliers, equal counts by global
similarity (DELG's "inliers, then global").

Positions are the stored metadata columns (features/layout.py): the patch centre's or
keypoint's row and column as fractions of the image's height and width. The inlier threshold
is given in cells, so one setting suits every backbone. For grid features a cell is the grid's
spacing in those fractions (1/16 for EfficientNet-Lite0 at 512 px, about 1/55 for DINOv2 at
768 px), read from the file; mutual nearest neighbours and an affine map measured best there.
For keypoint features (RootSIFT, backbones/rootsift.py) a cell is one pixel of the image SIFT
ran on, 1 / sift_side of its longer side, and the defaults are the classical recipe
(KEYPOINT_CONFIG): ratio test 0.85, a homography, 8 px. A threshold in fractions is isotropic
in fractions, so along an image's shorter side it is that many pixels times the aspect ratio
(8 px across a 640 px side, 6 px across a 480 px one): the engine hands positions, not image
sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from elvis_cli.features.layout import META_COL, META_PADDING, META_ROW
from elvis_cli.model.reranker import PAPER_NUM_LOCAL, Embedded, Fusion, Reranker

if TYPE_CHECKING:
    from elvis_cli.features.store import DescriptorStore
    from elvis_cli.model.checkpoints import Checkpoint

# the fewest matches each model is fitted from
MIN_SAMPLE = {"affine": 3, "homography": 4}
# stored positions closer than this are one grid line (float16 keeps them to about 5e-4)
_SAME_LINE = 2e-3
_SPACING_IMAGES = 8  # images whose positions give a file's grid spacing
DEFAULT_CELL = 1 / 16  # EfficientNet-Lite0's at 512 px, where no spacing can be seen


@dataclass(frozen=True)
class SpatialVerificationConfig:
    """Matching's and RANSAC's settings; the defaults, for grid features, were chosen on the
    demo (BENCHMARKS.md); KEYPOINT_CONFIG holds those for keypoint features."""

    model: Literal["affine", "homography"] = "affine"
    threshold_cells: float = 1.5  # inlier threshold, in cells (grid spacing, or pixels)
    max_iterations: int = 1000
    confidence: float = 0.999
    min_inliers: int = 8  # fewer inliers than this count as none: the pair is not verified
    # "mutual": mutual nearest neighbours; "ratio": Lowe's ratio test, each query descriptor's
    # nearest gallery descriptor kept where its distance is below `ratio` times the second's
    matching: Literal["mutual", "ratio"] = "mutual"
    ratio: float = 0.85


# the classical RootSIFT + RANSAC recipe (issue 15): ratio test, a homography, 8 px
KEYPOINT_CONFIG = SpatialVerificationConfig(model="homography", threshold_cells=8.0,
                                            matching="ratio")


class SpatialVerification(Reranker):
    name = "sv"
    uses_positions = True
    # its embedding is a normalisation, and the embedding cache keeps no positions
    worth_caching = False

    def __init__(self, config: SpatialVerificationConfig | None = None,
                 cell: float = DEFAULT_CELL, num_local: int | None = PAPER_NUM_LOCAL) -> None:
        """`cell`: the grid spacing in stored position units (a fraction of the image side)."""
        super().__init__(Fusion(lam=0.0, temperature=1.0), num_local=num_local)
        self.config = config or SpatialVerificationConfig()
        self.threshold = self.config.threshold_cells * cell

    @classmethod
    def load(cls, features: DescriptorStore,
             checkpoint: str | Path | Checkpoint | None = None, lam: float | None = None,
             temperature: float | None = None) -> SpatialVerification:
        settings = features.backbone_settings or {}
        if settings.get("local_descriptors") == "rootsift":
            # keypoints: a cell is a pixel, and the classical recipe matches all of them
            return cls(KEYPOINT_CONFIG, cell=1 / settings["sift_side"], num_local=None)
        return cls(cell=grid_spacing(features))

    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        """L2-normalised (B, m, D) descriptors; nothing learned, so no gains (zeros)."""
        normalised = F.normalize(descriptors.float(), dim=-1)
        return Embedded(normalised, normalised.new_zeros(normalised.shape[:2]), mask)

    def score(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        """(B,) inlier counts, pair by pair on the CPU; a (1, m, D) query broadcasts."""
        if src.positions is None or tgt.positions is None:
            raise ValueError("spatial verification needs the positions of both images "
                             "(Embedded.positions)")
        similarities = torch.matmul(src.descriptors.float(),
                                    tgt.descriptors.float().transpose(-1, -2)).cpu().numpy()
        count = similarities.shape[0]
        src_padding, tgt_padding = _padding(src, count), _padding(tgt, count)
        src_positions = src.positions.float().cpu().numpy()
        tgt_positions = tgt.positions.float().cpu().numpy()
        ratio = self.config.ratio if self.config.matching == "ratio" else None
        inliers = [
            self.inliers(*matched_positions(
                similarities[pair], src_padding[pair], tgt_padding[pair],
                src_positions[pair % len(src_positions)], tgt_positions[pair], ratio))
            for pair in range(count)
        ]
        return torch.tensor(inliers, dtype=torch.float32)

    def inliers(self, src_points: np.ndarray, tgt_points: np.ndarray) -> int:
        """RANSAC's inlier count of the (n, 2) matched positions; below min_inliers, 0."""
        config = self.config
        if len(src_points) < MIN_SAMPLE[config.model]:
            return 0
        if config.model == "homography":
            _, inliers = cv2.findHomography(
                src_points, tgt_points, cv2.RANSAC, self.threshold,
                maxIters=config.max_iterations, confidence=config.confidence)
        else:
            _, inliers = cv2.estimateAffine2D(
                src_points, tgt_points, method=cv2.RANSAC,
                ransacReprojThreshold=self.threshold, maxIters=config.max_iterations,
                confidence=config.confidence, refineIters=0)
        found = 0 if inliers is None else int(inliers.sum())
        return found if found >= config.min_inliers else 0

    def fuse(self, global_score: torch.Tensor, raw_score: torch.Tensor) -> torch.Tensor:
        """inliers + (1 + global) / 2: more inliers always rank higher, and the global
        similarity, mapped into [0, 1], orders equal counts."""
        return raw_score + (1 + global_score) / 2

    def bytes_per_descriptor(self, descriptor_dim: int, dtype: torch.dtype) -> int:
        """The normalised descriptor, a (zero) gain, a padding flag and a float32 position."""
        return descriptor_dim * dtype.itemsize + 4 + 1 + 8


def matched_positions(similarity: np.ndarray, src_padding: np.ndarray,
                      tgt_padding: np.ndarray, src_positions: np.ndarray,
                      tgt_positions: np.ndarray, ratio: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) positions of the matches of an (m, m') similarity matrix of unit descriptors,
    query side then gallery side: mutual nearest neighbours, or with `ratio` each query row's
    nearest gallery row where its distance is below ratio times the second nearest's (Lowe's
    test). Padded slots (True) on either side never match."""
    similarity = np.where(src_padding[:, None] | tgt_padding[None, :], -np.inf, similarity)
    if not np.isfinite(similarity).any():
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    best_target = similarity.argmax(axis=1)
    if ratio is None:
        best_source = similarity.argmax(axis=0)
        matched = best_source[best_target] == np.arange(len(similarity))
    else:
        matched = _passes_ratio_test(similarity, ratio)
    sources = np.flatnonzero(matched & ~src_padding)
    targets = best_target[sources]
    return (np.ascontiguousarray(src_positions[sources], dtype=np.float32),
            np.ascontiguousarray(tgt_positions[targets], dtype=np.float32))


def _passes_ratio_test(similarity: np.ndarray, ratio: float) -> np.ndarray:
    """(m,) whether each row's nearest column is nearer than `ratio` times the second nearest,
    in Euclidean distance between unit vectors, sqrt(2 - 2 cos); one column alone passes."""
    if similarity.shape[1] < 2:
        return np.ones(len(similarity), bool)
    top_two = -np.partition(-similarity, 1, axis=1)[:, :2]
    nearest, second = np.sqrt(np.maximum(2.0 - 2.0 * top_two, 0.0)).T
    return nearest < ratio * second


def grid_spacing(features: DescriptorStore) -> float:
    """The features' grid cell in stored position units: the finest spacing between one
    image's stored rows or columns (that of its longer side), the median over the first
    images of the file."""
    spacings = []
    for rows in features.read_local(np.arange(min(features.num_images, _SPACING_IMAGES))):
        kept = rows[rows[:, META_PADDING] < 0.5]
        gaps = np.concatenate([np.diff(np.unique(kept[:, column]))
                               for column in (META_ROW, META_COL)])
        gaps = gaps[gaps > _SAME_LINE]
        if len(gaps):
            spacings.append(gaps.min())
    return float(np.median(spacings)) if spacings else DEFAULT_CELL  # none: no grid to see


def _padding(embedded: Embedded, count: int) -> np.ndarray:
    """(count, m) padding flags of a side, broadcast from a single query; none if no mask."""
    slots = embedded.descriptors.shape[1]
    if embedded.mask is None:
        return np.zeros((count, slots), dtype=bool)
    return np.broadcast_to(embedded.mask.cpu().numpy(), (count, slots))
