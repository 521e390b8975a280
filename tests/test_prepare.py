"""`elvis datasets prepare/list`, the resumable downloader, and the chamfer baseline."""

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from elvis_cli.evaluation.prepare import dataset_status, prepare, prepare_dataset
from elvis_cli.model.chamfer import Chamfer
from elvis_cli.util.download import fetch
from elvis_cli.util.errors import InputError, OfflineError
from tests.helpers import elvis, one_line_error


def oxford_like_download(folder: Path) -> None:
    """The two files of roxford5k as they come from their servers: the ground-truth pickle and
    an image archive with the images one folder down."""
    folder.mkdir(parents=True)
    names = ["all_souls_000001", "all_souls_000002", "radcliffe_000003"]
    with open(folder / "gnd_roxford5k.pkl", "wb") as handle:
        pickle.dump({"imlist": names[1:], "qimlist": names[:1],
                     "gnd": [{"easy": [0], "hard": [], "junk": [1], "bbx": [0, 0, 8, 8]}]},
                    handle)
    with tarfile.open(folder / "oxbuild_images-v1.tgz", "w:gz") as archive:
        for name in names:
            buffer = io.BytesIO()
            Image.new("RGB", (16, 12), (len(name), 40, 90)).save(buffer, format="JPEG")
            info = tarfile.TarInfo(f"oxbuild_images/{name}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            archive.addfile(info, buffer)


@pytest.mark.subprocess
def test_offline_prepare_names_every_file_url_and_place(tmp_path):
    result = elvis("datasets", "prepare", "roxford5k", "--data-root", tmp_path / "data",
                   cwd=tmp_path, env={"ELVIS_OFFLINE": "1"})
    target = tmp_path / "data" / "roxford5k"
    one_line_error(
        result, "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl",
        f"{target / 'gnd_roxford5k.pkl'}",
        "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
        f"{target / 'oxbuild_images-v1.tgz'}", "--from")


@pytest.fixture(scope="module", params=[False, True], ids=["folder", "tar"])
def prepared(request, tmp_path_factory) -> SimpleNamespace:
    """`elvis datasets prepare roxford5k --from` a folder or a tar of the downloads, then
    `elvis datasets list`."""
    cwd = tmp_path_factory.mktemp("prepare")
    oxford_like_download(cwd / "downloads")
    source = cwd / "downloads"
    if request.param:
        source = cwd / "downloads.tar"
        with tarfile.open(source, "w") as archive:
            archive.add(cwd / "downloads", arcname="my-copy")
    data = cwd / "data"
    result = elvis("datasets", "prepare", "roxford5k", "--data-root", data, "--from", source,
                   cwd=cwd)
    assert result.returncode == 0, result.stderr
    listing = elvis("datasets", "list", "--data-root", data, cwd=cwd)
    return SimpleNamespace(data=data, folder=data / "roxford5k", result=result, listing=listing)


@pytest.mark.subprocess
def test_prepare_from_a_local_copy_lays_out_the_images(prepared):
    assert sorted(p.name for p in (prepared.folder / "jpg").iterdir()) == [
        "all_souls_000001.jpg", "all_souls_000002.jpg", "radcliffe_000003.jpg"]


@pytest.mark.subprocess
def test_prepare_removes_the_archive_it_unpacked(prepared):
    assert not (prepared.folder / "oxbuild_images-v1.tgz").exists()


@pytest.mark.subprocess
def test_prepare_says_how_many_images_the_benchmark_should_have(prepared):
    assert "2 gallery images, the benchmark has 4993" in prepared.result.stdout  # a fixture


@pytest.mark.subprocess
def test_a_prepared_dataset_is_ready(prepared):
    status = dataset_status(prepared.data, "roxford5k")
    assert status.state == "ready" and status.size_bytes > 0


@pytest.mark.subprocess
def test_preparing_again_unpacks_nothing(prepared):
    assert prepare("roxford5k", prepared.data).unpacked == []  # offline-safe once prepared


@pytest.mark.subprocess
def test_datasets_list_shows_a_prepared_dataset_ready(prepared):
    assert prepared.listing.returncode == 0, prepared.listing.stderr
    row = next(line for line in prepared.listing.stdout.splitlines() if "roxford5k " in line)
    assert "ready" in row


def test_list_reports_images_only_features_and_released_files(tmp_path):
    data = tmp_path / "data"
    (data / "instre" / "jpg").mkdir(parents=True)
    assert dataset_status(data, "instre").state == "images only"
    assert dataset_status(data, "met").state == "missing"
    features = data / "instre" / "features" / "efficientnet-lite0-1234abcd"
    features.mkdir(parents=True)
    for name in ("query.h5", "gallery.h5"):
        (features / name).write_bytes(b"")
    for name in ("dinov2_query_local.hdf5", "dinov2_gallery_local.hdf5"):
        (data / "instre" / name).write_bytes(b"")
    assert dataset_status(data, "instre").features == ["efficientnet-lite0", "dinov2 (released)"]
    assert dataset_status(data, "demo").state == "bundled"


def test_prepare_without_a_known_source_says_where_to_get_it(tmp_path):
    with pytest.raises(InputError, match=r"met: elvis cannot fetch.*--from PATH.*gallery\.txt"):
        prepare("met", tmp_path)


def test_prepare_of_an_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(InputError, match="unknown dataset 'nope'"):
        prepare("nope", tmp_path)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `payload`, honouring `Range: bytes=N-` like the dataset servers do."""

    payload = b""
    ranges: ClassVar[list[str]] = []

    def do_GET(self):
        start = 0
        if "Range" in self.headers:
            self.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local server of 76.8 kB that honours range requests; its URL."""
    monkeypatch.delenv("ELVIS_OFFLINE", raising=False)
    _RangeHandler.payload, _RangeHandler.ranges = bytes(range(256)) * 300, []
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/file.tgz"
    finally:
        server.shutdown()
        server.server_close()


def test_download_resumes_with_a_range_request(tmp_path, server):
    payload = _RangeHandler.payload
    target = tmp_path / "file.tgz"
    (tmp_path / "file.tgz.part").write_bytes(payload[:1000])  # an interrupted transfer
    digest = hashlib.sha256(payload).hexdigest()
    assert fetch(server, target, sha256=digest) == digest
    assert _RangeHandler.ranges == ["bytes=1000-"] and target.read_bytes() == payload


def test_a_download_of_the_wrong_checksum_leaves_no_file(tmp_path, server):
    with pytest.raises(InputError, match="checksum mismatch"):
        fetch(server, tmp_path / "other.tgz", sha256="0" * 64)
    assert not (tmp_path / "other.tgz").exists()
    assert not (tmp_path / "other.tgz.part").exists()


def test_a_server_that_is_gone_is_an_offline_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ELVIS_OFFLINE", raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    url = f"http://127.0.0.1:{server.server_port}/file.tgz"
    server.server_close()
    with pytest.raises(OfflineError, match=r"127\.0\.0\.1"):
        fetch(url, tmp_path / "third.tgz")


def test_chamfer_is_the_mean_best_cosine_with_padding_ignored():
    model = Chamfer()
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    gallery = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                            [[-1.0, 0.0], [1.0, 0.0], [9.0, 9.0]]])
    query_mask = torch.tensor([[False, False, True]])
    gallery_mask = torch.tensor([[False, False, False], [False, False, True]])
    scores = model.score(model.embed(query, query_mask), model.embed(gallery, gallery_mask))
    # image 0: best matches 1 and 1; image 1: 1 and 0 (its [9, 9] is padding)
    np.testing.assert_allclose(scores.numpy(), [1.0, 0.5], atol=1e-6)


def test_chamfer_without_masks_uses_every_descriptor():
    model = Chamfer()
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    gallery = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                            [[-1.0, 0.0], [1.0, 0.0], [9.0, 9.0]]])
    unmasked = model.score(model.embed(query), model.embed(gallery))
    np.testing.assert_allclose(unmasked.numpy(), [(1 + 1 + 1) / 3, (1 + 2 ** -0.5 + 1) / 3],
                               atol=1e-6)


@pytest.mark.subprocess
def test_prepare_dataset_lays_out_what_elvis_datasets_prepare_does(prepared, tmp_path):
    oxford_like_download(tmp_path / "downloads")
    prepare_dataset("roxford5k", data_root=tmp_path / "data", source=tmp_path / "downloads")

    def contents(folder: Path) -> dict[str, bytes]:  # the record of where files came from aside
        return {path.relative_to(folder).as_posix(): path.read_bytes()
                for path in folder.rglob("*") if path.is_file()
                and path.name != ".elvis-prepared.json"}

    assert contents(tmp_path / "data" / "roxford5k") == contents(prepared.folder)
