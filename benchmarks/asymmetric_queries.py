"""Asymmetric low-resolution queries (RAML) on the demo benchmark, in one run: the queries
extracted at several longer sides, the gallery always at the backbone's own (512 px for the
offline backbone), and for each query size the query extraction time per query, the mean
number of real local descriptors per query, and mAP and re-ranking seconds per query of each
model at each shortlist size (`elvis evaluate --query-image-size N`).

    PYTHONPATH=$PWD python benchmarks/asymmetric_queries.py                # 512, 384, 256
    PYTHONPATH=$PWD python benchmarks/asymmetric_queries.py --sizes 512 320 --models global elvis

The gallery's features are extracted once into --features-dir (a temporary folder by default)
and shared by every query size; each query size's features are extracted there too, then once
more into a fresh file for the timing, with the backbone already loaded and warmed up.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from elvis_cli.backbones import create_backbone
from elvis_cli.evaluation.config import EvaluateConfig
from elvis_cli.evaluation.datasets import load_dataset
from elvis_cli.evaluation.run import evaluate_dataset, extract_dataset
from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.layout import META_PADDING

# the network's local descriptors, whose count shrinks with the query's size (RootSIFT's, the
# default since issue 15, are taken at sift_side whatever the network's image_size)
NETWORK = {"local_descriptors": "network"}


def extraction_seconds(dataset, size: int, folder: Path) -> float:
    """Seconds per query to extract the dataset's queries at `size` into a new file."""
    backbone = create_backbone(image_size=size, **NETWORK)
    paths = dataset.query_paths()
    config = ExtractConfig(decode_truncated=True)
    extract_features(paths[:1], folder / f"warm-{size}.h5", config, backbone=backbone)
    started = time.perf_counter()
    extract_features(paths, folder / f"timed-{size}.h5", config, backbone=backbone)
    return (time.perf_counter() - started) / len(paths)


def real_descriptors(store) -> float:
    rows = store.read_local(np.arange(store.num_images))
    return float((rows[..., META_PADDING] < 0.5).sum(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("examples/data"))
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 384, 256])
    parser.add_argument("--models", nargs="+", default=["global", "elvis", "chamfer"])
    parser.add_argument("--shortlists", type=int, nargs="+", default=[0, 25, 100])
    parser.add_argument("--features-dir", type=Path, default=None)
    args = parser.parse_args()

    dataset = load_dataset(args.data_root, args.dataset)
    gallery_size = create_backbone(**NETWORK).settings()["image_size"]
    lines = ["| query px | local desc./query | extraction s/query | method | mAP | Hard | "
             "re-ranking s/query |", "| ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory(prefix="elvis-asymmetric-") as scratch:
        features_dir = args.features_dir or Path(scratch) / "features"
        for size in args.sizes:
            config = EvaluateConfig(
                backbone_options=NETWORK, models=args.models, shortlists=args.shortlists,
                device="cpu", features_dir=features_dir,
                query_image_size=None if size == gallery_size else size)
            queries, gallery = extract_dataset(dataset, config)
            with queries, gallery:
                descriptors = real_descriptors(queries)
            seconds = extraction_seconds(dataset, size, Path(scratch))
            rows = evaluate_dataset(dataset, config, progress=False).rows
            for row in rows:
                method = "global" if row["model"] == "global" else \
                    f"{row['model']}@{row['shortlist']}"
                rerank = "-" if row["model"] == "global" else f"{row['seconds_per_query']:.4f}"
                lines.append(f"| {size} | {descriptors:.0f} | {seconds:.4f} | {method} | "
                             f"{row['map']:.2f} | {row['map_hard']:.2f} | {rerank} |")
            print(f"queries at {size} px done", flush=True)
    print(f"gallery at {gallery_size} px; {dataset.name}: {len(dataset.queries)} queries, "
          f"{len(dataset.gallery)} gallery images")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
