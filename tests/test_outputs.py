"""Finished work is never lost to its output, and outputs are usable as written: `rerank -o`
and `train -o` refuse a place they cannot write before any work; every output follows the
umask; result tables (CSV, Parquet, JSON Lines) hold image paths that open from where the
command ran; a missing feats.h5 says how to make one; `--help` renders its texts intact."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import typer.main

from elvis_cli import (
    ExtractConfig,
    FeatureStore,
    InputError,
    RerankConfig,
    TrainConfig,
    evaluate_datasets,
    export_official,
    extract_images,
    rerank_files,
    shortlist_files,
    train,
)
from elvis_cli.cli import app as cli
from tests.conftest import SMALL
from tests.helpers import REPO, cli_in, one_line_error, random_checkpoint, run_cli, write_views

SMALL_OPTIONS = {"image_size": 64, "num_local": 16}
# a training run that ends in seconds, should a check regress and let it start
TINY_TRAINING = {"views_per_image": 2, "rounds": 1, "steps_per_round": 1, "batch_pairs": 4,
                 "val_pairs": 8, "device": "cpu"}
TINY_TRAINING_OPTIONS = ["--views", "2", "--rounds", "1", "--steps", "1", "--batch-pairs", "4",
                         "--device", "cpu", *SMALL]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> SimpleNamespace:
    """imgs/ (two views of four photos) extracted into feats.h5, and a checkpoint c.pt."""
    cwd = tmp_path_factory.mktemp("extracted")
    write_views(cwd / "imgs")
    extract_images(cwd / "imgs", cwd / "feats.h5",
                   ExtractConfig(backbone_options=dict(SMALL_OPTIONS)))
    with FeatureStore.open(cwd / "feats.h5") as store:
        random_checkpoint(cwd / "c.pt", store.local_dim, store.backbone_settings)
    return SimpleNamespace(cwd=cwd, features=cwd / "feats.h5", checkpoint=cwd / "c.pt")


def _everything_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


# --- an output that cannot be written is refused before any work -------------------------------


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder nobody can write to: one without write permission, or for root (whom
    permissions do not stop) a link to a folder of sysfs, where no file can be created."""
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir(mode=0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    sysfs = Path("/sys/fs")
    try:
        (sysfs / "probe").touch()
    except OSError:
        folder.symlink_to(sysfs, target_is_directory=True)
        yield folder
        return
    pytest.skip("no folder refuses root here (sysfs accepted a file)")


# (where, relative to the test's folder; what the one-line error says)
UNWRITABLE = {
    "read-only-folder": ("read-only/out{suffix}", "read-only is not writable"),
    "missing-folder-in-a-read-only-one": ("read-only/new/out{suffix}",
                                          "read-only is not writable"),
    "missing-folder-under-a-file": ("a-file/new/out{suffix}", "a-file is a file, not a folder"),
    "a-folder": ("folder{suffix}", "is a folder; name a file ending in"),
    "wrong-suffix": ("out.txt", "output must end in"),
}


def _rerank(extracted: SimpleNamespace, output: Path, progress) -> None:
    rerank_files(extracted.features, checkpoint=extracted.checkpoint, output=output,
                 config=RerankConfig(shortlist=2), progress=progress)


def _train(extracted: SimpleNamespace, output: Path, progress) -> None:
    train(extracted.cwd / "imgs", output,
          TrainConfig(backbone_options=dict(SMALL_OPTIONS), **TINY_TRAINING), progress=progress)


# each job that writes a finished result at its end, and the suffix of that result
JOBS = {"rerank": (_rerank, ".csv"), "train": (_train, ".pt")}


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("case", UNWRITABLE)
def test_an_unwritable_output_is_refused_before_any_work(extracted, read_only, tmp_path, case,
                                                         job):
    run, suffix = JOBS[job]
    where, message = UNWRITABLE[case]
    (tmp_path / "a-file").write_text("in the way")
    (tmp_path / f"folder{suffix}").mkdir()
    before, events = _everything_under(tmp_path), []
    with pytest.raises(InputError, match=message):
        run(extracted, tmp_path / where.format(suffix=suffix), events.append)
    assert events == []  # not one query re-ranked, not one view rendered
    assert _everything_under(tmp_path) == before  # and nothing left behind


def test_a_checkpoint_must_end_in_pt(extracted, tmp_path):
    with pytest.raises(InputError, match=r"output must end in \.pt, got m\.pth"):
        train(extracted.cwd / "imgs", tmp_path / "m.pth",
              TrainConfig(backbone_options=dict(SMALL_OPTIONS), **TINY_TRAINING))


@pytest.mark.parametrize("args", [
    ("rerank", "--features", "{features}", "-o", "read-only/out.csv"),
    ("rerank", "--features", "{features}", "-o", "out.txt"),
    ("train", "{images}", *TINY_TRAINING_OPTIONS, "-o", "read-only/m.pt"),
], ids=["rerank-read-only", "rerank-suffix", "train-read-only"])
def test_the_cli_says_it_in_one_line_before_any_work(extracted, read_only, args):
    args = [arg.format(features=extracted.features, images=extracted.cwd / "imgs")
            for arg in args]
    result = cli_in(*args, cwd=read_only.parent)
    one_line_error(result, "cannot write read-only/" if "read-only" in args[-1]
                   else "output must end in .csv, .parquet or .jsonl, got out.txt")
    assert result.stdout.strip() == ""  # no table printed, no round run


# --- outputs follow the umask ------------------------------------------------------------------


@pytest.fixture(params=[(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def umask(request):
    """The process umask for the test, and the mode a new file gets under it."""
    mask, mode = request.param
    saved = os.umask(mask)
    yield mode
    os.umask(saved)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_features_file_its_shards_and_manifest_follow_the_umask(umask, tmp_path):
    write_views(tmp_path / "imgs")
    run = extract_images(tmp_path / "imgs", tmp_path / "f.h5",
                         ExtractConfig(backbone_options=dict(SMALL_OPTIONS)))
    written = [run.report.output, *(tmp_path / "f.h5.shards").glob("*")]
    assert len(written) >= 3  # the joined file, a shard, the manifest (and the lock)
    assert {path.name: _mode(path) for path in written} == {
        path.name: umask for path in written}


def test_a_table_and_a_checkpoint_follow_the_umask(extracted, umask, tmp_path):
    checkpoint = random_checkpoint(tmp_path / "c.pt", 320, {"name": "efficientnet-lite0"})
    for suffix in (".csv", ".parquet", ".jsonl"):
        rerank_files(extracted.features, checkpoint=extracted.checkpoint,
                     config=RerankConfig(shortlist=2), output=tmp_path / f"r{suffix}")
        assert _mode(tmp_path / f"r{suffix}") == umask, suffix
    assert _mode(checkpoint) == umask


# --- JSON Lines --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_lines(extracted, tmp_path_factory) -> SimpleNamespace:
    """A rerank of 4 candidates per query, the top 2 re-ranked, into r.jsonl."""
    folder = tmp_path_factory.mktemp("jsonl")
    shortlist_files(extracted.features, k=4, output=folder / "s.npz")
    run = rerank_files(extracted.features, candidates=folder / "s.npz",
                       checkpoint=extracted.checkpoint, config=RerankConfig(shortlist=2),
                       output=folder / "r.jsonl")
    lines = (folder / "r.jsonl").read_text(encoding="utf-8").splitlines()
    return SimpleNamespace(table=run.table, objects=[json.loads(line) for line in lines])


def test_json_lines_hold_one_object_per_query_in_order(json_lines):
    assert [obj["query_index"] for obj in json_lines.objects] == list(range(8))
    assert all(set(obj) == {"query_index", "query_path", "ranking"}
               for obj in json_lines.objects)


def test_each_query_lists_its_ranking_with_the_table_rows(json_lines):
    table = json_lines.table
    for obj in json_lines.objects:
        rows = table[table["query_index"] == obj["query_index"]]
        assert obj["query_path"] == rows["query_path"].iloc[0]
        ranking = pd.DataFrame(obj["ranking"])
        assert list(ranking.columns) == ["rank", "gallery_index", "gallery_path",
                                         "global_score", "raw_score", "score"]
        for column in ranking.columns:
            expected = rows[column].to_numpy()
            if expected.dtype == np.float32:  # the same single-precision number, NaN as null
                written = ranking[column].to_numpy(dtype=np.float64, na_value=np.nan)
                np.testing.assert_array_equal(written.astype(np.float32), expected)
            else:
                assert ranking[column].tolist() == expected.tolist(), column


def test_scores_not_computed_are_null(json_lines):
    beyond = [entry for obj in json_lines.objects for entry in obj["ranking"]
              if entry["rank"] > 2]
    assert len(beyond) == 8 * 2
    assert all(entry["raw_score"] is None and entry["score"] is None for entry in beyond)


# --- result paths open from where the command ran ----------------------------------------------


def test_paths_are_relative_to_the_folder_of_the_run_under_it(extracted):
    result = cli_in("rerank", "--checkpoint", "c.pt", "--shortlist", "2", "-o", "here.csv",
                    cwd=extracted.cwd)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(extracted.cwd / "here.csv")
    paths = [*table["query_path"], *table["gallery_path"]]
    assert all(path.startswith("imgs/") for path in paths)
    assert all((extracted.cwd / path).is_file() for path in paths)


def test_paths_are_absolute_from_another_folder(extracted, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.wide_console, "width", 400)  # long paths printed on one line
    result = cli_in("rerank", "--features", extracted.features, "--checkpoint",
                    extracted.checkpoint, "--shortlist", "2", "-o", "there.jsonl",
                    "--show", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in (tmp_path / "there.jsonl").open(encoding="utf-8")]
    paths = [obj["query_path"] for obj in objects]
    paths += [entry["gallery_path"] for obj in objects for entry in obj["ranking"]]
    assert all(Path(path).is_absolute() and (tmp_path / path).is_file() for path in paths)
    # the printed tables show the paths the file holds
    printed = result.stdout.replace("\n", "")
    assert all(path in printed for path in paths)


def test_released_files_keep_their_image_names(extracted, tmp_path):
    export_official(extracted.features, tmp_path, "lite", "query")
    export_official(extracted.features, tmp_path, "lite", "gallery")
    run = rerank_files(queries=tmp_path / "lite_query_local.hdf5",
                       gallery=tmp_path / "lite_gallery_local.hdf5",
                       checkpoint=extracted.checkpoint, config=RerankConfig(shortlist=2))
    assert sorted(set(run.table["gallery_path"])) == [str(index) for index in range(8)]


# --- no feats.h5 here --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["rerank", "shortlist"])
def test_no_features_file_here_says_how_to_make_one(tmp_path, command):
    one_line_error(cli_in(command, cwd=tmp_path),
                   "elvis: error: no feats.h5 here: extract features first (elvis extract "
                   "IMAGES -o feats.h5) or name a file with --features")


def test_a_named_missing_features_file_is_quoted_in_the_suggestion(tmp_path):
    one_line_error(cli_in("rerank", "--features", "my feats.h5", cwd=tmp_path),
                   "no my feats.h5 here", "elvis extract IMAGES -o 'my feats.h5'")


def test_a_missing_features_file_elsewhere_is_named_with_the_suggestion(tmp_path):
    one_line_error(cli_in("shortlist", "--features", "run/feats.h5", cwd=tmp_path),
                   "elvis: error: run/feats.h5: features file not found; extract features "
                   "first (elvis extract IMAGES -o run/feats.h5)")


# --- --help renders its texts intact -----------------------------------------------------------


def _commands(command=None, path: tuple[str, ...] = ()):
    """(path, command) of the `elvis` group and every command and group under it."""
    command = command or typer.main.get_command(cli.app)
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def _words(text: str) -> str:
    """Text as the help panels show it: code spans without backticks, boxes and wrapping gone."""
    return " ".join(text.replace("`", "").replace("│", " ").split())


@pytest.mark.parametrize("path", [path for path, _ in _commands()],
                         ids=lambda path: " ".join(path) or "elvis")
def test_help_shows_every_text_as_written_and_flags_without_a_value(monkeypatch, path):
    monkeypatch.setenv("COLUMNS", "200")  # nothing cut by a narrow console
    command = dict(_commands())[path]
    code, out, err = run_cli(*path, "--help")
    assert code == 0, err
    assert "<bool>" not in out
    shown = _words(out)
    texts = [param.help for param in command.params if getattr(param, "help", None)]
    texts += (command.help or "").split("\n\n")
    for text in texts:
        assert _words(text) in shown, text


def test_the_released_file_names_survive_markup(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = run_cli("evaluate", "--help")
    assert "<dataset>/<DESC>_{query,gallery}_local.hdf5" in out and "nn_<DESC>.pkl" in out


@pytest.mark.subprocess
def test_no_help_imports_a_heavy_library():
    """`elvis ... --help` of every command and group stays instant: no torch, faiss, h5py."""
    code = ("import sys\nfrom elvis_cli.cli.app import main\n"
            f"for path in {[list(path) for path, _ in _commands()]!r}:\n"
            "    sys.argv = ['elvis', *path, '--help']\n"
            "    try:\n        main()\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'faiss', 'h5py', 'pandas') if m in sys.modules),"
            " file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stderr.strip() == "[]"



def test_a_shortlist_output_is_checked_before_the_search(extracted, read_only):
    with pytest.raises(InputError, match="read-only is not writable"):
        shortlist_files(extracted.features, k=2, output=read_only / "s.npz")
    with pytest.raises(InputError, match=r"output must end in \.npz, got s\.csv"):
        shortlist_files(extracted.features, k=2, output=read_only.parent / "s.csv")
    assert not (read_only.parent / "s.csv").exists()


def test_evaluate_checks_each_output_before_any_work(read_only, tmp_path):
    events: list = []
    demo = REPO / "examples" / "data"
    with pytest.raises(InputError, match="read-only is not writable"):
        evaluate_datasets(demo, ["demo"], out_dir=read_only, progress=events.append)
    with pytest.raises(InputError, match=r"output must end in \.png, got runtime\.jpg"):
        evaluate_datasets(demo, ["demo"], out_dir=tmp_path, plot_path=tmp_path / "runtime.jpg",
                          progress=events.append)
    assert events == [] and not list(tmp_path.glob("*.json"))
