"""A collection that grows, shrinks and changes: re-running `extract` extracts only what is new
or changed, never rewrites a finished shard, and gives what a fresh extraction gives;
`verify` checks every byte."""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from elvis_cli.backbones import create_backbone
from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.layout import manifest_path, shard_files, shard_path, shards_dir
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.verification import verify_features
from elvis_cli.util.errors import InputError
from tests.conftest import SMALL
from tests.helpers import photos, run_cli

OPTIONS = {"image_size": 64, "num_local": 16}
CONFIG = ExtractConfig(backbone_options=OPTIONS, device="cpu", batch_size=2, shard_size=2)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet-lite0", **OPTIONS)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Four photos, small (decoding stays fast): two shards of two."""
    images = tmp_path / "images"
    images.mkdir()
    for name, pixels in photos().items():
        Image.fromarray(pixels[::4, ::4]).save(images / f"{name}.png")
    return images


def add_photo(folder: Path, name: str, flip: bool = False) -> Path:
    pixels = photos()["coffee"][::3, ::3]
    path = folder / name
    Image.fromarray(pixels[:, ::-1] if flip else pixels).save(path)
    return path


def extract(folder, output, backbone, config=CONFIG, **options):
    return extract_features(folder, output, config, progress=False, backbone=backbone, **options)


def contents(path: Path) -> dict:
    with FeatureStore.open(path) as store:
        return {"paths": store.paths, "ids": store.ids, "sizes": store.sizes,
                "global": store.global_descriptors(),
                "local": store.read_local(range(store.num_images), dtype=None)}


def pick(found: dict, rows: list[int]) -> dict:
    """The contents of some images only."""
    return {key: [value[row] for row in rows] if isinstance(value, list) else value[rows]
            for key, value in found.items()}


def assert_same(found: dict, expected: dict) -> None:
    """Names, ids and descriptors bit for bit."""
    assert found["paths"] == expected["paths"] and found["ids"] == expected["ids"]
    for key in ("sizes", "global", "local"):
        assert found[key].tobytes() == expected[key].tobytes(), key


def stamps(output: Path) -> dict[str, tuple[int, bytes]]:
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in
            shard_files(output)}


@pytest.fixture
def extracted(folder, tmp_path, backbone):
    output = tmp_path / "feats.h5"
    extract(folder, output, backbone)
    return output, contents(output), stamps(output)


def test_a_grown_source_extracts_only_the_new_image(folder, extracted, backbone, tmp_path):
    output, before, shards = extracted
    add_photo(folder, "bus.png")  # sorts between astronaut and cat
    events = []
    report = extract_features(folder, output, CONFIG, progress=events.append, backbone=backbone)
    assert (report.num_extracted, report.num_resumed, report.num_removed) == (1, 4, 0)
    assert [event.total for event in events if event.done == 0] == [1]
    assert {name: stamp for name, stamp in stamps(output).items() if name in shards} == shards
    assert sorted(stamps(output)) == [*sorted(shards), "shard-00002.h5"]
    grown = contents(output)
    assert grown["paths"] == ["astronaut.png", "bus.png", "cat.png", "coffee.png", "rocket.png"]
    assert_same(pick(grown, [0, 2, 3, 4]), before)
    extract(folder, tmp_path / "fresh.h5", backbone)  # the same as extracting it anew
    assert_same(grown, contents(tmp_path / "fresh.h5"))


def test_a_removed_image_is_dropped_without_rewriting_a_shard(folder, extracted, backbone):
    output, before, shards = extracted
    with FeatureStore.open(output) as store:
        identity = store.identity()
    (folder / "cat.png").unlink()  # the second image of the first shard
    report = extract(folder, output, backbone)
    assert (report.num_extracted, report.num_resumed, report.num_removed) == (0, 3, 1)
    assert stamps(output) == shards
    assert_same(contents(output), pick(before, [0, 2, 3]))
    with FeatureStore.open(output) as store:
        assert store.identity() != identity  # caches keyed by rows see the change
    stamp = output.stat().st_mtime_ns
    again = extract(folder, output, backbone)
    assert (again.num_extracted, again.num_resumed, again.num_removed) == (0, 3, 0)
    assert output.stat().st_mtime_ns == stamp  # nothing to do, nothing rewritten


def test_a_shard_whose_images_all_went_is_deleted(folder, extracted, backbone):
    output, before, _ = extracted
    for name in ("coffee.png", "rocket.png"):  # the whole second shard
        (folder / name).unlink()
    report = extract(folder, output, backbone)
    assert (report.num_resumed, report.num_removed) == (2, 2)
    assert [path.name for path in shard_files(output)] == ["shard-00000.h5"]
    assert_same(contents(output), pick(before, [0, 1]))


def test_removed_failures_leave_the_report(folder, tmp_path, backbone):
    (folder / "notes.png").write_text("not an image")
    output = tmp_path / "feats.h5"
    assert [name for name, _ in extract(folder, output, backbone).failures] == ["notes.png"]
    assert extract(folder, output, backbone).failures[0][0] == "notes.png"  # still listed
    (folder / "notes.png").unlink()
    report = extract(folder, output, backbone)
    assert report.failures == [] and report.num_removed == 0  # it never was in the file


def test_a_new_shard_size_keeps_the_shards_and_applies_to_new_images(folder, extracted,
                                                                    backbone, tmp_path):
    output, _, shards = extracted
    for name in ("x1.png", "x2.png", "x3.png"):
        add_photo(folder, name, flip=name == "x2.png")
    bigger = ExtractConfig(**{**CONFIG.__dict__, "shard_size": 3})
    report = extract(folder, output, backbone, bigger)
    assert (report.num_extracted, report.num_resumed) == (3, 4)
    assert {name: stamp for name, stamp in stamps(output).items() if name in shards} == shards
    with h5py.File(shard_path(output, 2)) as shard:
        assert len(shard["paths"]) == 3
    extract(folder, tmp_path / "fresh.h5", backbone)
    assert_same(contents(output), contents(tmp_path / "fresh.h5"))


def test_a_changed_image_is_extracted_again_in_its_place(folder, extracted, backbone, tmp_path):
    output, before, shards = extracted
    Image.fromarray(photos()["rocket"][::5, ::5]).save(folder / "cat.png")  # new content
    report = extract(folder, output, backbone)
    assert (report.num_extracted, report.num_resumed, report.num_removed) == (1, 3, 0)
    assert stamps(output)["shard-00000.h5"] == shards["shard-00000.h5"]  # not rewritten
    changed = contents(output)
    assert changed["paths"] == before["paths"]
    assert changed["ids"][1] != before["ids"][1]
    extract(folder, tmp_path / "fresh.h5", backbone)
    assert_same(changed, contents(tmp_path / "fresh.h5"))
    again = extract(folder, output, backbone)  # its old row, still in shard 0, stays unused
    assert (again.num_extracted, again.num_resumed) == (0, 4)


def test_other_backbone_settings_are_refused_naming_them(folder, extracted):
    output, _, shards = extracted
    other = ExtractConfig(backbone_options={**OPTIONS, "image_size": 96}, device="cpu")
    with pytest.raises(InputError, match=r"other backbone settings \(image_size: 64 -> 96\): "
                                         r"use a new output, or --force to start over"):
        extract_features(folder, output, other, progress=False)
    assert stamps(output) == shards


def test_force_starts_over(folder, extracted, tmp_path):
    output, before, _ = extracted
    (shards_dir(output) / "notes.txt").write_text("mine")  # not ours: left alone
    code, out, err = run_cli("extract", folder, "-o", output, "--force", "--quiet", "--shard-size",
                             "8", "--backbone-option", "image_size=96")
    assert code == 0, err
    assert "4 images extracted, 0 kept, 0 removed, 0 skipped" in out
    assert [path.name for path in shard_files(output)] == ["shard-00000.h5"]
    assert (shards_dir(output) / "notes.txt").read_text() == "mine"
    with FeatureStore.open(output) as store:
        assert store.backbone_settings["image_size"] == 96 and store.paths == before["paths"]
    assert json.loads(manifest_path(output).read_text())["backbone"]["image_size"] == 96


def flip_a_data_byte(shard: Path) -> None:
    """One bit of one local descriptor value changed: the size stays, and so does the file's
    HDF5 structure."""
    with h5py.File(shard, "r") as file:
        offset = file["features"].id.get_offset() + 1000
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))


def test_verify_finds_a_flipped_byte_and_extract_repairs_it(folder, extracted, backbone):
    output, before, _ = extracted
    code, out, err = run_cli("verify", output)
    assert code == 0 and err == "", err
    assert out.splitlines() == [
        f"{output.name}.shards/shard-00000.h5: ok", f"{output.name}.shards/shard-00001.h5: ok",
        f"{output}: all 2 shards ok, 4 images"]
    flip_a_data_byte(shard_path(output, 1))
    FeatureStore.open(output).close()  # opening checks sizes only: it does not see this
    code, out, err = run_cli("verify", output)
    assert code == 1
    assert f"{output.name}.shards/shard-00001.h5: damaged (checksum mismatch)" in out
    assert err.splitlines() == [
        f"elvis: error: {output}: 1 of 2 shards damaged or missing (shard-00001.h5); re-run the "
        "same `elvis extract` command: it re-extracts damaged shards and rebuilds the joined "
        "file"]
    report = extract(folder, output, backbone)  # what the hint says
    assert report.repaired == ["shard-00001.h5 damaged (checksum mismatch)"]
    assert verify_features(output).ok
    assert_same(contents(output), before)


def test_verify_finds_a_damaged_joined_file(folder, extracted, backbone):
    output, before, _ = extracted
    data = bytearray(output.read_bytes())
    data[len(data) // 2] ^= 0xFF
    output.write_bytes(bytes(data))
    report = verify_features(output)
    assert not report.ok and report.problems == [f"{output.name} damaged (checksum mismatch)"]
    assert [shard.state for shard in report.shards] == ["ok", "ok"]  # from the manifest
    extract(folder, output, backbone)
    assert verify_features(output).ok
    assert_same(contents(output), before)


def test_verify_names_a_missing_shard_and_a_file_without_extraction_record(extracted):
    output, _, _ = extracted
    shard_path(output, 0).unlink()
    manifest_path(output).unlink()
    report = verify_features(output)
    assert [shard.state for shard in report.shards] == ["missing", "ok"]
    assert report.summary.endswith("no extraction record (manifest.json) beside it to repair "
                                   "from: extract again with --force")


def test_verify_a_file_without_records(tmp_path):
    rows = np.zeros((3, 4, 5 + 8), dtype=np.float16)
    with h5py.File(tmp_path / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("features", data=rows)
    code, out, err = run_cli("verify", tmp_path / "dinov2_gallery_local.hdf5")
    assert code == 0, err
    assert out.strip().endswith("no shard checksums recorded (not written by elvis extract), "
                                "so nothing to compare byte by byte; it opens and holds 3 images")
    (tmp_path / "text.h5").write_text("not hdf5")
    code, _, err = run_cli("verify", tmp_path / "text.h5")
    assert code == 1 and err.strip() == f"elvis: error: {tmp_path / 'text.h5'}: not an HDF5 file"


def test_several_paths_as_an_unquoted_glob_gives_them(folder, tmp_path):
    names = ["astronaut.png", "coffee.png", "rocket.png"]
    code, out, err = run_cli("extract", *(folder / name for name in names), "-o",
                             tmp_path / "q.h5", "--quiet", *SMALL)
    assert code == 0, err
    assert "3 images extracted, 0 kept, 0 removed, 0 skipped" in out
    with FeatureStore.open(tmp_path / "q.h5") as store:
        assert store.paths == names and store.root == folder.resolve()
    (tmp_path / "more").mkdir()
    add_photo(tmp_path / "more", "extra.jpg")
    code, out, err = run_cli("extract", folder / "cat.png", tmp_path / "more", "-o",
                             tmp_path / "mixed.h5", "--quiet", *SMALL)
    assert code == 0, err
    with FeatureStore.open(tmp_path / "mixed.h5") as store:
        assert store.paths == ["images/cat.png", "more/extra.jpg"]


def test_an_output_that_is_not_hdf5_is_refused_before_any_work(folder, tmp_path):
    code, _, err = run_cli("extract", folder, "-o", tmp_path / "feats.csv", *SMALL)
    assert code == 1 and err.splitlines() == [
        "elvis: error: output must end in .h5 or .hdf5, got feats.csv"]
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_a_manifest_of_the_previous_version_resumes_without_work(folder, extracted, backbone):
    """Written before collections could grow: shards planned by listing position, no file
    sizes and times, failures as [name, reason]."""
    output, before, shards = extracted
    manifest = json.loads(manifest_path(output).read_text())
    for start, shard in zip((0, 2), manifest["shards"], strict=True):
        for key in ("index", "stats", "dropped"):
            shard.pop(key, None)
        shard["start"] = start
    for key in ("next_shard", "joined"):
        manifest.pop(key)
    manifest_path(output).write_text(json.dumps(manifest))
    report = extract(folder, output, backbone)
    assert (report.num_extracted, report.num_resumed) == (0, 4)
    assert stamps(output) == shards
    assert_same(contents(output), before)


def test_an_interrupted_growth_resumes(folder, extracted, backbone, tmp_path, monkeypatch):
    from elvis_cli.features import extraction

    output, _, shards = extracted
    for name in ("bus.png", "dog.png", "zoo.png"):  # two new shards of two
        add_photo(folder, name, flip=name == "dog.png")
    written = []

    def interrupted(target, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(target.name)
        return write_shard(target, *args, **kwargs)

    write_shard = extraction.write_shard
    monkeypatch.setattr(extraction, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(folder, output, backbone)
    monkeypatch.undo()
    report = extract(folder, output, backbone)
    assert written == ["shard-00002.h5"]
    assert (report.num_extracted, report.num_resumed) == (1, 6)
    assert {name: stamp for name, stamp in stamps(output).items() if name in shards} == shards
    extract(folder, tmp_path / "fresh.h5", backbone)
    assert_same(contents(output), contents(tmp_path / "fresh.h5"))


def test_an_image_listed_twice_keeps_both_rows(folder, tmp_path, backbone):
    listing = tmp_path / "list.txt"
    listing.write_text("images/cat.png\nimages/rocket.png\nimages/cat.png\n")
    output = tmp_path / "feats.h5"
    extract(listing, output, backbone)
    listing.write_text(listing.read_text() + "images/coffee.png\n")
    report = extract(listing, output, backbone)
    assert (report.num_extracted, report.num_resumed) == (1, 3)
    found = contents(output)
    assert found["paths"] == ["images/cat.png", "images/rocket.png", "images/cat.png",
                              "images/coffee.png"]
    assert found["local"][0].tobytes() == found["local"][2].tobytes()
