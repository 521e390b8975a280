"""The `elvis` command end to end, as a user runs it: real processes, exit codes and stderr."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from elvis_cli.evaluation.metrics import revisitop_map
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.checkpoints import save_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.reranker import Fusion
from elvis_cli.retrieval.shortlist import build_shortlist

SMALL = ["--backbone-option", "image_size=64", "--backbone-option", "num_local=16"]


def elvis(*args, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ELVIS_CACHE": str(cwd / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "elvis_cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def photos() -> dict[str, np.ndarray]:
    return {"astronaut": skimage.data.astronaut(), "cat": skimage.data.chelsea(),
            "coffee": skimage.data.coffee(), "rocket": skimage.data.rocket()}


def write_views(folder: Path) -> list[str]:
    """Two crops of each photo, so every image has a true match."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, pixels in photos().items():
        h, w = pixels.shape[:2]
        for i, crop in enumerate((pixels[: 3 * h // 4, : 3 * w // 4], pixels[h // 4 :, w // 4 :])):
            Image.fromarray(crop).save(folder / f"{name}_{i}.jpg")
            names.append(f"{name}_{i}")
    return names


def random_checkpoint(path: Path, dim: int, backbone: dict) -> Path:
    import torch

    torch.manual_seed(0)
    save_checkpoint(path, Elvis(ElvisConfig(descriptor_dim=dim)), backbone, Fusion(0.5, 0.1))
    return path


def test_version_and_help(tmp_path):
    assert elvis("--version", cwd=tmp_path).stdout.startswith("elvis-cli ")
    for command in ("extract", "shortlist", "rerank", "evaluate", "train"):
        result = elvis(command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Example" in result.stdout, command


def test_extract_skips_bad_images_names_them_and_exits_3(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    cat = skimage.data.chelsea()
    Image.fromarray(cat).save(images / "good.jpg")
    Image.fromarray(cat).convert("L").save(images / "gray.png")
    Image.fromarray(cat).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(cat[..., 0].astype(np.uint16) * 257).save(images / "deep16.png")
    Image.new("RGB", (1, 1)).save(images / "tiny.png")
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    (images / "corrupt.jpg").write_bytes((images / "good.jpg").read_bytes()[:2000])
    result = elvis("extract", images, "-o", "feats.h5", "--quiet", *SMALL, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    skipped = {line.split()[2].rstrip(":") for line in result.stderr.splitlines()
               if line.startswith("elvis: skipped")}
    assert skipped == {"tiny.png", "empty.jpg", "text.jpg", "corrupt.jpg"}
    assert "Traceback" not in result.stderr
    with FeatureStore.open(tmp_path / "feats.h5") as store:
        assert sorted(store.paths) == ["cmyk.jpg", "deep16.png", "good.jpg", "gray.png"]
    again = elvis("extract", images, "-o", "feats.h5", "--quiet", *SMALL, cwd=tmp_path)
    assert again.returncode == 3 and "0 images extracted" in again.stdout  # resumed, kept


def test_extract_then_rerank_in_the_same_folder(tmp_path):
    write_views(tmp_path / "imgs")
    assert elvis("extract", "imgs", "-o", "feats.h5", "--quiet", *SMALL,
                 cwd=tmp_path).returncode == 0
    with FeatureStore.open(tmp_path / "feats.h5") as store:
        random_checkpoint(tmp_path / "c.pt", store.local_dim, store.backbone_settings)
    result = elvis("rerank", "--shortlist", "3", "--checkpoint", "c.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "reranked.csv")
    assert list(table.columns) == ["query_index", "query_path", "rank", "gallery_index",
                                   "gallery_path", "global_score", "raw_score", "score"]
    assert len(table) == 8 * 3 and (table["query_path"] != table["gallery_path"]).all()
    fused = 0.5 * table["global_score"] + 0.5 / (1 + np.exp(-0.1 * table["raw_score"]))
    np.testing.assert_allclose(table["score"], fused, rtol=1e-5)
    for _, rows in table.groupby("query_index"):
        assert (np.diff(rows["score"].to_numpy()) <= 1e-7).all()  # sorted by fused score
    filled = elvis("extract", "imgs", "-o", "feats.h5", "--quiet", *SMALL, "--embedding-cache",
                   "kept", "--checkpoint", "c.pt", cwd=tmp_path)  # resumes: embeds only
    assert filled.returncode == 0 and "8 images embedded by c" in filled.stdout, filled.stderr
    parquet = elvis("rerank", "--shortlist", "2", "--checkpoint", "c.pt", "-o", "r.parquet",
                    "--workers", "1", "--embedding-cache", "kept", cwd=tmp_path)
    assert parquet.returncode == 0, parquet.stderr
    assert len(list((tmp_path / "kept").glob("*/part-*.h5"))) == 1  # nothing embedded again
    one_thread = pd.read_parquet(tmp_path / "r.parquet")
    assert len(one_thread) == 16
    both = table.merge(one_thread, on=["query_index", "gallery_index"], suffixes=("", "_one"))
    assert len(both) == 16  # same bits with one worker thread as with two
    assert (both["raw_score"].astype(np.float32) == both["raw_score_one"]).all()
    half = elvis("rerank", "--checkpoint", "c.pt", "--device", "cpu", "--precision", "float16",
                 cwd=tmp_path)
    assert half.returncode == 1 and "needs a CUDA device" in half.stderr, half.stderr


def test_mismatched_checkpoint_is_one_line_naming_both(tmp_path):
    write_views(tmp_path / "imgs")
    elvis("extract", "imgs", "-o", "feats.h5", "--quiet", *SMALL, cwd=tmp_path)
    random_checkpoint(tmp_path / "wrong_dim.pt", 7, {"name": "efficientnet-lite0"})
    random_checkpoint(tmp_path / "other.pt", 320, {"name": "dinov2"})
    for checkpoint, pattern in (("wrong_dim.pt", "expects 7-d"), ("other.pt", "dinov2")):
        result = elvis("rerank", "--checkpoint", checkpoint, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert pattern in lines[0] and "efficientnet-lite0" in lines[0]


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    cases = [("rerank", "--features", "missing.h5"),
             ("extract", "nowhere/", "-o", "x.h5"),
             ("extract", tmp_path, "-o", "x.h5", "--backbone", "efficientnet-lite9"),
             ("evaluate", "--data-root", tmp_path, "--all-datasets")]
    for args in cases:
        result = elvis(*args, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith("elvis: error:") and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_evaluate_a_revisitop_dataset(tmp_path):
    root = tmp_path / "data" / "mini"
    names = write_views(root / "jpg")
    queries = [n for n in names if n.endswith("_0")]
    gallery = [n for n in names if n.endswith("_1")]
    gnd = [{"easy": [], "hard": [i], "junk": [], "bbx": [0, 0, 10_000, 10_000]}
           for i in range(len(queries))]
    gnd[0] = {"easy": [0], "hard": [], "junk": [1]}
    cut = root / "jpg" / "rocket_1.jpg"  # a truncated gallery image: decoded, with a warning
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with open(root / "gnd_mini.pkl", "wb") as handle:
        pickle.dump({"imlist": gallery, "qimlist": queries, "gnd": gnd}, handle)
    result = elvis("evaluate", "--data-root", tmp_path / "data", "--all-datasets", *SMALL,
                   "--checkpoint", "ckpt.pt", "--shortlist", "0", "2", "--out-dir", "out",
                   "--quiet", cwd=tmp_path)
    assert result.returncode == 1 and "ckpt.pt" in result.stderr  # no such checkpoint yet
    features = next((root / "features").glob("*/gallery.h5"))
    with FeatureStore.open(features) as store:
        random_checkpoint(tmp_path / "ckpt.pt", store.local_dim, store.backbone_settings)
        gallery_global = store.global_descriptors()
    result = elvis("evaluate", "--data-root", tmp_path / "data", "--all-datasets", *SMALL,
                   "--checkpoint", "ckpt.pt", "--shortlist", "0", "2", "--out-dir", "out",
                   "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "elvis: warning: mini: rocket_1.jpg: decoded as far as it goes" in result.stderr
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["shortlist"] for row in rows] == [0, 2]
    assert (tmp_path / "out" / "results.csv").is_file()
    assert (tmp_path / "out" / "runtime.png").read_bytes()[:4] == b"\x89PNG"
    with FeatureStore.open(next((root / "features").glob("*/query.h5"))) as store:
        query_global = store.global_descriptors()
    ranking = build_shortlist(query_global, gallery_global, len(gallery)).indices
    from elvis_cli.evaluation.datasets import load_dataset

    expected = revisitop_map(ranking, load_dataset(tmp_path / "data", "mini").ground_truth,
                             "hard")["map"]
    assert rows[0]["map_hard"] == pytest.approx(expected)
    result = elvis("evaluate", "--data-root", tmp_path / "data", "--all-datasets", *SMALL,
                   "--checkpoint", "ckpt.pt", "--shortlist", "0", "2", "--out-dir", "grid",
                   "--grid-shortlist", "2", "3", "--grid-lam", "0", "1", "--grid-temp", "0.5",
                   "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "grid" / "results.csv")
    assert json.loads((tmp_path / "grid" / "results.json").read_text()) == json.loads(
        table.to_json(orient="records"))
    columns = ["model", "shortlist", "lam", "temperature", "map", "map_medium", "map_hard"]
    pd.testing.assert_frame_equal(table[~table["grid"]][columns].reset_index(drop=True),
                                  pd.DataFrame(rows)[columns])  # the headline is unchanged
    swept = table[table["grid"]]
    combos = swept[["shortlist", "lam", "temperature"]].itertuples(index=False, name=None)
    assert sorted(combos) == [
        (2, 0.0, 0.5), (2, 1.0, 0.5), (3, 0.0, 0.5), (3, 1.0, 0.5)]
    best = swept[swept["best"]].iloc[0]
    assert table["best"].sum() == 1 and best["map"] == swept["map"].max()
    assert (f"best of the grid (not the headline): mini elvis shortlist {best['shortlist']}, "
            f"lam {best['lam']:g}, temp 0.5: mAP {best['map']:.2f}") in result.stdout
    assert not list((root / "features").glob("*/query-crops.h5"))  # full queries by default
    result = elvis("evaluate", "--data-root", tmp_path / "data", "--all-datasets", *SMALL,
                   "--checkpoint", "ckpt.pt", "--shortlist", "0", "--out-dir", "out",
                   "--query-crops", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list((root / "features").glob("*/query-crops.h5"))


def test_export_writes_the_official_files(tmp_path):
    write_views(tmp_path / "imgs")
    assert elvis("extract", "imgs", "-o", "f.h5", *SMALL, "--quiet", cwd=tmp_path).returncode == 0
    result = elvis("export", "f.h5", "--out-dir", "official", "--name", "lite", "--split",
                   "gallery", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "official").iterdir()) == [
        "lite_gallery_cls.hdf5", "lite_gallery_local.hdf5"]
    result = elvis("extract", "imgs", "-o", "g.h5", *SMALL, "--global-type", "w-avg",
                   cwd=tmp_path)
    assert result.returncode == 1 and "has no w-avg global descriptor" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
