"""Every README command is one library call: the `elvis` command and the public function it
calls, run on the same input, give the same result (rows, bits). Also the CLI's vocabulary:
one mechanism for list options, defaults that are the library's, presets in one place."""

import dataclasses
import json
import pickle
import re
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import elvis_cli
from elvis_cli import (
    PRESETS,
    EvaluateConfig,
    ExtractConfig,
    FeatureStore,
    RerankConfig,
    TrainConfig,
    evaluate_datasets,
    export_official,
    extract_images,
    list_datasets,
    load_shortlist,
    rerank_files,
    search_images,
    shortlist_files,
    train,
)
from elvis_cli.cli.app import _expand_lists
from tests.conftest import SMALL
from tests.helpers import cli_in, random_checkpoint, run_cli, write_views

SMALL_OPTIONS = {"image_size": 64, "num_local": 16}
METRICS = ["dataset", "model", "shortlist", "map", "map_medium", "map_hard"]


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> SimpleNamespace:
    """imgs/ extracted by `elvis extract` (cli.h5) and by `extract_images` (lib.h5), then a
    checkpoint for them, c.pt."""
    cwd = tmp_path_factory.mktemp("both")
    write_views(cwd / "imgs")
    result = cli_in("extract", "imgs", "-o", "cli.h5", "--quiet", *SMALL, cwd=cwd)
    assert result.returncode == 0, result.stderr
    run = extract_images(cwd / "imgs", cwd / "lib.h5",
                         ExtractConfig(backbone_options=dict(SMALL_OPTIONS)))
    with FeatureStore.open(cwd / "cli.h5") as store:
        random_checkpoint(cwd / "c.pt", store.local_dim, store.backbone_settings)
    return SimpleNamespace(cwd=cwd, run=run)


def test_extract_images_writes_what_elvis_extract_writes(both):
    assert both.run.report.num_extracted == 8 and both.run.embedded is None
    with FeatureStore.open(both.cwd / "cli.h5") as cli, \
            FeatureStore.open(both.cwd / "lib.h5") as lib:
        assert cli.paths == lib.paths
        np.testing.assert_array_equal(cli.global_descriptors(), lib.global_descriptors())
        everything = np.arange(cli.num_images)
        np.testing.assert_array_equal(cli.read_local(everything), lib.read_local(everything))


def test_shortlist_files_is_elvis_shortlist(both):
    result = cli_in("shortlist", "--features", "cli.h5", "-k", "3", "-o", "s.npz", cwd=both.cwd)
    assert result.returncode == 0, result.stderr
    from_cli = load_shortlist(both.cwd / "s.npz")
    from_library = shortlist_files(both.cwd / "cli.h5", k=3)
    np.testing.assert_array_equal(from_cli.indices, from_library.indices)
    np.testing.assert_array_equal(from_cli.similarities, from_library.similarities)


@pytest.mark.parametrize("model", ["elvis", "chamfer", "global"])
def test_rerank_files_is_elvis_rerank_to_the_bit(both, model, monkeypatch):
    output = f"r-{model}.parquet"
    result = cli_in("rerank", "--features", "cli.h5", "--model", model, "--checkpoint", "c.pt",
                    "--shortlist", "3", "--workers", "1", "-o", output, cwd=both.cwd)
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(both.cwd)  # image paths are given from where the command runs
    run = rerank_files(both.cwd / "cli.h5", model=model, checkpoint=both.cwd / "c.pt",
                       config=RerankConfig(shortlist=3, workers=1))
    from_cli = pd.read_parquet(both.cwd / output)
    assert len(from_cli) == 8 * 3
    pd.testing.assert_frame_equal(from_cli, run.table, check_exact=True)


def test_rerank_files_writes_the_table_elvis_rerank_writes(both, tmp_path):
    run = rerank_files(both.cwd / "cli.h5", checkpoint=both.cwd / "c.pt",
                       config=RerankConfig(shortlist=3, workers=1),
                       output=tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r.parquet"), run.table,
                                  check_exact=True)


def test_search_images_is_elvis_search(both, monkeypatch):
    result = cli_in("search", "imgs/cat_1.jpg", "imgs/rocket_0.jpg", "--gallery", "cli.h5",
                    "--checkpoint", "c.pt", "--shortlist", "3", "--top", "2",
                    "-o", "search.parquet", "--quiet", cwd=both.cwd)
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(both.cwd)  # result paths open from the current folder
    run = search_images(["imgs/cat_1.jpg", "imgs/rocket_0.jpg"], "cli.h5",
                        checkpoint="c.pt", config=RerankConfig(shortlist=3))
    pd.testing.assert_frame_equal(pd.read_parquet(both.cwd / "search.parquet"), run.table,
                                  check_exact=True)
    printed = [line.split("│")[2].strip() for line in result.stdout.splitlines()
               if line.startswith("│")]
    assert printed == [*run.table["gallery_path"][:2], *run.table["gallery_path"][3:5]]


def test_export_official_is_elvis_export(both, tmp_path):
    result = cli_in("export", "cli.h5", "--out-dir", "official", "--name", "lite",
                    "--split", "query", cwd=both.cwd)
    assert result.returncode == 0, result.stderr
    written = export_official(both.cwd / "cli.h5", tmp_path, "lite", "query")
    assert sorted(path.name for path in written) == sorted(
        path.name for path in (both.cwd / "official").iterdir())
    for path in written:
        with h5py.File(path) as lib, h5py.File(both.cwd / "official" / path.name) as cli:
            np.testing.assert_array_equal(lib["features"][()], cli["features"][()])


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    """data/mini: a revisitop-layout dataset of the views (queries: first views)."""
    cwd = tmp_path_factory.mktemp("mini_eval")
    root = cwd / "data" / "mini"
    names = write_views(root / "jpg")
    queries = [n for n in names if n.endswith("_0")]
    gallery = [n for n in names if n.endswith("_1")]
    gnd = [{"easy": [], "hard": [i], "junk": []} for i in range(len(queries))]
    with open(root / "gnd_mini.pkl", "wb") as handle:
        pickle.dump({"imlist": gallery, "qimlist": queries, "gnd": gnd}, handle)
    return cwd


def test_evaluate_datasets_is_elvis_evaluate(mini_root, tmp_path):
    result = cli_in("evaluate", "--data-root", "data", "--all-datasets", *SMALL,
                    "--model", "global,chamfer", "--shortlist", "0", "2", "--out-dir", "out",
                    "--quiet", cwd=mini_root)
    assert result.returncode == 0, result.stderr
    run = evaluate_datasets(mini_root / "data", None, EvaluateConfig(
        backbone_options=dict(SMALL_OPTIONS), models=["global", "chamfer"], shortlists=[0, 2]),
        out_dir=tmp_path)
    from_cli = pd.DataFrame(json.loads((mini_root / "out" / "results.json").read_text()))
    assert list(from_cli["shortlist"]) == [0, 2]
    pd.testing.assert_frame_equal(from_cli[METRICS], run.table[METRICS], check_exact=True)
    assert run.outputs["plot"].is_file() and {"global", "chamfer@2"} <= set(run.summary.columns)


def test_list_datasets_is_elvis_datasets_list(mini_root):
    result = cli_in("datasets", "list", "--data-root", "data", cwd=mini_root)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines()
            if line.startswith("│")}
    for status in list_datasets(mini_root / "data"):
        assert status.name in rows and status.state.split()[0] in rows[status.name]
    assert "custom" in rows["mini"]


# --- the CLI's vocabulary -----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["evaluate", "--shortlist", "0", "25", "50", "--model", "global,elvis,chamfer"],
    ["evaluate", "--shortlist", "0,25,50", "--model", "global", "elvis", "chamfer"],
    ["evaluate", "--shortlist", "0", "--shortlist=25,50", "--model", "global", "--model",
     "elvis,chamfer"],
])
def test_every_list_option_takes_spaces_commas_or_repeats(argv):
    assert _expand_lists(argv) == [
        "evaluate", "--shortlist", "0", "--shortlist", "25", "--shortlist", "50",
        "--model", "global", "--model", "elvis", "--model", "chamfer"]


def test_list_options_stop_at_the_next_option_and_keep_negative_numbers():
    assert _expand_lists(["evaluate", "--grid-lam", "0", "1", "--grid", "--grid-temp", "-1"]) == [
        "evaluate", "--grid-lam", "0", "--grid-lam", "1", "--grid", "--grid-temp", "-1"]


def test_backbone_options_keep_their_commas():
    argv = ["extract", "imgs", "-o", "f.h5", "--backbone-option", "sizes=[1,2]"]
    assert _expand_lists(argv) == argv


def test_single_value_options_are_left_alone():
    argv = ["rerank", "--shortlist", "3", "--model", "chamfer"]
    assert _expand_lists(argv) == argv


@pytest.mark.parametrize(("command", "option", "field"), [
    ("rerank", "--use-local", ("RerankConfig", "num_local")),
    ("rerank", "--batch-size", ("RerankConfig", "batch_size")),
    ("extract", "--batch-size", ("ExtractConfig", "batch_size")),
    ("evaluate", "--shortlist", ("EvaluateConfig", "shortlists")),
])
def test_help_names_the_library_default(capsys, monkeypatch, command, option, field):
    """An option left unset takes a config field's default; --help names that field."""
    monkeypatch.setenv("COLUMNS", "200")  # rich cuts long help lines with an ellipsis
    code, out, _ = run_cli(command, "--help")
    assert code == 0
    lines = out.splitlines()
    line = next(index for index, text in enumerate(lines) if f" {option} " in text)
    shown = re.sub(r"[│\s]+", "", " ".join(lines[line:line + 6]))
    assert "library:" + ".".join(field) in shown
    config = {"RerankConfig": RerankConfig, "ExtractConfig": ExtractConfig,
              "EvaluateConfig": EvaluateConfig}[field[0]]
    assert field[1] in {f.name for f in dataclasses.fields(config)}


def test_the_paper_preset_is_the_paper_setting():
    from elvis_cli.evaluation.registry import PAPER_SETTING

    paper = PRESETS["paper"]
    assert (paper.backbone, paper.checkpoint, paper.backbone_options) == (
        "dinov2", "dinov2_elvis_gld", {"detector": "official"})
    assert (PAPER_SETTING["backbone"], PAPER_SETTING["checkpoint"]) == (
        paper.backbone, paper.checkpoint)


def test_the_offline_preset_is_the_library_default():
    offline = PRESETS["offline"]
    assert offline.backbone == ExtractConfig().backbone == EvaluateConfig().backbone
    assert not offline.backbone_options


def test_an_unknown_preset_is_one_line_naming_the_closest(capsys):
    code, _, err = run_cli("rerank", "--preset", "papr")
    assert code == 1 and err.strip() == (
        "elvis: error: unknown preset 'papr' (did you mean 'paper'?); known: offline, paper")


def test_every_command_function_is_public():
    for name in ("extract_images", "export_official", "shortlist_files", "rerank_files",
                 "search_images", "evaluate_datasets", "list_datasets", "prepare_dataset",
                 "train"):
        assert name in elvis_cli.__all__, name


def test_train_is_elvis_train(both, tmp_path):
    """The same tiny self-supervised run through the CLI and through `train`: the same bits."""
    result = cli_in("train", "imgs", "-o", "cli.pt", "--rounds", "1", "--steps", "2", "--views",
                    "2", "--batch-pairs", "4", "--image-size", "128", "--keep-local", "16",
                    "--device", "cpu", cwd=both.cwd)
    assert result.returncode == 0, result.stderr
    train(both.cwd / "imgs", tmp_path / "lib.pt", TrainConfig(
        backbone_options={"image_size": 128, "num_local": 16}, rounds=1, steps_per_round=2,
        views_per_image=2, batch_pairs=4, device="cpu"))
    from_cli, from_library = (torch.load(path, weights_only=True)
                              for path in (both.cwd / "cli.pt", tmp_path / "lib.pt"))
    assert from_cli["state"].keys() == from_library["state"].keys()
    for name, tensor in from_cli["state"].items():
        assert torch.equal(tensor, from_library["state"][name]), name
