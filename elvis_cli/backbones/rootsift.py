"""RootSIFT local descriptors: OpenCV SIFT keypoints on the image resized to a fixed longer side.

Why classical descriptors: EfficientNet's last stage has a stride of 32, so a 512 px image has
at most 256 positions, each 32 px wide, too coarse for a small or partial view of an object
(issue 15); SIFT keypoints are placed to the pixel at their own scale. RootSIFT (Arandjelović
and Zisserman, CVPR 2012) L1-normalises each SIFT descriptor and takes the square root: the
result is L2-unit, so a dot product of two is the Hellinger kernel of the SIFT histograms and
every re-ranker that compares unit descriptors by cosine takes them unchanged.

Rows follow features/layout.py: the keypoint's row and column as fractions of the resized
image's height and width (pixel centres, as the grid centres of the network backbones), its
scale column the keypoint's size (diameter in px of the resized image), the padding flag and
its weight the SIFT response; strongest first, padded to K rows.

Determinism: OpenCV picks SIFT's kernels by CPU (SSE4.1, AVX2, AVX-512); the AVX2 and AVX-512
ones give the same bits (tests/test_rootsift.py runs one under OPENCV_CPU_DISABLE), OpenCV's
own thread count changes nothing, and the order of equal responses is fixed here by position.
`cv2.setUseOptimized(False)` must not be used: its unoptimised path differed from run to run
when measured (OpenCV 5.0).
"""

from __future__ import annotations

import cv2
import numpy as np

from elvis_cli.features.layout import (
    META_COL,
    META_PADDING,
    META_ROW,
    META_SCALE,
    META_WEIGHT,
    NUM_META,
)

SIFT_DIM = 128


def resize_for_sift(image: np.ndarray, side: int, reference_side: int | None = None
                    ) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) scaled by side / reference_side (by default the
    image's longer side, so that side becomes `side`; a crop is scaled like its full image)."""
    height, width = image.shape[:2]
    scale = side / (reference_side or max(height, width))
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    if size == (width, height):
        return image
    # area averaging shrinks without aliasing; enlarging, bilinear adds no ringing for SIFT
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=interpolation)


def root_sift(pixels: np.ndarray, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (h, w, 3) RGB -> float32 (K, 128) RootSIFT descriptors and (K, 5) metadata rows,
    K = num_features, strongest response first; rows beyond the keypoints found are padding
    (zero descriptor, padding flag 1, weight 0)."""
    gray = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    keypoints, sift = cv2.SIFT_create(nfeatures=num_features).detectAndCompute(gray, None)
    descriptors = np.zeros((num_features, SIFT_DIM), np.float32)
    metadata = np.zeros((num_features, NUM_META), np.float32)
    metadata[:, META_PADDING] = 1.0
    if sift is None or not keypoints:
        return descriptors, metadata
    # x, y, size, angle, response of each keypoint
    values = np.array([(*point.pt, point.size, point.angle, point.response)
                       for point in keypoints], np.float32)
    # OpenCV's SIFT values are whole numbers below 256: the L1 norms are exact sums
    norms = sift.sum(axis=1)
    # strongest first; ties broken by position, size and angle (np.lexsort: last key first)
    order = np.lexsort((*values[:, [3, 2, 0, 1]].T, -values[:, 4]))
    order = order[norms[order] > 0][:num_features]  # a flat patch has no direction to match
    kept = len(order)
    height, width = gray.shape
    descriptors[:kept] = np.sqrt(sift[order] / norms[order, None])
    metadata[:kept, META_ROW] = (values[order, 1] + 0.5) / height
    metadata[:kept, META_COL] = (values[order, 0] + 0.5) / width
    metadata[:kept, META_SCALE] = values[order, 2]
    metadata[:kept, META_PADDING] = 0.0
    metadata[:kept, META_WEIGHT] = values[order, 4]
    return descriptors, metadata
