"""Bad input everywhere, through the real `elvis` entry point (cli.main, in this process):
each case ends in one `elvis: error:` line with exit code 1, a usage error (2), or a named
skip (3); never a traceback. The expected code of every case is the README's table."""

import io
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.checkpoints import save_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.reranker import Fusion
from tests.helpers import cli_in, one_line_error, png_header_only
from tests.helpers import run_cli as run

SMALL = ["--backbone-option=image_size=64", "--backbone-option=num_local=16",
         "--backbone-option=local_layer=5", "--device=cpu", "--quiet"]


def one_error_line(code: int, err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("elvis: error: "), err
    assert pattern in lines[0], err


def write_bad_and_odd_images(folder: Path) -> dict[str, str | None]:
    """Every kind of image file; the value is the skip reason, None for images that work."""
    cat = skimage.data.chelsea()
    folder.mkdir(parents=True)
    Image.fromarray(cat).save(folder / "good photo.jpg")
    Image.fromarray(cat).convert("L").save(folder / "grey.png")
    Image.fromarray(cat).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(cat[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(cat).quantize(32).save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(cat).save(folder / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(cat).save(folder / "anim.gif", save_all=True,
                              append_images=[Image.fromarray(cat[::-1])])
    Image.fromarray(cat).save(folder / "café ünï 写真.png")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    buffer = io.BytesIO()
    Image.fromarray(cat).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:1500])
    png_header_only(folder / "bomb.png", 20_000, 20_000)
    (folder / "sub").mkdir()
    os.symlink(folder / "good photo.jpg", folder / "sub" / "link.jpg")
    os.symlink(folder, folder / "sub" / "loop")  # a folder loop: visited once
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")  # skipped while listing
    Image.fromarray(cat).save(os.fsencode(folder) + b"/latin1-\xe9t\xe9.png", format="PNG")
    return {"good photo.jpg": None, "grey.png": None, "cmyk.jpg": None, "deep16.png": None,
            "palette.png": None, "rotated.jpg": None, "anim.gif": None,
            "café ünï 写真.png": None, "sub/link.jpg": None, "latin1-\\xe9t\\xe9.png": None,
            "dot.png": "too small", "zero.jpg": "empty file",
            "text.png": "not a recognised image format", "truncated.jpg": "cannot decode",
            "bomb.png": "too large (20000x20000 px"}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """The folder of odd images, and root/feats.h5 extracted from it by the library."""
    root = tmp_path_factory.mktemp("bad")
    expected = write_bad_and_odd_images(root / "my images")
    config = ExtractConfig(backbone_options={"image_size": 64, "num_local": 16, "local_layer": 5},
                           device="cpu")
    extract_features(root / "my images", root / "feats.h5", config, progress=False)
    return root, expected


def test_every_image_kind_is_extracted_or_skipped_by_name(extracted, capsys):
    root, expected = extracted
    output = root / "cli.h5"
    code, out, err = run("extract", root / "my images", "-o", output, *SMALL)
    assert code == 3
    skipped = dict(line.removeprefix("elvis: skipped ").split(": ", 1)
                   for line in err.strip().splitlines())
    assert {name for name, reason in expected.items() if reason} == set(skipped)
    for name, reason in skipped.items():
        assert reason.startswith(expected[name]), (name, reason)
    with FeatureStore.open(output) as store:
        assert sorted(store.paths) == sorted(n for n, r in expected.items() if r is None)
        sizes = dict(zip(store.paths, store.sizes.tolist(), strict=True))
    assert sizes["rotated.jpg"] == [300, 451]  # EXIF orientation applied: upright is portrait
    assert "10 images extracted" in out


@pytest.mark.parametrize(("args", "pattern"), [
    (["extract", "{root}/empty", "-o", "x.h5"], "no images found"),
    (["extract", "{root}/nowhere", "-o", "x.h5"], "no such file or folder"),
    (["extract", "{root}/my images", "-o", "x.h5", "--backbone", "efficientnet_lite0"],
     "unknown backbone 'efficientnet_lite0' (did you mean 'efficientnet-lite0'?)"),
    (["extract", "{root}/my images", "-o", "x.h5", "--image-size", "0"], "image_size must be"),
    (["extract", "{root}/my images", "-o", "x.h5", "--image-size", "-3"], "image_size must be"),
    (["extract", "{root}/my images", "-o", "x.h5", "--keep-local", "0"], "num_local >= 1"),
    (["extract", "{root}/my images", "-o", "x.h5", "--backbone-option", "nonsense"],
     "KEY=VALUE"),
    (["rerank", "--features", "{root}/missing.h5"], "features file not found"),
    (["rerank", "--features", "{root}/text.h5"], "not an HDF5 file"),
    (["shortlist", "--features", "{root}/layout.h5"], "expected (N, K, 5 + D)"),
    (["rerank", "--features", "{root}/feats.h5", "--checkpoint", "dinov2_elvis_gdl"],
     "(did you mean 'dinov2_elvis_gld'?)"),
    (["rerank", "--features", "{root}/feats.h5", "-o", "out.txt"], "must end in .csv"),
])
def test_bad_paths_files_and_options_are_one_line(extracted, capsys, args, pattern):
    root, _ = extracted
    (root / "empty").mkdir(exist_ok=True)
    (root / "text.h5").write_text("not hdf5")
    with h5py.File(root / "layout.h5", "w") as file:
        file.create_dataset("features", data=np.zeros((3, 4)))
    code, _, err = run(*(a.format(root=root) for a in args))
    one_error_line(code, err, pattern)


@pytest.mark.parametrize("args", [
    ["extract", "x", "-o", "y.h5", "--batch-size", "0"],
    ["extract", "x", "-o", "y.h5", "--shard-size", "-1"],
    ["shortlist", "--features", "f.h5", "-k", "0"],
    ["rerank", "--shortlist", "-5"],
    ["rerank", "--use-local", "0"],
    ["extract", "x"],
])
def test_out_of_range_options_are_usage_errors(args, capsys):
    code, _, err = run(*args)
    assert code == 2 and err.strip().splitlines()[-1].startswith("Error:"), err


def features_file(path: Path, rows: np.ndarray, global_desc: np.ndarray) -> Path:
    """A features file in our layout, written by the library from chosen descriptor values."""
    from elvis_cli.features.layout import shard_path
    from elvis_cli.features.writer import finalize, write_shard

    count = len(rows)
    write_shard(shard_path(path, 0), rows, global_desc, [f"img{i}.jpg" for i in range(count)],
                [f"{i:016x}" for i in range(count)], np.full((count, 2), 64))
    finalize(path, [shard_path(path, 0)], {"name": "efficientnet-lite0"}, path.parent)
    return path


def descriptor_rows(rng: np.random.Generator, count: int, k: int = 5, d: int = 8) -> np.ndarray:
    rows = np.zeros((count, k, 5 + d), dtype=np.float32)
    rows[..., 5:] = rng.standard_normal((count, k, d))
    rows[..., 5:] /= np.linalg.norm(rows[..., 5:], axis=-1, keepdims=True)
    return rows


def unit(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.standard_normal((count, 6)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    import torch

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "c.pt", Elvis(ElvisConfig(descriptor_dim=8)),
                    {"name": "efficientnet-lite0"}, Fusion(0.5, 0.5))
    return tmp_path / "c.pt"


@pytest.fixture
def four_images(tmp_path) -> Path:
    """A features file of 4 images; image 2 has no valid descriptor at all: every row is
    padding."""
    rng = np.random.default_rng(0)
    rows = descriptor_rows(rng, 4)
    rows[2, :, 3] = 1
    rows[2, :, 5:] = 0
    return features_file(tmp_path / "f.h5", rows, unit(rng, 4))


def one_image(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    return features_file(tmp_path / "one.h5", descriptor_rows(rng, 1), unit(rng, 1))


@pytest.fixture
def four_reranked(tmp_path, checkpoint, four_images, capsys) -> pd.DataFrame:
    """All-vs-all over the four images (image 2 is padding only), shortlist 50 asked for."""
    code, _, err = run("rerank", "--features", four_images, "--checkpoint", checkpoint,
                       "--shortlist", "50", "-o", tmp_path / "r.csv")
    assert code == 0, err
    return pd.read_csv(tmp_path / "r.csv")


def test_a_shortlist_longer_than_the_gallery_is_cut_to_it(four_reranked):
    table = four_reranked
    assert len(table) == 4 * 3 and table["score"].notna().all()  # the query itself left out


def test_an_image_of_padding_only_gets_a_finite_score(four_reranked):
    table = four_reranked
    assert (table["gallery_index"] == 2).sum() == 3
    assert np.isfinite(table["raw_score"]).all()


def test_all_vs_all_over_one_image_is_a_one_line_error(tmp_path, checkpoint, capsys):
    code, _, err = run("rerank", "--features", one_image(tmp_path), "--checkpoint", checkpoint)
    one_error_line(code, err, "at least one query and one other gallery image")


def test_queries_against_a_one_image_gallery(tmp_path, checkpoint, four_images, capsys):
    code, _, err = run("rerank", "--queries", four_images, "--gallery", one_image(tmp_path),
                       "--checkpoint", checkpoint, "--shortlist", "10", "-o",
                       tmp_path / "q.csv")
    assert code == 0 and len(pd.read_csv(tmp_path / "q.csv")) == 4, err


def test_nan_in_a_padding_row_is_harmless(tmp_path, checkpoint, capsys):
    rng = np.random.default_rng(2)
    poisoned = descriptor_rows(rng, 3)
    poisoned[0, 4, 3], poisoned[0, 4, 6] = 1, np.nan
    bad = features_file(tmp_path / "padding_nan.h5", poisoned, unit(rng, 3))
    code, _, err = run("rerank", "--features", bad, "--checkpoint", checkpoint, "-o",
                       tmp_path / "p.csv")
    assert code == 0 and np.isfinite(pd.read_csv(tmp_path / "p.csv")["raw_score"]).all(), err


@pytest.mark.parametrize(("image", "value"), [(1, np.nan), (2, np.inf), (2, -np.inf)])
def test_non_finite_local_descriptors_name_the_first_image(tmp_path, checkpoint, capsys,
                                                           image, value):
    rng = np.random.default_rng(3)
    poisoned = descriptor_rows(rng, 3)
    poisoned[image, 0, 7] = value
    bad = features_file(tmp_path / "bad.h5", poisoned, unit(rng, 3))
    result = cli_in("rerank", "--features", bad, "--checkpoint", checkpoint, cwd=tmp_path)
    one_line_error(result, f"NaN/inf local descriptors, first 'img{image}.jpg'")


def test_non_finite_global_descriptors_name_the_first_image(tmp_path, capsys):
    rng = np.random.default_rng(4)
    glob_nan = unit(rng, 3)
    glob_nan[0, 0] = np.inf
    bad = features_file(tmp_path / "inf.h5", descriptor_rows(rng, 3), glob_nan)
    code, _, err = run("shortlist", "--features", bad, "-o", tmp_path / "s.npz")
    one_error_line(code, err, "NaN/inf global descriptors, first 'img0.jpg'")
