
"""Checkpoints in the official format: loading, weights-only safety, clear one-line errors."""

import os
import pickle
import urllib.error
import urllib.request

import pytest
import torch

from elvis_cli.model.checkpoints import (
    BUNDLED_CHECKPOINTS,
    WEIGHTS_DIR,
    Fusion,
    check_compatible,
    default_checkpoint_for,
    load_checkpoint,
    save_checkpoint,
)
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.util.errors import InputError, ModelMismatchError, OfflineError


def official_file(path, dim=32, **extra):
    torch.manual_seed(0)
    state = Elvis(ElvisConfig(descriptor_dim=dim)).state_dict()
    torch.save({"state": state, "optim": {"lr": 1e-3}, "epoch": 7, **extra}, path)
    return state


def test_official_format_loads_and_ignores_other_keys(tmp_path):
    state = official_file(tmp_path / "ckpt.pt", dim=32)
    checkpoint = load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint.descriptor_dim == 32
    assert checkpoint.fusion == Fusion(0.5, 0.5)  # the paper's defaults
    for key, value in checkpoint.model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_our_metadata_round_trips(tmp_path):
    model = Elvis(ElvisConfig(descriptor_dim=16))
    backbone = {"name": "efficientnet-lite0", "local_layer": 5, "image_size": 512}
    save_checkpoint(tmp_path / "ours.pt", model, backbone, Fusion(0.25, 0.05), {"photos": 3})
    checkpoint = load_checkpoint(tmp_path / "ours.pt")
    assert checkpoint.backbone == backbone
    assert checkpoint.fusion == Fusion(0.25, 0.05)
    assert checkpoint.info == {"photos": 3}


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = Elvis(ElvisConfig(descriptor_dim=8)).state_dict()
    del state["dust_bin"]
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state": state}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"missing dust_bin; unexpected extra\.weight"):
        load_checkpoint(tmp_path / "bad.pt")


def test_not_official_format(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not in the official format"):
        load_checkpoint(tmp_path / "other.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("save", "message"), [
    (torch.save, "refusing to load checkpoint"),
    (lambda payload, path: torch.save(payload, path, _use_new_zipfile_serialization=False),
     "refusing to load checkpoint"),
    (lambda payload, path: path.write_bytes(pickle.dumps(payload)), "is a Python pickle"),
], ids=["torch", "torch-legacy", "pickle"])
def test_code_in_a_checkpoint_is_never_executed(tmp_path, save, message):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    save({"state": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=message):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_unknown_name_lists_known_ones():
    with pytest.raises(InputError, match="dinov2_elvis_gld"):
        load_checkpoint("dinov2_elvis_gdl")


def test_official_name_offline_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ELVIS_CACHE", str(tmp_path))

    def no_network(request, timeout):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(OfflineError) as error:
        load_checkpoint("dinov2_elvis_gld")
    message = str(error.value)
    assert "\n" not in message and "dinov2_elvis_gld.pt" in message and "--checkpoint" in message


def test_official_name_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELVIS_CACHE", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    official_file(tmp_path / "checkpoints" / "dinov2_elvis_sop.pt", dim=24)
    checkpoint = load_checkpoint("dinov2_elvis_sop")
    assert checkpoint.backbone == {"name": "dinov2"} and checkpoint.descriptor_dim == 24


def test_mismatches_name_both_sides(tmp_path):
    model = Elvis(ElvisConfig(descriptor_dim=16))
    save_checkpoint(tmp_path / "c.pt", model, {"name": "efficientnet-lite0", "local_layer": 5},
                    Fusion())
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(ModelMismatchError, match=r"expects 16-d.*are 32-d"):
        check_compatible(checkpoint, {"name": "efficientnet-lite0", "local_layer": 5}, 32)
    with pytest.raises(ModelMismatchError, match=r"efficientnet-lite0.*dinov2"):
        check_compatible(checkpoint, {"name": "dinov2"}, 16)
    check_compatible(checkpoint, {"name": "efficientnet-lite0", "local_layer": 5,
                                  "image_size": 640}, 16)  # image size does not matter


def test_default_checkpoint_follows_the_backbone():
    assert default_checkpoint_for({"name": "dinov2"}) == "dinov2_elvis_gld"
    lite0 = {"name": "efficientnet-lite0", "local_layer": 7, "image_size": 512}
    assert default_checkpoint_for(lite0) == "efficientnet-lite0"
    assert default_checkpoint_for(lite0, "ames") == "efficientnet-lite0-ames"
    with pytest.raises(InputError, match="pass --checkpoint"):
        default_checkpoint_for(None)
    with pytest.raises(InputError, match=r"of efficientnet-lite0 local_layer=5: pass"):
        default_checkpoint_for({**lite0, "local_layer": 5})
    rootsift = {**lite0, "local_descriptors": "rootsift", "sift_side": 640}
    assert default_checkpoint_for(rootsift) == "efficientnet-lite0-rootsift"
    with pytest.raises(InputError, match=r"no default AMES checkpoint .*=rootsift: pass"):
        default_checkpoint_for(rootsift, "ames")


@pytest.mark.parametrize("name", list(BUNDLED_CHECKPOINTS))
def test_each_bundled_checkpoint_holds_what_its_entry_says(name):
    """The entry decides which features get it by default; the file must agree."""
    bundled = BUNDLED_CHECKPOINTS[name]
    checkpoint = load_checkpoint(name)
    assert checkpoint.architecture == bundled.architecture
    assert {key: checkpoint.backbone[key] for key in bundled.backbone} == bundled.backbone
    assert checkpoint.info["rounds"] >= 1  # trained by `elvis train`, which records its run


def test_wrongly_shaped_and_non_finite_weights_are_one_line_errors(tmp_path):
    state = Elvis(ElvisConfig(descriptor_dim=8)).state_dict()
    state["dust_bin_mlp.0.weight"] = torch.zeros(64, 128)
    torch.save({"state": state}, tmp_path / "shape.pt")
    with pytest.raises(InputError, match=r"wrongly shaped dust_bin_mlp\.0\.weight: \(64, 128\)"):
        load_checkpoint(tmp_path / "shape.pt")
    state = Elvis(ElvisConfig(descriptor_dim=8)).state_dict()
    state["dust_bin"] = torch.tensor(float("nan"))
    torch.save({"state": state}, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="non-finite dust_bin") as error:
        load_checkpoint(tmp_path / "nan.pt")
    assert "\n" not in str(error.value)


def test_binarised_checkpoint_is_detected_from_its_state_dict(tmp_path):
    """remap_local.0.W (the ITQ projection) marks the authors' Matcher(binarized=True) form;
    binarised features need it, float features suit both kinds."""
    torch.manual_seed(0)
    state = Elvis(ElvisConfig(descriptor_dim=24, binarised=True)).state_dict()
    state["remap_local.0.W"] = torch.randn(24, 128)
    torch.save({"state": state, "epoch": 1}, tmp_path / "dist.pt")
    checkpoint = load_checkpoint(tmp_path / "dist.pt")
    assert checkpoint.model.config.binarised and checkpoint.descriptor_dim == 24
    torch.testing.assert_close(checkpoint.model.remap_local[0].W, state["remap_local.0.W"])
    check_compatible(checkpoint, None, 128, binarised=True)
    check_compatible(checkpoint, None, 24)
    with pytest.raises(ModelMismatchError, match="expects 128-bit binarised descriptors"):
        check_compatible(checkpoint, None, 64, binarised=True)
    official_file(tmp_path / "plain.pt", dim=128)
    with pytest.raises(ModelMismatchError, match=r"binarised \(128 bits\) but checkpoint 'plain'"):
        check_compatible(load_checkpoint(tmp_path / "plain.pt"), None, 128, binarised=True)


def test_bundled_checkpoints_use_their_own_count_and_fusion():
    """A bundled checkpoint is used with its entry's count and fusion; the RootSIFT one with
    the fusion chosen on validation at the default's features, not the one its training
    stored, the others with their stored fusion."""
    for name, bundled in BUNDLED_CHECKPOINTS.items():
        loaded = load_checkpoint(name)
        stored = Fusion(**torch.load(WEIGHTS_DIR / bundled.file,
                                     weights_only=True)["elvis_cli"]["fusion"])
        assert loaded.fusion == (bundled.fusion or stored)
        assert loaded.num_local == bundled.num_local
        if name == "efficientnet-lite0-rootsift":
            assert loaded.fusion != stored
