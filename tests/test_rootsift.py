"""RootSIFT local descriptors: the rows, their file, and their bits on other CPUs' code paths."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import skimage.data

from elvis_cli import ExtractConfig, FeatureStore, RerankConfig, extract_images, rerank_files
from elvis_cli.backbones import backbone_from_settings, create_backbone
from elvis_cli.backbones.rootsift import SIFT_DIM, resize_for_sift, root_sift
from elvis_cli.features.images import load_image
from elvis_cli.features.layout import (
    META_COL,
    META_PADDING,
    META_ROW,
    META_SCALE,
    META_WEIGHT,
    NUM_META,
)
from elvis_cli.model.registry import load_reranker
from elvis_cli.util.errors import InputError
from tests.helpers import photos, write_views

SIDE = 320  # the default
ROOTSIFT = {"local_descriptors": "rootsift", "sift_side": SIDE, "image_size": 256,
            "num_local": 400}


def _real(metadata: np.ndarray) -> np.ndarray:
    return metadata[:, META_PADDING] < 0.5


@pytest.mark.parametrize("name", sorted(photos()))
def test_rows_are_unit_non_negative_strongest_first_and_inside_the_image(name):
    pixels = resize_for_sift(photos()[name], SIDE)
    descriptors, metadata = root_sift(pixels, 80)
    assert descriptors.shape == (80, SIFT_DIM) and metadata.shape == (80, NUM_META)
    real = _real(metadata)
    assert real.sum() == 80  # these photos have more keypoints than that
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    assert (descriptors >= 0).all()
    weights = metadata[:, META_WEIGHT]
    assert (weights > 0).all() and (np.diff(weights) <= 0).all()
    positions = metadata[:, META_ROW : META_COL + 1]
    assert (positions > 0).all() and (positions < 1).all()
    assert (metadata[:, META_SCALE] > 1).all()  # keypoint diameters in px


def test_rows_are_the_strongest_keypoints_opencv_finds():
    """Positions are pixel centres as fractions (x + 0.5) / width, (y + 0.5) / height, and the
    kept rows are OpenCV's keypoints of highest response."""
    pixels = resize_for_sift(skimage.data.astronaut(), SIDE)
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    keypoints = cv2.SIFT_create().detect(gray, None)
    strongest = max(keypoints, key=lambda point: point.response)
    _, metadata = root_sift(pixels, 50)
    height, width = gray.shape
    assert metadata[0, META_WEIGHT] == pytest.approx(strongest.response)
    assert metadata[0, META_COL] == pytest.approx((strongest.pt[0] + 0.5) / width)
    assert metadata[0, META_ROW] == pytest.approx((strongest.pt[1] + 0.5) / height)
    assert metadata[0, META_SCALE] == pytest.approx(strongest.size)


def test_fewer_keypoints_than_rows_are_padded():
    pixels = resize_for_sift(skimage.data.coffee(), SIDE)
    descriptors, metadata = root_sift(pixels, 5000)
    real = _real(metadata)
    found = int(real.sum())
    assert 0 < found < 5000
    assert real[:found].all() and not real[found:].any()  # real rows first
    assert not descriptors[found:].any()
    assert not metadata[found:, META_WEIGHT].any()
    blank_descriptors, blank = root_sift(np.full((64, 96, 3), 128, np.uint8), 10)
    assert (blank[:, META_PADDING] == 1).all() and not blank_descriptors.any()


def test_a_crop_is_resized_like_its_full_image():
    image = skimage.data.chelsea()  # 300 x 451
    assert resize_for_sift(image, 640).shape == (426, 640, 3)
    assert resize_for_sift(image[:100, :200], 640, reference_side=451).shape == (142, 284, 3)


def test_opencv_threads_change_no_bit():
    pixels = resize_for_sift(skimage.data.astronaut(), SIDE)
    before = cv2.getNumThreads()
    try:
        runs = []
        for threads in (1, 4):
            cv2.setNumThreads(threads)
            runs.append(root_sift(pixels, 500))
    finally:
        cv2.setNumThreads(before)
    for first, second in zip(*runs, strict=True):
        assert first.tobytes() == second.tobytes()


ROWS_CODE = """
import hashlib, skimage.data
from elvis_cli.backbones.rootsift import resize_for_sift, root_sift
digest = hashlib.sha256()
for image in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
    for part in root_sift(resize_for_sift(image, 640), 800):
        digest.update(part.tobytes())
print(digest.hexdigest())
"""


@pytest.mark.subprocess
def test_the_same_bits_on_the_avx2_code_path():
    """An AVX2-only CPU takes OpenCV's AVX2 kernels where this one may take AVX-512 ones:
    resizing and SIFT give the same rows on both."""
    root = Path(__file__).resolve().parents[1]
    digests = []
    for extra in ({}, {"OPENCV_CPU_DISABLE": "AVX512-SKX"}):
        result = subprocess.run([sys.executable, "-c", ROWS_CODE], cwd=root,
                                env={**os.environ, **extra}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        digests.append(result.stdout.strip())
    assert digests[0] == digests[1]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The views extracted with RootSIFT and with the network's local descriptors."""
    folder = tmp_path_factory.mktemp("rootsift")
    write_views(folder / "imgs")
    extract_images(folder / "imgs", folder / "sift.h5", ExtractConfig(backbone_options=ROOTSIFT))
    extract_images(folder / "imgs", folder / "grid.h5",
                   ExtractConfig(backbone_options={"local_descriptors": "network",
                                                   "image_size": 256, "num_local": 64}))
    return folder


def test_a_features_file_round_trips_the_rows(extracted):
    """The stored rows are RootSIFT's of each image (float16: unit norm to 1e-3), the global
    descriptor is the network's as without the option, and the settings recreate the
    backbone."""
    with FeatureStore.open(extracted / "sift.h5") as store, \
            FeatureStore.open(extracted / "grid.h5") as grid:
        assert store.local_dim == SIFT_DIM and store.num_local == ROOTSIFT["num_local"]
        rows = store.read_local(np.arange(store.num_images))
        settings = store.backbone_settings
        np.testing.assert_array_equal(store.global_descriptors(), grid.global_descriptors())
        assert "local_descriptors" not in grid.backbone_settings
        grid_settings = grid.backbone_settings
        paths = list(store.paths)
    assert settings == {"name": "efficientnet-lite0", "image_size": 256, "local_layer": 7,
                        "num_local": 400, "global_pooling": "gem",
                        "local_descriptors": "rootsift", "sift_side": SIDE}
    assert backbone_from_settings(settings).settings() == settings
    # a network file names no local_descriptors, and is recreated as network, not the default
    assert backbone_from_settings(grid_settings).settings() == grid_settings
    with h5py.File(extracted / "sift.h5") as file:
        assert file["features"].dtype == np.float16
    for path, stored in zip(paths, rows, strict=True):
        image = load_image(extracted / "imgs" / path)
        descriptors, metadata = root_sift(resize_for_sift(image, SIDE), ROOTSIFT["num_local"])
        real = _real(stored[:, :NUM_META])
        np.testing.assert_array_equal(real, _real(metadata))
        np.testing.assert_allclose(stored[:, :NUM_META], metadata, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(stored[:, NUM_META:], descriptors, atol=1e-3)
        norms = np.linalg.norm(stored[real, NUM_META:], axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-3)


def test_rerunning_the_extraction_resumes_it(extracted):
    report = extract_images(extracted / "imgs", extracted / "sift.h5",
                            ExtractConfig(backbone_options=ROOTSIFT)).report
    assert report.num_extracted == 0 and report.num_resumed == 8


def test_the_default_is_rootsift_and_the_network_records_no_sift_settings():
    """RootSIFT is the default; network files extracted before it was keep matching the
    network's settings."""
    assert create_backbone("efficientnet-lite0").settings() == {
        "name": "efficientnet-lite0", "image_size": 320, "local_layer": 7, "num_local": 1000,
        "global_pooling": "gem", "local_descriptors": "rootsift", "sift_side": 320}
    network = create_backbone(local_descriptors="network")
    assert network.settings() == {"name": "efficientnet-lite0", "image_size": 512,
                                  "local_layer": 7, "num_local": 300, "global_pooling": "gem"}
    with pytest.raises(InputError, match="local_descriptors must be network or rootsift"):
        create_backbone(local_descriptors="orb")


def test_each_reranker_reads_its_own_count_unless_told(extracted):
    """With no --use-local, ELViS reads the bundled RootSIFT checkpoint's 300 keypoints per
    image and sv all of them (400 stored here); a count given applies to both."""
    sift = extracted / "sift.h5"
    with FeatureStore.open(sift) as store:
        real = (store.read_local(np.arange(store.num_images))[..., META_PADDING] < 0.5).sum(1)
        elvis, sv = load_reranker("elvis", store), load_reranker("sv", store)
    assert real.max() > 300  # so that 300 and all differ
    assert (elvis.label, elvis.local_count(None), sv.local_count(None)) == (
        "efficientnet-lite0-rootsift", 300, None)
    assert elvis.local_count(50) == sv.local_count(50) == 50

    def scores(model, count=None):
        config = RerankConfig(shortlist=7, num_local=count)
        return rerank_files(sift, model=model, config=config).table["raw_score"].to_numpy()

    np.testing.assert_array_equal(scores("elvis"), scores("elvis", 300))
    assert not np.array_equal(scores("elvis"), scores("elvis", 400))
    np.testing.assert_array_equal(scores("sv"), scores("sv", 400))
    assert not np.array_equal(scores("sv"), scores("sv", 300))
