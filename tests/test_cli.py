"""The `elvis` command end to end, as a user runs it: real processes, exit codes and stderr.

Each scenario's commands run once, in a module-scoped fixture; each test checks one thing
about what they did."""

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from elvis_cli.evaluation.datasets import load_dataset
from elvis_cli.evaluation.metrics import revisitop_map
from elvis_cli.features.store import FeatureStore
from elvis_cli.retrieval.shortlist import build_shortlist
from tests.conftest import SMALL
from tests.helpers import elvis, one_line_error, random_checkpoint, run_cli, write_views

pytestmark = pytest.mark.subprocess

COMMANDS = ("extract", "shortlist", "rerank", "evaluate", "train")


def test_version_is_printed(tmp_path):
    assert elvis("--version", cwd=tmp_path).stdout.startswith("elvis-cli ")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command_has_an_example(command, capsys):
    code, out, err = run_cli(command, "--help")  # in process: help is text only
    assert code == 0 and "Example" in out, err


# --- extract over good, odd and bad images ------------------------------------------------------


@pytest.fixture(scope="module")
def bad_images_extracted(tmp_path_factory):
    """`elvis extract` over 4 usable and 4 unusable files, then the same command again."""
    cwd = tmp_path_factory.mktemp("bad_images")
    images = cwd / "imgs"
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
    command = ("extract", images, "-o", "feats.h5", "--quiet", *SMALL)
    first = elvis(*command, cwd=cwd)
    again = elvis(*command, cwd=cwd)
    return SimpleNamespace(cwd=cwd, first=first, again=again)


def test_extract_with_skipped_images_exits_3(bad_images_extracted):
    assert bad_images_extracted.first.returncode == 3, bad_images_extracted.first.stderr


def test_extract_names_each_skipped_image(bad_images_extracted):
    stderr = bad_images_extracted.first.stderr
    skipped = {line.split()[2].rstrip(":") for line in stderr.splitlines()
               if line.startswith("elvis: skipped")}
    assert skipped == {"tiny.png", "empty.jpg", "text.jpg", "corrupt.jpg"}


def test_extract_skipping_images_prints_no_traceback(bad_images_extracted):
    assert "Traceback" not in bad_images_extracted.first.stderr


def test_extract_keeps_grey_cmyk_and_16_bit_images(bad_images_extracted):
    with FeatureStore.open(bad_images_extracted.cwd / "feats.h5") as store:
        assert sorted(store.paths) == ["cmyk.jpg", "deep16.png", "good.jpg", "gray.png"]


def test_extract_again_resumes_and_still_exits_3(bad_images_extracted):
    again = bad_images_extracted.again
    assert again.returncode == 3 and "0 images extracted" in again.stdout, again.stderr


# --- extract, then rerank in the same folder ----------------------------------------------------


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> Path:
    """A folder with imgs/ (two views of four photos), their feats.h5 and a checkpoint c.pt."""
    cwd = tmp_path_factory.mktemp("views")
    write_views(cwd / "imgs")
    result = elvis("extract", "imgs", "-o", "feats.h5", "--quiet", *SMALL, cwd=cwd)
    assert result.returncode == 0, result.stderr
    with FeatureStore.open(cwd / "feats.h5") as store:
        random_checkpoint(cwd / "c.pt", store.local_dim, store.backbone_settings)
    return cwd


@pytest.fixture(scope="module")
def reranked(views) -> pd.DataFrame:
    """`elvis rerank` with no input named: all-vs-all over feats.h5, into reranked.csv."""
    result = elvis("rerank", "--shortlist", "3", "--checkpoint", "c.pt", cwd=views)
    assert result.returncode == 0, result.stderr
    return pd.read_csv(views / "reranked.csv")


def test_rerank_table_has_the_documented_columns(reranked):
    assert list(reranked.columns) == ["query_index", "query_path", "rank", "gallery_index",
                                      "gallery_path", "global_score", "raw_score", "score"]


def test_rerank_in_one_folder_ranks_every_image_against_the_others(reranked):
    assert len(reranked) == 8 * 3 and (reranked["query_path"] != reranked["gallery_path"]).all()


def test_rerank_score_fuses_global_and_raw_scores(reranked):
    fused = 0.5 * reranked["global_score"] + 0.5 / (1 + np.exp(-0.1 * reranked["raw_score"]))
    np.testing.assert_allclose(reranked["score"], fused, rtol=1e-5)


def test_rerank_rows_are_sorted_by_fused_score(reranked):
    assert reranked["query_index"].nunique() == 8
    for _, rows in reranked.groupby("query_index"):
        assert (np.diff(rows["score"].to_numpy()) <= 1e-7).all()


@pytest.fixture(scope="module")
def embedding_cached(views) -> SimpleNamespace:
    """`extract --embedding-cache kept --checkpoint c.pt` over the finished features (it only
    embeds), then a one-thread rerank into r.parquet that reads the cache."""
    filled = elvis("extract", "imgs", "-o", "feats.h5", "--quiet", *SMALL, "--embedding-cache",
                   "kept", "--checkpoint", "c.pt", cwd=views)
    parts_after_extract = sorted((views / "kept").glob("*/part-*.h5"))
    rerank = elvis("rerank", "--shortlist", "2", "--checkpoint", "c.pt", "-o", "r.parquet",
                   "--workers", "1", "--embedding-cache", "kept", cwd=views)
    assert rerank.returncode == 0, rerank.stderr
    return SimpleNamespace(filled=filled, parts_after_extract=parts_after_extract,
                           parts=sorted((views / "kept").glob("*/part-*.h5")),
                           table=pd.read_parquet(views / "r.parquet"))


def test_extract_with_a_checkpoint_on_finished_features_only_embeds(embedding_cached):
    filled = embedding_cached.filled
    assert filled.returncode == 0 and "8 images embedded by c" in filled.stdout, filled.stderr


def test_rerank_embeds_nothing_the_cache_holds(embedding_cached):
    assert len(embedding_cached.parts_after_extract) == 1
    assert embedding_cached.parts == embedding_cached.parts_after_extract


def test_rerank_writes_parquet(embedding_cached):
    assert len(embedding_cached.table) == 8 * 2


def test_one_worker_thread_scores_the_same_bits_as_two(reranked, embedding_cached):
    both = reranked.merge(embedding_cached.table, on=["query_index", "gallery_index"],
                          suffixes=("", "_one"))
    assert len(both) == 16
    assert (both["raw_score"].astype(np.float32) == both["raw_score_one"]).all()


def test_float16_on_cpu_is_refused(views):
    half = elvis("rerank", "--checkpoint", "c.pt", "--device", "cpu", "--precision", "float16",
                 cwd=views)
    assert half.returncode == 1 and "needs a CUDA device" in half.stderr, half.stderr


@pytest.mark.parametrize(("descriptor_dim", "backbone", "pattern"),
                         [(7, "efficientnet-lite0", "expects 7-d"), (320, "dinov2", "dinov2")])
def test_mismatched_checkpoint_is_one_line_naming_both(views, descriptor_dim, backbone, pattern):
    checkpoint = f"{backbone}-{descriptor_dim}.pt"
    random_checkpoint(views / checkpoint, descriptor_dim, {"name": backbone})
    result = elvis("rerank", "--checkpoint", checkpoint, cwd=views)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert pattern in lines[0] and "efficientnet-lite0" in lines[0]


def test_export_writes_the_official_files(views):
    result = elvis("export", "feats.h5", "--out-dir", "official", "--name", "lite", "--split",
                   "gallery", cwd=views)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (views / "official").iterdir()) == [
        "lite_gallery_cls.hdf5", "lite_gallery_local.hdf5"]


def test_a_global_type_the_backbone_lacks_is_a_one_line_error(views):
    result = elvis("extract", "imgs", "-o", "g.h5", *SMALL, "--global-type", "w-avg", cwd=views)
    assert result.returncode == 1 and "has no w-avg global descriptor" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ("rerank", "--features", "missing.h5"),
    ("extract", "nowhere/", "-o", "x.h5"),
    ("extract", ".", "-o", "x.h5", "--backbone", "efficientnet-lite9"),
    ("evaluate", "--data-root", ".", "--all-datasets"),
], ids=["missing-features", "missing-folder", "unknown-backbone", "empty-data-root"])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args):
    result = elvis(*args, cwd=tmp_path)
    one_line_error(result)
    assert "Traceback" not in result.stderr


# --- evaluate on a revisitop-style dataset ------------------------------------------------------


def evaluate_mini(cwd: Path, *args) -> object:
    return elvis("evaluate", "--data-root", cwd / "data", "--all-datasets", *SMALL,
                 "--checkpoint", "ckpt.pt", *args, "--quiet", cwd=cwd)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> SimpleNamespace:
    """data/mini in the revisitop layout with a truncated gallery image; `elvis evaluate` before
    the checkpoint exists, with it, with a grid, and with --query-crops."""
    cwd = tmp_path_factory.mktemp("mini")
    root = cwd / "data" / "mini"
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
    run = SimpleNamespace(cwd=cwd, root=root, num_gallery=len(gallery))
    run.no_checkpoint = evaluate_mini(cwd, "--shortlist", "0", "2", "--out-dir", "out")
    with FeatureStore.open(next((root / "features").glob("*/gallery.h5"))) as store:
        random_checkpoint(cwd / "ckpt.pt", store.local_dim, store.backbone_settings)
    run.evaluated = evaluate_mini(cwd, "--shortlist", "0", "2", "--out-dir", "out")
    assert run.evaluated.returncode == 0, run.evaluated.stderr
    run.grid = evaluate_mini(cwd, "--shortlist", "0", "2", "--out-dir", "grid",
                             "--grid-shortlist", "2", "3", "--grid-lam", "0", "1",
                             "--grid-temp", "0.5")
    assert run.grid.returncode == 0, run.grid.stderr
    run.crops_before = list((root / "features").glob("*/query-crops.h5"))
    run.crops = evaluate_mini(cwd, "--shortlist", "0", "--out-dir", "crops", "--query-crops")
    return run


def test_evaluate_without_the_checkpoint_names_it(mini):
    assert mini.no_checkpoint.returncode == 1 and "ckpt.pt" in mini.no_checkpoint.stderr


def test_evaluate_decodes_a_truncated_image_with_a_warning(mini):
    assert ("elvis: warning: mini: rocket_1.jpg: decoded as far as it goes"
            in mini.evaluated.stderr)


def test_evaluate_writes_a_row_per_shortlist_size(mini):
    rows = json.loads((mini.cwd / "out" / "results.json").read_text())
    assert [row["shortlist"] for row in rows] == [0, 2]


def test_evaluate_writes_the_csv_and_runtime_plot(mini):
    assert (mini.cwd / "out" / "results.csv").is_file()
    assert (mini.cwd / "out" / "runtime.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_global_row_is_the_map_of_the_global_ranking(mini):
    features = mini.root / "features"
    with FeatureStore.open(next(features.glob("*/gallery.h5"))) as store:
        gallery_global = store.global_descriptors()
    with FeatureStore.open(next(features.glob("*/query.h5"))) as store:
        query_global = store.global_descriptors()
    ranking = build_shortlist(query_global, gallery_global, mini.num_gallery).indices
    ground_truth = load_dataset(mini.cwd / "data", "mini").ground_truth
    expected = revisitop_map(ranking, ground_truth, "hard")["map"]
    rows = json.loads((mini.cwd / "out" / "results.json").read_text())
    assert rows[0]["map_hard"] == pytest.approx(expected)


@pytest.fixture(scope="module")
def grid_table(mini) -> pd.DataFrame:
    return pd.read_csv(mini.cwd / "grid" / "results.csv")


def test_grid_json_holds_the_csv_rows(mini, grid_table):
    assert json.loads((mini.cwd / "grid" / "results.json").read_text()) == json.loads(
        grid_table.to_json(orient="records"))


def test_grid_leaves_the_headline_rows_unchanged(mini, grid_table):
    rows = json.loads((mini.cwd / "out" / "results.json").read_text())
    columns = ["model", "shortlist", "lam", "temperature", "map", "map_medium", "map_hard"]
    pd.testing.assert_frame_equal(grid_table[~grid_table["grid"]][columns].reset_index(drop=True),
                                  pd.DataFrame(rows)[columns])


def test_grid_sweeps_every_combination(grid_table):
    swept = grid_table[grid_table["grid"]]
    combos = swept[["shortlist", "lam", "temperature"]].itertuples(index=False, name=None)
    assert sorted(combos) == [(2, 0.0, 0.5), (2, 1.0, 0.5), (3, 0.0, 0.5), (3, 1.0, 0.5)]


def test_grid_marks_one_best_row_the_highest_map(grid_table):
    swept = grid_table[grid_table["grid"]]
    assert grid_table["best"].sum() == 1
    assert swept[swept["best"]].iloc[0]["map"] == swept["map"].max()


def test_grid_prints_its_best_row_apart_from_the_headline(mini, grid_table):
    best = grid_table[grid_table["best"]].iloc[0]
    assert (f"best of the grid (not the headline): mini elvis shortlist {best['shortlist']}, "
            f"lam {best['lam']:g}, temp 0.5: mAP {best['map']:.2f}") in mini.grid.stdout


def test_evaluate_extracts_full_queries_by_default(mini):
    assert not mini.crops_before


def test_query_crops_option_extracts_cropped_queries(mini):
    assert mini.crops.returncode == 0, mini.crops.stderr
    assert list((mini.root / "features").glob("*/query-crops.h5"))
