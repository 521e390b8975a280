"""Extraction speed of the offline backbone on CPU: images/s and where the time goes.

Times each stage of `elvis extract` separately on real photos (decode: read + JPEG decode +
EXIF; preprocess: the backbone's resizing, and RootSIFT where asked; model: forward passes in
batches of same-shaped images, as extraction batches them; write: the HDF5 shard), then the
real extraction end to end (where preprocessing runs in the loader threads beside the model).
Each variant (backbone options on top of --option) is measured in turn in one run, by default
the network's local descriptors (the offline default before issue 15) and today's default,
RootSIFT, side by side.

    PYTHONPATH=$PWD python benchmarks/extract_speed.py                 # demo photos, ~2-4 min
    PYTHONPATH=$PWD python benchmarks/extract_speed.py IMAGES --limit 50 --option image_size=512
    PYTHONPATH=$PWD python benchmarks/extract_speed.py --variant "" --variant \
        "sift_side=512" --repeats 3
"""

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elvis_cli.backbones import backbone_options, create_backbone
from elvis_cli.backbones.base import batch_inputs, input_shape
from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.images import collect_images, load_image
from elvis_cli.features.layout import shard_path
from elvis_cli.features.writer import write_shard

DEMO = Path(__file__).resolve().parent.parent / "examples" / "data" / "demo" / "jpg"


def stage_times(backbone, paths: list[Path], batch_size: int) -> dict[str, float]:
    """Seconds spent per stage over all images, one stage at a time on the main thread."""
    seconds: dict[str, float] = defaultdict(float)
    inputs = []
    for path in paths:
        started = time.perf_counter()
        image = load_image(path)
        seconds["decode"] += time.perf_counter() - started
        started = time.perf_counter()
        inputs.append(backbone.preprocess(image))
        seconds["preprocess"] += time.perf_counter() - started
    by_shape = defaultdict(list)
    for one in inputs:
        by_shape[input_shape(one)].append(one)
    rows, globals_ = [], []
    with torch.inference_mode():
        for group in by_shape.values():
            for start in range(0, len(group), batch_size):
                started = time.perf_counter()
                features = backbone(batch_inputs(group[start : start + batch_size]))
                seconds["model"] += time.perf_counter() - started
                rows.append(torch.cat([features.metadata, features.local_desc], -1).numpy())
                globals_.append(features.global_desc.numpy())
    with tempfile.TemporaryDirectory() as folder:
        names = [path.name for path in paths]
        started = time.perf_counter()
        write_shard(shard_path(Path(folder) / "f.h5", 0), np.concatenate(rows),
                    np.concatenate(globals_), names, names, np.ones((len(paths), 2), np.int32))
        seconds["write"] += time.perf_counter() - started
    return seconds


def measure(name: str, options: dict[str, Any], paths: list[Path],
            args: argparse.Namespace) -> None:
    """Print the stage times and the end-to-end images/s of one backbone setting."""
    backbone = create_backbone(name, **options).eval()
    print(f"{name} {backbone.settings()}; torch threads {torch.get_num_threads()}")
    stage_times(backbone, paths, args.batch_size)  # warm up: oneDNN prepares each new shape
    runs = [stage_times(backbone, paths, args.batch_size) for _ in range(args.repeats)]
    stages = {stage: statistics.median(run[stage] for run in runs) for stage in runs[0]}
    total = sum(stages.values())
    for stage, seconds in stages.items():
        share = 100 * seconds / total
        print(f"  {stage:10s} {1e3 * seconds / len(paths):7.2f} ms/image  {share:5.1f}%")
    print(f"  stages in sequence: {len(paths) / total:.1f} images/s")

    times = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            extract_features(paths, Path(folder) / "f.h5", ExtractConfig(
                backbone=name, backbone_options=options, batch_size=args.batch_size,
                device="cpu"), backbone=backbone)
            times.append(time.perf_counter() - started)
    print(f"  extract_features end to end (preprocessing in threads, median of {args.repeats}): "
          f"{len(paths) / statistics.median(times):.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="?", type=Path, default=DEMO)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--option", action="append", default=[], help="backbone KEY=VALUE")
    parser.add_argument("--variant", action="append", default=None,
                        help="comma-separated KEY=VALUE options of one variant, '' for none "
                             "(repeat; default: local_descriptors=network and '')")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per figure (median)")
    args = parser.parse_args()
    _, paths = collect_images(args.images)
    paths = paths[: args.limit]
    print(f"{len(paths)} images from {args.images}")
    for variant in args.variant or ["local_descriptors=network", ""]:
        options = backbone_options([*args.option, *filter(None, variant.split(","))])
        measure(args.backbone, options, paths, args)


if __name__ == "__main__":
    main()
