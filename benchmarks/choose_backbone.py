"""Choose the offline backbone's settings by measurement on held-out photos.

    python benchmarks/choose_backbone.py PHOTOS/val.txt [--views 8] [--around KEY=VALUE ...]

Every held-out photo gives `--views` strong random views (elvis_cli.training.augment with
small crops, perspective, rotation and occlusion, like the demo's hard positives: mild views
put every setting at 100 mAP and decide nothing); each view is a query against all other views, its
positives the other views of the same photo. For each setting, varied one factor at a time
around the default, it prints:
- global mAP: ranking by the global descriptor;
- chamfer mAP: ranking by the training-free chamfer similarity of the local descriptors (mean
  over each image's descriptors of the best cosine match, both directions), a model-free proxy
  for how matchable the local descriptors are;
- extraction speed in images/s on this machine (model forward only, batch of 1).
No photo used here is in the training split or the demo benchmark.
"""

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from elvis_cli.backbones import create_backbone
from elvis_cli.backbones.base import batch_inputs
from elvis_cli.evaluation.metrics import ok_junk_scores
from elvis_cli.features.images import collect_images, load_image
from elvis_cli.training.augment import ViewConfig, inset_view, random_view

HARD_VIEWS = ViewConfig(crop_area=(0.1, 0.4), perspective_prob=0.8, perspective_strength=0.2,
                        rotation_prob=0.6, max_rotation=30.0, occlusion_prob=0.5)
DEFAULT = {"local_descriptors": "network", "local_layer": 5, "image_size": 512, "num_local": 300,
           "global_pooling": "gem"}
VARIATIONS = {
    "local_layer": [4, 5, 6, 7],
    "image_size": [384, 512, 640],
    "num_local": [150, 300, 600],
    "global_pooling": ["gem", "avg"],
}


@dataclass
class Measurement:
    settings: dict
    global_map: float
    chamfer_map: float
    images_per_second: float


def make_views(
    source: str, views: int, seed: int, inset: float = 0.0
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Views, their photo's label, and the label of the photo each was pasted into (-1: none);
    with `inset` > 0 that share of views shows the photo small inside the previous photo."""
    _, paths = collect_images(source)
    rng = np.random.default_rng(seed)
    images, labels, backdrops = [], [], []
    previous = None
    for label, path in enumerate(paths):
        photo = load_image(path)
        for _ in range(views):
            view = random_view(photo, rng, HARD_VIEWS)
            backdrop = -1
            if previous is not None and rng.random() < inset:
                view, backdrop = inset_view(view, previous, rng, (0.15, 0.3)), label - 1
            images.append(view)
            labels.append(label)
            backdrops.append(backdrop)
        previous = photo
    return images, np.array(labels), np.array(backdrops)


@torch.inference_mode()
def measure(images: list[np.ndarray], labels: np.ndarray, backdrops: np.ndarray,
            settings: dict) -> Measurement:
    backbone = create_backbone("efficientnet-lite0", **settings).eval()
    global_rows, local_sets = [], []
    elapsed = 0.0
    for image in images:
        batch = batch_inputs([backbone.preprocess(image)])
        started = time.perf_counter()
        features = backbone(batch)
        elapsed += time.perf_counter() - started
        global_rows.append(features.global_desc[0])
        valid = features.metadata[0, :, 3] == 0
        local_sets.append(features.local_desc[0][valid])
    global_similarity = torch.stack(global_rows) @ torch.stack(global_rows).T
    chamfer = torch.zeros_like(global_similarity)
    for i, src in enumerate(local_sets):
        for j, tgt in enumerate(local_sets):
            if i < j:
                cosine = src @ tgt.T
                score = (cosine.amax(dim=1).mean() + cosine.amax(dim=0).mean()) / 2
                chamfer[i, j] = chamfer[j, i] = score
    return Measurement(settings, _map(global_similarity, labels, backdrops),
                       _map(chamfer, labels, backdrops), len(images) / elapsed)


def _map(similarity: torch.Tensor, labels: np.ndarray, backdrops: np.ndarray) -> float:
    """Non-interpolated mAP of every image against all others (itself excluded); views that
    share only a backdrop's content are junk."""
    similarity = similarity.clone()
    similarity.fill_diagonal_(-torch.inf)
    ranking = torch.argsort(similarity, dim=1, descending=True)[:, :-1].numpy()
    rows = np.arange(len(labels))
    positives, junk = [], []
    for q in rows:
        same = (labels == labels[q]) & (rows != q)
        shared = {labels[q], backdrops[q]} - {-1}
        related = np.isin(labels, list(shared)) | np.isin(backdrops, list(shared))
        positives.append(np.flatnonzero(same))
        junk.append(np.flatnonzero(related & ~same & (rows != q)))
    return ok_junk_scores(ranking, positives, junk, map_k=None)["map"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", help="held-out photos: folder, .txt list or glob")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--around", nargs="*", default=[], metavar="KEY=VALUE",
                        help="centre the one-factor variations here instead of the default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inset", type=float, default=0.0,
                        help="share of views pasted small into another held-out photo")
    parser.add_argument("--factors", nargs="*", default=list(VARIATIONS),
                        choices=list(VARIATIONS), help="which settings to vary")
    args = parser.parse_args()
    centre = dict(DEFAULT)
    for item in args.around:
        key, value = item.split("=", 1)
        centre[key] = value if key == "global_pooling" else int(value)
    images, labels, backdrops = make_views(args.photos, args.views, args.seed, args.inset)
    print(f"{len(images)} views of {labels.max() + 1} held-out photos, "
          f"{torch.get_num_threads()} threads")
    print(f"{'setting':<28} {'global mAP':>10} {'chamfer mAP':>12} {'images/s':>9}")
    tried = set()
    for factor in args.factors:
        for value in VARIATIONS[factor]:
            settings = {**centre, factor: value}
            key = tuple(sorted(settings.items()))
            if key in tried:
                continue
            tried.add(key)
            result = measure(images, labels, backdrops, settings)
            label = "centre" if settings == centre else f"{factor}={value}"
            print(f"{label:<28} {result.global_map:>10.2f} {result.chamfer_map:>12.2f} "
                  f"{result.images_per_second:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
