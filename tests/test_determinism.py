"""Same inputs, same bits: extraction and re-ranking on CPU repeat exactly across runs and
across batch sizes (README "Determinism" lists where this stops: other thread counts, GPUs)."""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from elvis_cli.checkpoints import Fusion
from elvis_cli.extract import ExtractConfig, extract_features
from elvis_cli.feature_store import FeatureStore
from elvis_cli.model import Elvis, ElvisConfig
from elvis_cli.rerank import RerankConfig, rerank
from elvis_cli.shortlist import build_shortlist

OPTIONS = {"image_size": 96, "num_local": 24, "local_layer": 5}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("determinism")
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket(), skimage.data.chelsea()[::2], skimage.data.coffee()[50:]]
    for index, pixels in enumerate(photos):  # shapes repeat, so batches hold several images
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{index}.png")
    return folder


def extract_bits(images, output, batch_size: int) -> tuple[bytes, ...]:
    config = ExtractConfig(backbone_options=OPTIONS, device="cpu", batch_size=batch_size,
                           shard_size=4)
    extract_features(images, output, config, progress=False)
    with FeatureStore.open(output) as store:
        return (store.global_descriptors().tobytes(),
                store.read_local(range(store.num_images)).tobytes())


@pytest.fixture(scope="module")
def features(images, tmp_path_factory):
    """A features file and its bits, extracted with batches of 4."""
    output = tmp_path_factory.mktemp("features") / "f.h5"
    return output, extract_bits(images, output, batch_size=4)


def test_extraction_is_bitwise_repeatable_across_runs_and_batch_sizes(images, features,
                                                                      tmp_path):
    _, first = features
    assert extract_bits(images, tmp_path / "again.h5", batch_size=4) == first
    for batch_size in (1, 3):
        assert extract_bits(images, tmp_path / f"b{batch_size}.h5", batch_size) == first


def test_rerank_is_bitwise_repeatable_across_runs_and_batch_sizes(features):
    torch.manual_seed(0)
    with FeatureStore.open(features[0]) as store:
        model = Elvis(ElvisConfig(descriptor_dim=store.local_dim))
        glob = store.global_descriptors()
        shortlist = build_shortlist(glob, glob, 5, exclude_self=True)
        results = [rerank(model, store, store, shortlist, Fusion(0.5, 0.5),
                          RerankConfig(shortlist=5, batch_size=size, device="cpu"))
                   for size in (100, 100, 1, 3)]
    for result in results[1:]:
        for name in ("indices", "raw_scores", "scores"):
            assert getattr(result, name).tobytes() == getattr(results[0], name).tobytes(), name
