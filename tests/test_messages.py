"""One clear line for the misuse a new user runs into (issue 13, item 6): a file that is not a
checkpoint or not a shortlist named for what it is, fusion settings out of range, the hints of
`datasets prepare` and `datasets list`, and the DINOv2 backbone without network."""

import pickle
import subprocess
import sys
import urllib.error
import urllib.request

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from elvis_cli.evaluation.prepare import list_datasets
from elvis_cli.model.fusion import Fusion
from elvis_cli.util.errors import InputError
from elvis_cli.util.file_kind import FileKind, file_kind
from tests.helpers import REPO, cli_in, one_line_error, write_store

OXFORD_URLS = ("http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl",
               "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz")


@pytest.fixture
def features(tmp_path):
    """feats.h5 (3 images) in tmp_path, the folder the commands run in."""
    write_store(tmp_path / "feats.h5", np.random.default_rng(0), 3, 4, [4, 4, 4]).close()
    return tmp_path


# --- files that are not checkpoints -------------------------------------------------------------


def _image(path, format):
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, format=format)


def _hdf5(path):
    with h5py.File(path, "w") as file:
        file.create_dataset("features", data=np.zeros(3))


NOT_CHECKPOINTS = {
    "empty.pt": (lambda path: path.write_bytes(b""), "is an empty file"),
    "notes.pt": (lambda path: path.write_text("my best model\n"),
                 "is a text file (first line: 'my best model')"),
    "table.csv": (lambda path: path.write_text("path,class\na.jpg,1\n"),
                  "is a text file (first line: 'path,class')"),
    "photo.png": (lambda path: _image(path, "PNG"), "is a PNG image"),
    "photo.jpg": (lambda path: _image(path, "JPEG"), "is a JPEG image"),
    "feats2.h5": (_hdf5, "is an HDF5 file"),
    "plain.pkl": (lambda path: path.write_bytes(pickle.dumps({"state": {}})),
                  "is a Python pickle"),
}


@pytest.mark.parametrize("name", list(NOT_CHECKPOINTS))
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(features, name):
    write, what = NOT_CHECKPOINTS[name]
    write(features / name)
    result = cli_in("rerank", "--checkpoint", name, "--shortlist", "2", cwd=features)
    one_line_error(result, f"checkpoint {name} {what}", "not an ELViS checkpoint",
                   "a .pt file written by `elvis train`", "dinov2_elvis_gld", "efficientnet-lite0")
    assert not (features / "reranked.csv").exists()


def test_a_folder_given_as_checkpoint_names_the_checkpoints_inside(features):
    (features / "runs").mkdir()
    torch.save({"state": {}}, features / "runs" / "best.pt")
    result = cli_in("rerank", "--checkpoint", "runs", "--shortlist", "2", cwd=features)
    one_line_error(result, "checkpoint runs is a folder (it holds runs/best.pt)",
                   "not an ELViS checkpoint", "`elvis train`", "dinov2_elvis_gld")


def test_a_truncated_checkpoint_is_a_damaged_zip_archive(features):
    torch.save({"state": {"w": torch.zeros(100)}}, features / "cut.pt")
    whole = (features / "cut.pt").read_bytes()
    (features / "cut.pt").write_bytes(whole[: len(whole) // 2])
    result = cli_in("rerank", "--checkpoint", "cut.pt", "--shortlist", "2", cwd=features)
    one_line_error(result, "cannot read checkpoint cut.pt: a damaged zip archive")


def test_file_kinds_come_from_the_content_not_the_name(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.bin")
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.bin",
               _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "s.pt", indices=np.zeros(2))  # np.savez adds .npz
    with h5py.File(tmp_path / "blocked.pt", "w", userblock_size=1024) as file:
        file.create_dataset("x", data=np.zeros(2))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert [file_kind(tmp_path / name) for name in
            ("zip.bin", "legacy.bin", "s.pt.npz", "blocked.pt", "latin1.txt", "nowhere")] == [
        FileKind.TORCH, FileKind.TORCH_LEGACY, FileKind.NPZ, FileKind.HDF5, FileKind.UNKNOWN,
        FileKind.MISSING]


# --- a features file as --candidates ------------------------------------------------------------


def test_a_features_file_as_candidates_names_the_shortlist_formats(features):
    result = cli_in("rerank", "--model", "chamfer", "--candidates", "feats.h5", cwd=features)
    one_line_error(result, "feats.h5 is an HDF5 file, not a shortlist",
                   "a .npz written by `elvis shortlist`", "nn_<desc>.pkl")


# --- fusion settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--lam", "2", "lam (--lam, the fusion weight of the global score) must lie in [0, 1], got 2"),
    ("--lam", "-0.5", "must lie in [0, 1], got -0.5"),
    ("--temp", "0", "temperature (--temp, which scales the raw score before the sigmoid) must be "
                    "a positive number, got 0"),
])
def test_fusion_out_of_range_is_refused_before_any_work(features, option, value, words):
    for model in ("elvis", "chamfer"):  # refused even where the re-ranker ignores it
        result = cli_in("rerank", "--model", model, option, value, cwd=features)
        one_line_error(result, words)
    assert not (features / "reranked.csv").exists()


def test_evaluate_refuses_lam_before_extracting(tmp_path):
    result = cli_in("evaluate", "--data-root", tmp_path / "none", "--dataset", "demo",
                    "--lam", "2", cwd=tmp_path)
    one_line_error(result, "must lie in [0, 1], got 2")


def test_fusion_in_a_notebook_gets_the_same_error():
    with pytest.raises(InputError, match=r"must be a positive number, got nan"):
        Fusion(0.5, float("nan"))
    with pytest.raises(InputError, match=r"must lie in \[0, 1\], got 1.5"):
        Fusion(1.5, 0.5)


@pytest.mark.subprocess
def test_fusion_settings_are_checked_without_importing_torch():
    """So that the command line can refuse `--lam 2` before its seconds of imports."""
    code = ("import sys; from elvis_cli.model.fusion import check_fusion; "
            "check_fusion(0.5, 0.5); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert result.stdout.strip() == "False"


# --- datasets prepare and list ------------------------------------------------------------------


def test_offline_prepare_hint_carries_the_data_root_and_names_each_file_once(tmp_path,
                                                                            monkeypatch):
    def no_network(request, timeout):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    data = tmp_path / "my data"
    result = cli_in("datasets", "prepare", "roxford5k", "--data-root", data, cwd=tmp_path)
    line = one_line_error(
        result, "of roxford5k ([Errno -2] Name or service not known); fetch them",
        f"`elvis datasets prepare roxford5k --data-root '{data}'` again",
        f"`elvis datasets prepare roxford5k --data-root '{data}' --from DIR`")
    for url in OXFORD_URLS:
        assert line.count(url) == 1, url


def test_prepare_hint_leaves_out_the_default_data_root(tmp_path):
    result = cli_in("datasets", "prepare", "roxford5k", cwd=tmp_path,
                    env={"ELVIS_OFFLINE": "1", "ELVIS_DATA_ROOT": str(tmp_path / "data")})
    one_line_error(result, "then run `elvis datasets prepare roxford5k` again")


def test_prepare_from_a_folder_without_the_files_lists_only_this_datasets_files(tmp_path):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "notes.txt").write_text("nothing here")
    result = cli_in("datasets", "prepare", "roxford5k", "--data-root", "data", "--from",
                    "downloads", cwd=tmp_path)
    one_line_error(result, "found none of the files of roxford5k (gnd_roxford5k.pkl, "
                           "oxbuild_images-v1.tgz) nor a jpg/ folder")


def test_datasets_list_counts_a_custom_datasets_images_once_and_says_what_to_do(tmp_path):
    """Without queries.txt every gallery image is a query too: a missing one is still one."""
    folder = tmp_path / "data" / "shelf"
    (folder / "jpg").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        _image(folder / "jpg" / name, "JPEG")
    (folder / "gallery.txt").write_text("a.jpg,1\nb.jpg,1\nc.jpg,2\n")
    (status,) = (s for s in list_datasets(tmp_path / "data") if s.name == "shelf")
    assert status.state == "ground truth only"
    assert status.detail == (f"1 image(s) missing, first {folder / 'jpg' / 'c.jpg'}; put the "
                             f"images its ground truth names under {folder / 'jpg'}/")
    result = cli_in("datasets", "list", "--data-root", "data", cwd=tmp_path)
    assert result.returncode == 0 and "elvis datasets prepare shelf" not in result.stdout


def test_datasets_list_suggests_prepare_with_the_data_root(tmp_path):
    statuses = {status.name: status for status in list_datasets(tmp_path / "data")}
    assert statuses["roxford5k"].detail == (
        f"elvis datasets prepare roxford5k --data-root {tmp_path / 'data'}")


def test_prepare_of_a_custom_dataset_points_to_datasets_list(tmp_path):
    (tmp_path / "data" / "shelf").mkdir(parents=True)
    (tmp_path / "data" / "shelf" / "gallery.txt").write_text("a.jpg,1\n")
    result = cli_in("datasets", "prepare", "shelf", "--data-root", "data", cwd=tmp_path)
    one_line_error(result, "shelf is a custom dataset (data/shelf), which elvis cannot fetch: "
                           "`elvis datasets list --data-root data` says what it lacks")


# --- the DINOv2 backbone without network --------------------------------------------------------


def test_dinov2_without_network_fails_at_once_naming_the_cache(tmp_path, unreachable_hub):
    (tmp_path / "new").mkdir()
    _image(tmp_path / "new" / "q.jpg", "JPEG")
    result = cli_in("extract", "new", "-o", "q.h5", "--backbone", "dinov2",
                    "--backbone-option", "model_id=elvis-tests/not-in-any-cache", cwd=tmp_path)
    one_line_error(result, "the dinov2 weights 'elvis-tests/not-in-any-cache' are not in the "
                           f"Hugging Face cache ({tmp_path / 'hf'}) and 127.0.0.1 cannot be "
                           "reached", "HF_HOME", "--backbone-option model_id=FOLDER")
    assert "Retrying" not in result.stderr

