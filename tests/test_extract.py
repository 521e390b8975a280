"""End-to-end extraction on a folder of real good and bad images, with resume and refusals."""

import hashlib
import io
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from elvis_cli.backbones import create_backbone
from elvis_cli.features import extraction as extract_module
from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.images import load_image
from elvis_cli.features.layout import shard_path
from elvis_cli.features.store import FeatureStore
from elvis_cli.util.errors import InputError
from tests.conftest import TINY_DINOV2

OPTIONS = {"local_descriptors": "network", "image_size": 64, "num_local": 20, "local_layer": 5}
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


def test_different_settings_or_a_file_of_others_are_refused(folder, tmp_path):
    output = tmp_path / "feats.h5"
    extract_features(folder, output, CONFIG, progress=False)
    other = ExtractConfig(backbone_options={**OPTIONS, "image_size": 96}, device="cpu")
    with pytest.raises(InputError, match=r"other backbone settings \(image_size: 64 -> 96\)"):
        extract_features(folder, output, other, progress=False)
    (tmp_path / "theirs.h5").write_bytes(b"not ours")
    with pytest.raises(InputError, match="already exists and is no output of elvis extract"):
        extract_features(folder, tmp_path / "theirs.h5", CONFIG, progress=False)
    assert (tmp_path / "theirs.h5").read_bytes() == b"not ours"


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
    dino = create_backbone("dinov2", model=config, image_size=56, num_local=10, detector="none")
    report = extract_features(folder, tmp_path / "d.h5", CONFIG, progress=False, backbone=dino)
    assert report.num_extracted == 5
    with FeatureStore.open(tmp_path / "d.h5") as store:
        assert (store.local_dim, store.num_local, store.global_dim) == (32, 10, 32)
        np.testing.assert_allclose(np.linalg.norm(store.global_descriptors(), axis=1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_dino():
    from transformers import Dinov2WithRegistersConfig

    torch.manual_seed(0)
    return create_backbone("dinov2", model=Dinov2WithRegistersConfig(**TINY_DINOV2),
                           image_size=140, num_local=10, detector="none")


def test_query_crop_is_scaled_like_its_full_image(tmp_path, tiny_dino):
    """The authors' crop: s = 140 / 700 from the full image; the box (cut with int()) is
    140 x 70 px, so 28 x 14 px (2 x 1 patches of 14): 2 real rows and 8 padding rows. Resizing
    the crop to the full size would give 140 x 70 px and 50 patches."""
    Image.fromarray(np.tile(skimage.data.coffee(), (1, 2, 1))[:350, :700]).save(tmp_path / "q.png")
    report = extract_features([tmp_path / "q.png"], tmp_path / "q.h5", CONFIG, progress=False,
                              boxes=[(100.9, 50.7, 240.2, 120.9)], backbone=tiny_dino)
    assert report.num_extracted == 1
    crop = load_image(tmp_path / "q.png")[50:120, 100:240]
    assert tiny_dino.preprocess(crop, 700).shape == (3, 14, 28)
    with FeatureStore.open(tmp_path / "q.h5") as store:
        np.testing.assert_array_equal(store.sizes, [[140, 70]])
        rows = store.read_local([0])[0]
    np.testing.assert_array_equal(rows[:, 3], [0, 0] + [1] * 8)
    np.testing.assert_array_equal(rows[2:], np.pad(np.ones((8, 1)), ((0, 0), (3, 33))))
    np.testing.assert_allclose(sorted(rows[:2, 1]), [0.25, 0.75])  # columns of a 1 x 2 grid
    np.testing.assert_allclose(rows[:2, 0], [0.5, 0.5])


def test_truncated_images_decoded_on_request_with_a_warning(folder, tmp_path, backbone):
    cut = [folder / "sub" / "cut.jpg"]
    skipped = extract_features(cut, tmp_path / "a.h5", CONFIG, progress=False, backbone=backbone)
    assert skipped.num_extracted == 0 and skipped.failures[0][1].startswith("cannot decode")
    tolerant = ExtractConfig(**{**CONFIG.__dict__, "decode_truncated": True})
    report = extract_features(cut, tmp_path / "b.h5", tolerant, progress=False, backbone=backbone)
    assert report.num_extracted == 1 and not report.failures
    assert report.warnings == [("cut.jpg", report.warnings[0][1])]
    assert report.warnings[0][1].startswith("decoded as far as it goes")
    again = extract_features(cut, tmp_path / "b.h5", tolerant, progress=False, backbone=backbone)
    assert again.num_resumed == 1 and again.warnings == report.warnings  # kept in the manifest


@pytest.fixture(scope="module")
def weighted(tmp_path_factory, tiny_dino):
    """Two images extracted with the tiny DINOv2 and all three global types, then exported in
    the official layout; the backbone's direct output for the second image."""
    from elvis_cli.features.official_export import export_official

    folder = tmp_path_factory.mktemp("weighted")
    paths = [folder / "coffee.jpg", folder / "rocket.png"]
    Image.fromarray(skimage.data.coffee()).save(paths[0])
    Image.fromarray(skimage.data.rocket()).save(paths[1])
    config = ExtractConfig(device="cpu", global_types=("og-avg", "w-avg"))
    extract_features(paths, folder / "f.h5", config, progress=False, backbone=tiny_dino)
    with torch.inference_mode():
        direct = tiny_dino(tiny_dino.preprocess(load_image(paths[1]))[None])
    written = export_official(folder / "f.h5", folder / "out", "dinov2", "query")
    return SimpleNamespace(folder=folder, paths=paths, features=folder / "f.h5", direct=direct,
                           written=written)


def test_weighted_global_descriptors_are_stored(weighted):
    with FeatureStore.open(weighted.features) as store:
        assert store.global_types == ["cls", "og-avg", "w-avg"]
        for kind in ("w-avg", "og-avg"):
            np.testing.assert_allclose(store.global_descriptors(kind)[1],
                                       weighted.direct.pooled[kind][0], atol=1e-6)


def test_export_writes_the_local_file_then_one_per_global_type(weighted):
    assert [p.name for p in weighted.written] == [
        "dinov2_query_local.hdf5", "dinov2_query_cls.hdf5", "dinov2_query_og-avg.hdf5",
        "dinov2_query_w-avg.hdf5"]


def test_exported_local_file_holds_the_rows_in_float16(weighted):
    with FeatureStore.open(weighted.features) as store:
        local = store.read_local([0, 1])
    with h5py.File(weighted.written[0]) as file:
        assert list(file) == ["features"] and file["features"].dtype == np.float16
        np.testing.assert_array_equal(file["features"][()], local.astype(np.float16))


def test_exported_global_file_holds_the_descriptors_in_float16(weighted):
    with h5py.File(weighted.written[3]) as file:
        assert list(file) == ["features"] and file["features"].shape == (2, 32)
        assert file["features"].dtype == np.float16
        np.testing.assert_allclose(file["features"][1], weighted.direct.pooled["w-avg"][0],
                                   atol=1e-3)


def test_exported_files_read_back_as_a_release(weighted):
    from elvis_cli.features.released import open_local

    with open_local(weighted.written[0]) as exported:  # globals beside it
        assert exported.global_types == ["cls", "w-avg", "og-avg"]
        with FeatureStore.open(weighted.features) as store:
            for kind in exported.global_types:
                np.testing.assert_array_equal(exported.global_descriptors(kind), store.
                                              global_descriptors(kind).astype(np.float16))


def test_export_of_a_global_type_not_extracted_is_refused(weighted, tmp_path, tiny_dino):
    from elvis_cli.features.official_export import export_official

    cls_only = tmp_path / "cls.h5"
    extract_features(weighted.paths, cls_only, ExtractConfig(device="cpu"), progress=False,
                     backbone=tiny_dino)
    with pytest.raises(InputError, match="no 'og-avg' global"):
        export_official(cls_only, tmp_path / "out", "dinov2", "gallery", ["og-avg"])


def test_a_global_type_the_backbone_lacks_is_refused(weighted, tmp_path):
    with pytest.raises(InputError, match=r"no w-avg global descriptor; it has cls$"):
        extract_features(weighted.paths, tmp_path / "e.h5", ExtractConfig(global_types=["w-avg"]),
                         progress=False)


def watch_pending(monkeypatch) -> list[int]:
    """Installs a watch on extraction; the returned list gets, before each decoded image is
    handed over and once after the last, how many handed-over images are not yet encoded:
    those pending in memory, waiting for a batch of their shape."""
    seen: list[int] = []
    handed = [0]
    encoded = [0]
    in_order, encode = extract_module.in_order, extract_module._encode

    def watched_in_order(*args, **kwargs):
        for item in in_order(*args, **kwargs):
            seen.append(handed[0] - encoded[0])
            handed[0] += item.inputs is not None
            yield item
        seen.append(handed[0] - encoded[0])

    def watched_encode(backbone, inputs, device):
        encoded[0] += len(inputs)
        return encode(backbone, inputs, device)

    monkeypatch.setattr(extract_module, "in_order", watched_in_order)
    monkeypatch.setattr(extract_module, "_encode", watched_encode)
    return seen


BIG_SHARDS = ExtractConfig(backbone_options=OPTIONS, device="cpu", batch_size=4, shard_size=8)


@pytest.fixture
def capped(folder, tmp_path, monkeypatch):
    """The folder extracted with the default cap on pending images (4 batches), then with a
    cap of 0, each run watched."""
    uncapped = watch_pending(monkeypatch)
    extract_features(folder, tmp_path / "a.h5", BIG_SHARDS, progress=False)
    monkeypatch.setattr(extract_module, "MAX_PENDING_BATCHES", 0)  # run odd shapes at once
    capped = watch_pending(monkeypatch)
    extract_features(folder, tmp_path / "b.h5", BIG_SHARDS, progress=False)
    return uncapped, capped


def test_pending_images_never_exceed_the_memory_cap(capped):
    uncapped, capped = capped
    assert max(uncapped) > 0  # without the cap images wait for company: the cap binds here
    assert len(capped) == len(GOOD) + len(BAD) + 1
    assert max(capped) == 0  # a cap of 0 batches: each image is encoded before the next comes


def test_memory_cap_on_pending_images_keeps_results(capped, tmp_path):
    first, second = contents(tmp_path / "a.h5"), contents(tmp_path / "b.h5")
    assert first["paths"] == second["paths"] == GOOD
    np.testing.assert_allclose(first["global"], second["global"], atol=1e-5)
