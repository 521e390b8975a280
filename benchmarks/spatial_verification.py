"""Spatial verification: the RANSAC libraries side by side in one run, on the demo benchmark.

Every variant runs the same `elvis evaluate --model global,sv` (the real engine, matching and
metrics); only the inlier counter (`SpatialVerification.inliers`) and its settings change:
OpenCV's RANSAC (affine, homography) and USAC-MAGSAC++ (homography), pycolmap's LO-RANSAC
(affine, homography) and PoseLib's LO-RANSAC (homography; it has no affine estimator). Each
is seeded: the same inliers run after run. pairs/s is the shortlist over seconds per query.

    PYTHONPATH=$PWD python benchmarks/spatial_verification.py --data-root examples/data
    ... --thresholds 1 1.5 2 --min-inliers 0 5 8 --shortlist 25 100   # the settings' sweep
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import poselib
import pycolmap
import torch

from elvis_cli import EvaluateConfig, FeatureStore, evaluate_datasets
from elvis_cli.features.layout import META_COL, META_PADDING, META_ROW, NUM_META
from elvis_cli.model.spatial_verification import (
    MIN_SAMPLE,
    SpatialVerification,
    SpatialVerificationConfig,
    grid_spacing,
    matched_positions,
)
from elvis_cli.retrieval.shortlist import build_shortlist

Counter = Callable[[SpatialVerification, np.ndarray, np.ndarray], int]


def _counted(fit: Callable[[SpatialVerification, np.ndarray, np.ndarray], int]) -> Counter:
    """An inlier counter from a library's fit, with the module's minimum sample and floor."""
    def inliers(self: SpatialVerification, src: np.ndarray, tgt: np.ndarray) -> int:
        if len(src) < MIN_SAMPLE[self.config.model]:
            return 0
        found = fit(self, src.astype(np.float64), tgt.astype(np.float64))
        return found if found >= self.config.min_inliers else 0
    return inliers


def _magsac(self: SpatialVerification, src: np.ndarray, tgt: np.ndarray) -> int:
    _, mask = cv2.findHomography(src, tgt, cv2.USAC_MAGSAC, self.threshold,
                                 maxIters=self.config.max_iterations,
                                 confidence=self.config.confidence)
    return 0 if mask is None else int(mask.sum())


def _colmap_options(self: SpatialVerification) -> pycolmap.RANSACOptions:
    options = pycolmap.RANSACOptions()
    options.max_error = self.threshold
    options.max_num_trials = self.config.max_iterations
    options.min_num_trials = 0
    options.confidence = self.config.confidence
    options.random_seed = 0
    return options


def _colmap(self: SpatialVerification, src: np.ndarray, tgt: np.ndarray) -> int:
    estimate = (pycolmap.estimate_homography_matrix if self.config.model == "homography"
                else pycolmap.estimate_affine2d_robust)
    result = estimate(src, tgt, _colmap_options(self))
    return 0 if result is None else int(result["num_inliers"])


def _poselib(self: SpatialVerification, src: np.ndarray, tgt: np.ndarray) -> int:
    _, info = poselib.estimate_homography(src, tgt, {
        "max_reproj_error": self.threshold, "max_iterations": self.config.max_iterations,
        "min_iterations": 0, "success_prob": self.config.confidence, "seed": 0})
    return int(info["num_inliers"])


# name -> (model, inlier counter; None: the module's own, OpenCV's RANSAC)
VARIANTS: dict[str, tuple[str, Counter | None]] = {
    "opencv RANSAC affine": ("affine", None),
    "opencv RANSAC homography": ("homography", None),
    "opencv USAC-MAGSAC++ homography": ("homography", _counted(_magsac)),
    "pycolmap LO-RANSAC affine": ("affine", _counted(_colmap)),
    "pycolmap LO-RANSAC homography": ("homography", _counted(_colmap)),
    "poselib LO-RANSAC homography": ("homography", _counted(_poselib)),
}


def evaluate_variant(data_root: str, shortlists: list[int], config: SpatialVerificationConfig,
                     counter: Counter | None) -> list[dict]:
    """The evaluation's sv rows with this config and inlier counter."""
    def load(cls, features, *_):
        return cls(config, cell=grid_spacing(features))

    with tempfile.TemporaryDirectory() as out_dir, ExitStack() as patches:
        patches.enter_context(mock.patch.object(SpatialVerification, "load", classmethod(load)))
        if counter is not None:
            patches.enter_context(mock.patch.object(SpatialVerification, "inliers", counter))
        run = evaluate_datasets(data_root, ["demo"], EvaluateConfig(
            models=("global", "sv"), shortlists=[0, *shortlists]), out_dir=out_dir)
    table = run.table
    return table[(table["model"] == "sv") & ~table["grid"]].to_dict("records")


def recorded_matches(data_root: str, shortlist: int) -> tuple[float, list[tuple]]:
    """The demo's cell and the mutual-NN matches of every (query, top-`shortlist`) pair, as
    the engine finds them, from the features the evaluation cached."""
    folder = next(Path(data_root, "demo", "features").glob("*/query.h5")).parent
    with FeatureStore.open(folder / "query.h5") as queries, \
            FeatureStore.open(folder / "gallery.h5") as gallery:
        cell = grid_spacing(gallery)
        top = build_shortlist(queries.global_descriptors(), gallery.global_descriptors(),
                              shortlist).indices
        rows = [store.read_local(np.arange(store.num_images)) for store in (queries, gallery)]
    descriptors = [SpatialVerification().embed(torch.from_numpy(side[..., NUM_META:]))
                   .descriptors.numpy() for side in rows]
    return cell, [matched_positions(
        descriptors[0][query] @ descriptors[1][row].T,
        rows[0][query, :, META_PADDING] > 0.5, rows[1][row, :, META_PADDING] > 0.5,
        rows[0][query, :, META_ROW : META_COL + 1], rows[1][row, :, META_ROW : META_COL + 1])
        for query, candidates in enumerate(top) for row in candidates]


def time_counters(cell: float, matches: list[tuple], rounds: int = 3) -> dict[str, float]:
    """Seconds per pair of each variant's inlier counting alone, on the same matches; rounds
    interleaved (the fastest of each kept), so that machine load hits every variant alike."""
    best = dict.fromkeys(VARIANTS, np.inf)
    for _ in range(rounds):
        for name, (model, counter) in VARIANTS.items():
            reranker = SpatialVerification(replace(SpatialVerificationConfig(), model=model),
                                           cell=cell)
            count = counter or SpatialVerification.inliers
            started = time.perf_counter()
            for src, tgt in matches:
                count(reranker, src, tgt)
            best[name] = min(best[name], (time.perf_counter() - started) / len(matches))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="examples/data")
    parser.add_argument("--shortlist", type=int, nargs="+", default=[10, 25, 50, 100])
    defaults = SpatialVerificationConfig()
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[defaults.threshold_cells], help="inlier thresholds in grid cells")
    parser.add_argument("--min-inliers", type=int, nargs="+", default=[defaults.min_inliers])
    args = parser.parse_args()
    print("| RANSAC | threshold (cells) | min inliers | "
          + " | ".join(f"s/query @{k} | pairs/s @{k} | mAP @{k}" for k in args.shortlist)
          + " |")
    print("| --- " * (3 + 3 * len(args.shortlist)) + "|")
    for name, (model, counter) in VARIANTS.items():
        for threshold in args.thresholds:
            for min_inliers in args.min_inliers:
                config = replace(defaults, model=model,
                                 threshold_cells=threshold, min_inliers=min_inliers)
                rows = evaluate_variant(args.data_root, args.shortlist, config, counter)
                cells = " | ".join(
                    f"{row['seconds_per_query']:.4f} | "
                    f"{row['shortlist'] / row['seconds_per_query']:.0f} | {row['map']:.2f}"
                    for row in rows)
                print(f"| {name} | {threshold:g} | {min_inliers} | {cells} |", flush=True)
    cell, matches = recorded_matches(args.data_root, max(args.shortlist))
    print(f"\nRANSAC alone, the same {len(matches)} matched pairs (top {max(args.shortlist)}"
          f" of each query, {np.mean([len(m[0]) for m in matches]):.0f} matches per pair):")
    print("| RANSAC | ms/pair | pairs/s |\n| --- | --- | --- |")
    for name, seconds in time_counters(cell, matches).items():
        print(f"| {name} | {1e3 * seconds:.3f} | {1 / seconds:.0f} |")


if __name__ == "__main__":
    main()
