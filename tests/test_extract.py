"""End-to-end extraction on a folder of real good and bad images, with resume and refusals."""

import hashlib
import io
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from elvis_cli import extract as extract_module
from elvis_cli.backbones import create_backbone
from elvis_cli.errors import InputError
from elvis_cli.extract import ExtractConfig, extract_features
from elvis_cli.feature_store import FeatureStore, shard_path
from elvis_cli.images import load_image
from tests.conftest import TINY_DINOV2

OPTIONS = {"image_size": 64, "num_local": 20, "local_layer": 5}
CONFIG = ExtractConfig(backbone_options=OPTIONS, device="cpu", batch_size=2, shard_size=3)
GOOD = ["astronaut.png", "chelsea.jpg", "coffee.jpg", "sub/rocket.png", "sub/wide.jpg"]
BAD = {
    "empty.png": "empty file",
    "notes.jpg": "not a recognised image format",
    "sub/cut.jpg": "cannot decode",
}


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    photos = {
        "astronaut.png": skimage.data.astronaut(),
        "chelsea.jpg": skimage.data.chelsea(),
        "coffee.jpg": skimage.data.coffee(),
        "sub/rocket.png": skimage.data.rocket(),
        "sub/wide.jpg": skimage.data.coffee()[:100],
    }
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(images / name)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("just text\n")
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, format="JPEG")
    (images / "sub" / "cut.jpg").write_bytes(buffer.getvalue()[:3000])
    return images


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet-lite0", **OPTIONS)


def contents(path: Path) -> dict:
    with FeatureStore.open(path) as store:
        return {
            "paths": store.paths,
            "ids": store.ids,
            "sizes": store.sizes,
            "global": store.global_descriptors(),
            "local": store.read_local(range(store.num_images)),
        }


def test_extracts_good_images_and_reports_bad_ones(folder, tmp_path, backbone):
    output = tmp_path / "feats.h5"
    report = extract_features(folder, output, CONFIG, progress=False)
    assert (report.num_images, report.num_extracted, report.num_resumed) == (8, 5, 0)
    reasons = dict(report.failures)
    assert sorted(reasons) == sorted(BAD)
    for name, reason in BAD.items():
        assert reasons[name].startswith(reason)

    with FeatureStore.open(output) as store:
        assert store.paths == GOOD
        assert store.root == folder.resolve()
        assert store.backbone_settings == backbone.settings()
        assert (store.num_local, store.local_dim, store.global_dim) == (20, 112, 1280)
        assert store.ids[1] == hashlib.sha1((folder / "chelsea.jpg").read_bytes()).hexdigest()[:16]
        np.testing.assert_array_equal(store.sizes[:3], [[512, 512], [451, 300], [600, 400]])
        # each stored image equals a direct single-image run (batching and shards change nothing)
        image = backbone.preprocess(load_image(folder / "sub" / "rocket.png"))[None]
        with torch.inference_mode():
            direct = backbone(image)
        np.testing.assert_allclose(store.global_descriptors()[3], direct.global_desc[0], atol=1e-5)
        rows = store.read_local([3])[0]
        np.testing.assert_allclose(rows[:, 5:], direct.local_desc[0], atol=2e-3)
        np.testing.assert_allclose(rows[:, :4], direct.metadata[0, :, :4], atol=1e-3)

    with h5py.File(shard_path(output, 0)) as shard:  # astronaut, chelsea, coffee
        assert shard["features"].dtype == np.float16 and len(shard["paths"]) == 3
    with h5py.File(shard_path(output, 1)) as shard:  # only bad images: an empty shard
        assert shard["features"].shape == (0, 20, 117)


def test_rerun_resumes_without_work_and_keeps_outputs(folder, tmp_path):
    output = tmp_path / "feats.h5"
    extract_features(folder, output, CONFIG, progress=False)
    before = contents(output)
    stamp = output.stat().st_mtime_ns
    again = extract_features(folder, output, CONFIG, progress=False)
    assert (again.num_extracted, again.num_resumed) == (0, 5)
    assert sorted(again.failures) == sorted((name, dict(again.failures)[name]) for name in BAD)
    assert output.stat().st_mtime_ns == stamp
    shard_path(output, 2).unlink()  # an interrupted run: redo only what is missing
    partial = extract_features(folder, output, CONFIG, progress=False)
    assert (partial.num_extracted, partial.num_resumed) == (2, 3)
    assert len(partial.failures) == len(BAD)
    after = contents(output)
    for key in before:
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(before[key]))


def test_different_settings_or_images_are_refused(folder, tmp_path):
    output = tmp_path / "feats.h5"
    extract_features(folder, output, CONFIG, progress=False)
    other = ExtractConfig(backbone_options={**OPTIONS, "image_size": 96}, device="cpu")
    with pytest.raises(InputError, match="different backbone settings"):
        extract_features(folder, output, other, progress=False)
    Image.fromarray(skimage.data.camera()).save(folder / "camera.png")
    with pytest.raises(InputError, match="different image list"):
        extract_features(folder, output, CONFIG, progress=False)
    with pytest.raises(InputError, match="already exists"):
        extract_features(folder, tmp_path / "images" / "chelsea.jpg", CONFIG, progress=False)


def test_explicit_list_with_root_and_crop_boxes(folder, tmp_path, backbone):
    paths = [folder / "coffee.jpg", folder / "sub" / "rocket.png"]
    report = extract_features(
        paths,
        tmp_path / "queries.h5",
        CONFIG,
        boxes=[(10, 20, 210, 120), None],
        progress=False,
        backbone=backbone,
        root=folder,
    )
    assert report.num_extracted == 2 and not report.failures
    with FeatureStore.open(tmp_path / "queries.h5") as store:
        assert store.paths == ["coffee.jpg", "sub/rocket.png"]
        np.testing.assert_array_equal(store.sizes, [[200, 100], [640, 427]])
    with pytest.raises(InputError, match="2 crop boxes given for 1 images"):
        extract_features(paths[:1], tmp_path / "x.h5", CONFIG, boxes=[None, None], progress=False)


def test_tiny_dinov2_through_the_pipeline(folder, tmp_path):
    from transformers import Dinov2WithRegistersConfig

    config = Dinov2WithRegistersConfig(**TINY_DINOV2)
    dino = create_backbone("dinov2", model=config, image_size=56, num_local=10)
    report = extract_features(folder, tmp_path / "d.h5", CONFIG, progress=False, backbone=dino)
    assert report.num_extracted == 5
    with FeatureStore.open(tmp_path / "d.h5") as store:
        assert (store.local_dim, store.num_local, store.global_dim) == (32, 10, 32)
        np.testing.assert_allclose(np.linalg.norm(store.global_descriptors(), axis=1), 1, atol=1e-5)


def test_memory_cap_on_pending_images_keeps_results(folder, tmp_path, monkeypatch):
    big_shards = ExtractConfig(backbone_options=OPTIONS, device="cpu", batch_size=4, shard_size=8)
    extract_features(folder, tmp_path / "a.h5", big_shards, progress=False)
    monkeypatch.setattr(extract_module, "MAX_PENDING_BATCHES", 0)  # run odd shapes at once
    extract_features(folder, tmp_path / "b.h5", big_shards, progress=False)
    first, second = contents(tmp_path / "a.h5"), contents(tmp_path / "b.h5")
    assert first["paths"] == second["paths"] == GOOD
    np.testing.assert_allclose(first["global"], second["global"], atol=1e-5)
