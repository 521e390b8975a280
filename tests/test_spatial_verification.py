"""Spatial verification: mutual nearest neighbours, then RANSAC on the stored positions."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from elvis_cli import ExtractConfig, FeatureStore, RerankConfig, extract_images, rerank_files
from elvis_cli.features.layout import META_COL, META_PADDING, META_ROW, NUM_META
from elvis_cli.model.reranker import Embedded
from elvis_cli.model.spatial_verification import (
    KEYPOINT_CONFIG,
    SpatialVerification,
    SpatialVerificationConfig,
    grid_spacing,
    matched_positions,
)
from tests.helpers import write_views

DIM = 32
INLIERS, OUTLIERS = 30, 10
# maps of (row, column) positions, as 3x3 matrices on homogeneous points
AFFINE = np.array([[0.9, 0.1, 0.05], [-0.08, 1.05, 0.02], [0.0, 0.0, 1.0]])
HOMOGRAPHY = np.array([[1.05, 0.04, 0.02], [-0.03, 0.95, 0.05], [0.15, -0.1, 1.0]])
FAR = 7.0  # a position no real descriptor has (fractions lie in [0, 1])


def _mapped(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    homogeneous = np.c_[points, np.ones(len(points))] @ transform.T
    return homogeneous[:, :2] / homogeneous[:, 2:]


def _embedded(descriptors: np.ndarray, positions: np.ndarray,
              padding: np.ndarray | None = None) -> Embedded:
    """One image as the engine hands it to `score`."""
    reranker = SpatialVerification()
    embedded = reranker.embed(torch.from_numpy(descriptors.astype(np.float32))[None])
    mask = None if padding is None else torch.from_numpy(padding)[None]
    return replace(embedded, mask=mask,
                   positions=torch.from_numpy(positions.astype(np.float32))[None])


def _pair(transform: np.ndarray, seed: int = 0):
    """A query and a gallery image whose first INLIERS rows map by `transform` and whose next
    OUTLIERS rows match by descriptor but lie far (0.3) from where `transform` puts them; the
    gallery's rows shuffled. Returns both sides' (descriptors, positions)."""
    rng = np.random.default_rng(seed)
    count = INLIERS + OUTLIERS
    descriptors = rng.standard_normal((count, DIM))
    cells = rng.choice(16 * 16, count, replace=False)
    positions = (np.c_[cells // 16, cells % 16] + 0.5) / 16 * 0.8 + 0.1
    targets = _mapped(transform, positions)
    angles = rng.uniform(0, 2 * np.pi, OUTLIERS)
    targets[INLIERS:] += 0.3 * np.c_[np.cos(angles), np.sin(angles)]
    order = rng.permutation(count)
    noisy = descriptors + 0.05 * rng.standard_normal(descriptors.shape)
    return (descriptors, positions), (noisy[order], targets[order])


def _score(reranker: SpatialVerification, query: Embedded, gallery: Embedded) -> float:
    return float(reranker.score(query, gallery)[0])


@pytest.mark.parametrize(("model", "transform"), [("affine", AFFINE),
                                                  ("homography", HOMOGRAPHY)])
def test_known_map_finds_the_inliers_and_rejects_the_outliers(model, transform):
    (query, query_xy), (gallery, gallery_xy) = _pair(transform)
    reranker = SpatialVerification(SpatialVerificationConfig(model=model))
    sources, _ = matched_positions(query @ gallery.T, np.zeros(len(query), bool),
                                   np.zeros(len(gallery), bool), query_xy, gallery_xy)
    assert len(sources) == INLIERS + OUTLIERS  # every designed match is mutual
    assert _score(reranker, _embedded(query, query_xy),
                  _embedded(gallery, gallery_xy)) == INLIERS


def test_a_non_matching_pair_has_no_inliers():
    rng = np.random.default_rng(1)
    query, gallery = (_embedded(rng.standard_normal((40, DIM)), rng.uniform(0, 1, (40, 2)))
                      for _ in range(2))
    assert _score(SpatialVerification(), query, gallery) == 0
    unfloored = SpatialVerification(SpatialVerificationConfig(min_inliers=0))
    assert _score(unfloored, query, gallery) < SpatialVerificationConfig().min_inliers


def test_padding_never_matches():
    """The gallery's padding rows hold the query's descriptors at mapped positions, and the
    query's padding rows the gallery's: with the flags they score nothing, without all."""
    (query, query_xy), (gallery, gallery_xy) = _pair(AFFINE)
    rng = np.random.default_rng(2)
    padding = np.r_[np.zeros(len(query), bool), np.ones(len(query), bool)]
    query_side, gallery_side = (
        (np.r_[rng.standard_normal(query.shape), descriptors],
         np.r_[rng.uniform(0, 1, query_xy.shape), positions])
        for descriptors, positions in ((query, query_xy), (gallery, gallery_xy)))
    reranker = SpatialVerification()
    assert _score(reranker, _embedded(*query_side, padding),
                  _embedded(*gallery_side, padding)) == 0
    assert _score(reranker, _embedded(*query_side), _embedded(*gallery_side)) >= INLIERS
    far = np.where(padding[:, None], FAR, gallery_side[1])
    _, targets = matched_positions(query_side[0] @ gallery_side[0].T, padding, padding,
                                   query_side[1], far)
    assert len(targets) and (targets != FAR).all()


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """Two overlapping crops of each of four photos, extracted at 256 px with the network's
    local descriptors."""
    folder = tmp_path_factory.mktemp("sv")
    write_views(folder / "imgs")
    extract_images(folder / "imgs", folder / "views.h5",
                   ExtractConfig(backbone_options={"local_descriptors": "network",
                                                   "image_size": 256, "num_local": 64}))
    return folder / "views.h5"


def test_rerank_files_verifies_views_of_one_photo(views):
    """Through the engine (several blocks, reads and workers), each pair scores what its
    stored rows give by hand; views of one photo are verified, of two never, and each
    image's other view is ranked first."""
    config = RerankConfig(shortlist=3, workers=2, cache_images=3, read_images=2)
    table = rerank_files(views, model="sv", config=config).table
    with FeatureStore.open(views) as store:
        reranker = SpatialVerification.load(store)
        rows = store.read_local(np.arange(store.num_images))
    assert reranker.threshold == pytest.approx(1.5 / 8, rel=0.05)  # 256 px: 8 cells
    for pair in table.itertuples():
        query, gallery = rows[pair.query_index], rows[pair.gallery_index]
        descriptors = [side[:, NUM_META:] / np.maximum(
            np.linalg.norm(side[:, NUM_META:], axis=1, keepdims=True), 1e-12)
            for side in (query, gallery)]
        matched = matched_positions(
            descriptors[0] @ descriptors[1].T, query[:, META_PADDING] > 0.5,
            gallery[:, META_PADDING] > 0.5, query[:, META_ROW : META_COL + 1],
            gallery[:, META_ROW : META_COL + 1])
        assert pair.raw_score == reranker.inliers(*matched)
    same_photo = (table["query_path"].str.split("_").str[0]
                  == table["gallery_path"].str.split("_").str[0])
    assert same_photo[table["rank"] == 1].all()
    verified = table["raw_score"] > 0
    assert not (verified & ~same_photo).any()  # no two photos verified as one
    assert verified.sum() >= 4


def test_same_inliers_twice(views):
    runs = [rerank_files(views, model="sv", config=RerankConfig(shortlist=4)).table
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0]["raw_score"], runs[1]["raw_score"])
    np.testing.assert_array_equal(runs[0]["gallery_index"], runs[1]["gallery_index"])


# torch, MKL, oneDNN and OpenCV on the AVX2 code path of this CPU
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2", "OPENCV_CPU_DISABLE": "AVX512-SKX"}


@pytest.mark.subprocess
def test_same_inliers_on_the_avx2_code_path(views, tmp_path):
    """The same features give the same inliers on an AVX2-only CPU (the similarity GEMM and
    OpenCV's kernels take narrower vectors there)."""
    code = ("import sys, numpy as np; from elvis_cli import RerankConfig, rerank_files; "
            "np.save(sys.argv[2], rerank_files(sys.argv[1], model='sv', "
            "config=RerankConfig(shortlist=7)).table['raw_score'].to_numpy())")
    result = subprocess.run([sys.executable, "-c", code, str(views), str(tmp_path / "avx2.npy")],
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, **AVX2},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    here = rerank_files(views, model="sv", config=RerankConfig(shortlist=7)).table
    assert here["raw_score"].gt(0).sum() >= 4
    np.testing.assert_array_equal(np.load(tmp_path / "avx2.npy"), here["raw_score"])


def test_grid_spacing_is_the_stored_cell(views):
    with FeatureStore.open(views) as store:
        assert grid_spacing(store) == pytest.approx(1 / 8, rel=0.02)


# --- keypoint features (RootSIFT): Lowe's ratio test, a homography, a threshold in pixels -----


def test_the_ratio_test_drops_ambiguous_matches_that_are_mutual():
    """A query descriptor with two almost equally near gallery descriptors is a mutual nearest
    neighbour of one of them, but fails the ratio test; distinct ones pass both."""
    rng = np.random.default_rng(3)
    query = rng.standard_normal((20, DIM))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    noise = 0.05 * rng.standard_normal(query.shape)
    twins = query[:5] - noise[:5]  # as near to the first 5 as their own copies
    gallery = np.r_[query + noise, twins]
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    positions = rng.uniform(0, 1, (len(gallery), 2))
    sides = (np.zeros(len(query), bool), np.zeros(len(gallery), bool), positions[:20], positions)
    mutual, _ = matched_positions(query @ gallery.T, *sides)
    ratio, _ = matched_positions(query @ gallery.T, *sides, ratio=0.85)
    assert len(mutual) == 20
    np.testing.assert_array_equal(ratio, positions[5:20].astype(np.float32))


def test_the_keypoint_recipe_finds_the_homographys_inliers():
    """With a cell of one pixel of a 640 px image the threshold is 8 px (0.0125): the designed
    inliers pass, the outliers 0.3 away do not."""
    (query, query_xy), (gallery, gallery_xy) = _pair(HOMOGRAPHY, seed=4)
    reranker = SpatialVerification(KEYPOINT_CONFIG, cell=1 / 640)
    assert reranker.threshold == pytest.approx(8 / 640)
    assert _score(reranker, _embedded(query, query_xy), _embedded(gallery, gallery_xy)) == INLIERS
    shifted = gallery_xy + np.where(np.arange(len(gallery_xy))[:, None] % 2, 0.03, 0.0)
    assert _score(reranker, _embedded(query, query_xy),
                  _embedded(gallery, shifted)) < INLIERS  # 0.03 = 19 px: out


@pytest.fixture(scope="module")
def keypoint_views(tmp_path_factory):
    """The four photos' two crops each, extracted with RootSIFT at 320 px."""
    folder = tmp_path_factory.mktemp("sv-sift")
    write_views(folder / "imgs")
    extract_images(folder / "imgs", folder / "views.h5", ExtractConfig(backbone_options={
        "image_size": 256, "local_descriptors": "rootsift", "sift_side": 320, "num_local": 300}))
    return folder / "views.h5"


def test_keypoint_files_get_the_keypoint_recipe(views, keypoint_views):
    with FeatureStore.open(keypoint_views) as store:
        reranker = SpatialVerification.load(store)
    assert reranker.config == KEYPOINT_CONFIG and reranker.threshold == pytest.approx(8 / 320)
    with FeatureStore.open(views) as store:
        assert SpatialVerification.load(store).config == SpatialVerificationConfig()


def test_rerank_files_verifies_keypoint_views_of_one_photo(keypoint_views):
    """Each image's other view has more inliers than any other image (a homography at 8 px
    also fits a few chance matches of unrelated photos, above the floor of 8 at times)."""
    table = rerank_files(keypoint_views, model="sv", config=RerankConfig(shortlist=7)).table
    same_photo = (table["query_path"].str.split("_").str[0]
                  == table["gallery_path"].str.split("_").str[0])
    assert same_photo[table["rank"] == 1].all()
    true_inliers = table[same_photo].set_index("query_index")["raw_score"]
    most_false = table[~same_photo].groupby("query_index")["raw_score"].max()
    assert (true_inliers >= 15).all() and (true_inliers > most_false).all()
