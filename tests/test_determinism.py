"""Same inputs, same bits: extraction and re-ranking on CPU repeat exactly across runs, across
batch sizes (extraction) and across the ways re-ranking splits its CPU work (threads, reads,
blocks) (README "Determinism" lists where this stops: other thread counts, GPUs),
on every x86-64 code path: AVX-512, AVX2 and the SSE baseline."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.elvis_reranker import ElvisReranker
from elvis_cli.model.reranker import Fusion
from elvis_cli.retrieval.embedder import ImageEmbedder
from elvis_cli.retrieval.rerank import RerankConfig, rerank
from elvis_cli.retrieval.shortlist import build_shortlist

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


# RerankConfig settings that change how the CPU work is split: threads scoring side by side,
# images per HDF5 read, gallery images per block of queries. (batch_size does not: CPU chunks
# have a fixed size, so varying it would prove nothing here.)
CPU_WORK_SPLITS = [
    {},  # the defaults: one block, reads of 16 images, one thread (torch's count in tests)
    {},  # the same again: run to run
    {"workers": 2},
    {"workers": 3, "read_images": 2},
    {"read_images": 1, "cache_images": 2},  # one image per read, many blocks of queries
    {"workers": 2, "read_images": 2, "cache_images": 3},
]


def test_rerank_is_bitwise_repeatable_across_runs_and_cpu_work_splits(features, monkeypatch):
    splits: list[list[tuple[int, int]]] = []  # per run: (images read, workers) of each read
    original = ImageEmbedder._read

    def recording(self, rows):
        splits[-1].append((len(rows), self.workers))
        return original(self, rows)

    monkeypatch.setattr(ImageEmbedder, "_read", recording)
    torch.manual_seed(0)
    with FeatureStore.open(features[0]) as store:
        model = Elvis(ElvisConfig(descriptor_dim=store.local_dim))
        glob = store.global_descriptors()
        shortlist = build_shortlist(glob, glob, 5, exclude_self=True)
        results = []
        for options in CPU_WORK_SPLITS:
            splits.append([])
            results.append(rerank(ElvisReranker(model, Fusion(0.5, 0.5)), store, store, shortlist,
                                  RerankConfig(shortlist=5, device="cpu", **options)))
    # the settings really split the work differently, else this test would prove nothing
    assert len({tuple(split) for split in splits}) == len(CPU_WORK_SPLITS) - 1
    for result in results[1:]:
        for name in ("indices", "raw_scores", "scores"):
            assert getattr(result, name).tobytes() == getattr(results[0], name).tobytes(), name


# Environment settings that make torch, MKL, oneDNN, numba and numpy take the code path of an
# older CPU on this one: vector widths, GEMM blockings and the scalar tails of vectorised loops
# differ. (numpy refuses to disable its baseline, X86_V2, so "sse" keeps SSE4.2 there.)
CODE_PATHS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "NUMBA_CPU_NAME": "haswell",
             "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
    "sse": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
            "ONEDNN_MAX_CPU_ISA": "SSE41", "NUMBA_CPU_NAME": "x86-64",
            "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"},
}
BITWISE_CLAIMS = [
    "tests/test_determinism.py::test_extraction_is_bitwise_repeatable_across_runs_and_batch_sizes",
    "tests/test_determinism.py::test_rerank_is_bitwise_repeatable_across_runs_and_cpu_work_splits",
    "tests/test_model.py::test_cpu_inference_bits_do_not_depend_on_the_batch",
    "tests/test_rerank.py::test_cpu_chunks_cross_queries_and_ignore_batch_size",
    "tests/test_rerank.py::test_one_pair_per_call_scores_the_same_bits",
    "tests/test_embedding_cache.py",
]


@pytest.mark.subprocess
@pytest.mark.parametrize("code_path", sorted(CODE_PATHS))
def test_bitwise_claims_hold_on_older_cpus_code_paths(code_path):
    """CI runs on whichever CPU the machine has (AVX-512 or AVX2-only, Intel or AMD): the claims
    must not lean on this one's vector width."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **CODE_PATHS[code_path]}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *BITWISE_CLAIMS], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
