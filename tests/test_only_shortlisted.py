"""+1M the authors' way (issue #17 item 2): locals of only the shortlisted gallery images
(`elvis extract --only-shortlisted`, a 3-row nn file beside them) and a gallery joined from
two features files (`elvis join`)."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from elvis_cli.features.head import head_file_rows, head_images
from elvis_cli.features.images import collect_images
from elvis_cli.features.joined import join_features
from elvis_cli.features.layout import shard_path
from elvis_cli.features.released import extracted_head
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.verification import verify_features
from elvis_cli.features.writer import finalize, write_shard
from elvis_cli.retrieval.shortlist import Shortlist, load_shortlist, save_shortlist
from tests.conftest import SMALL
from tests.helpers import cli_in, random_checkpoint, write_store, write_views

HEAD = 2


def test_head_rows_are_what_released_files_are_read_by():
    """The rows written for a head are the authors' mapping: extracted_head, which reads
    released 3-row files, finds the same head and images in them."""
    indices = np.array([[5, 2, 7, 1], [2, 9, 5, 0], [8, 5, -1, -1]])
    held = head_images(indices, HEAD)
    assert held.tolist() == [5, 2, 8, 9]  # rank 0 of every query, then rank 1's new ones
    rows = head_file_rows(indices, held)
    assert rows.tolist() == [[0, 1, 7, 1], [1, 3, 0, 0], [2, 0, -1, -1]]
    head, found = extracted_head(indices, rows, len(held))
    assert head == HEAD and found.tolist() == held.tolist()


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    """imgs/ (two views of four photos) extracted whole (g.h5), two query views (q.h5), their
    top-3 shortlist (s.npz), a checkpoint (c.pt) and the locals of only the top 2 (heads.h5)."""
    cwd = tmp_path_factory.mktemp("heads")
    write_views(cwd / "imgs")
    (cwd / "queries").mkdir()
    for name in ("astronaut_0.jpg", "cat_1.jpg"):
        shutil.copy(cwd / "imgs" / name, cwd / "queries" / name)
    for source, output in (("imgs", "g.h5"), ("queries", "q.h5")):
        assert cli_in("extract", source, "-o", output, "--quiet", *SMALL, cwd=cwd).returncode == 0
    shortlisted = cli_in("shortlist", "--queries", "q.h5", "--gallery", "g.h5", "-k", "3", "-o",
                         "s.npz", cwd=cwd)
    assert shortlisted.returncode == 0, shortlisted.stderr
    with FeatureStore.open(cwd / "g.h5") as store:
        random_checkpoint(cwd / "c.pt", store.local_dim, store.backbone_settings)
    extracted = cli_in("extract", "imgs", "--only-shortlisted", "s.npz", "--head", HEAD, "-o",
                       "heads.h5", "--quiet", *SMALL, cwd=cwd)
    assert extracted.returncode == 0, extracted.stderr
    assert "-> heads.h5; re-rank with --candidates heads.nn.npz --shortlist 2" in extracted.stdout
    return cwd


def test_only_the_shortlisted_images_are_extracted(heads):
    ranking = load_shortlist(heads / "s.npz")
    held = head_images(ranking.indices, HEAD)
    listed = collect_images(heads / "imgs")[1]
    with FeatureStore.open(heads / "heads.h5") as few, FeatureStore.open(heads / "g.h5") as all_:
        assert 0 < few.num_images == len(held) < all_.num_images
        assert few.paths == [all_.paths[index] for index in held]
        assert few.paths == [path.name for path in (listed[index] for index in held)]
        assert np.array_equal(few.read_local(range(few.num_images)), all_.read_local(held))
    written = load_shortlist(heads / "heads.nn.npz")
    assert np.array_equal(written.indices, ranking.indices)
    assert np.array_equal(written.file_rows, head_file_rows(ranking.indices, held))


def test_rerank_on_the_heads_equals_rerank_on_the_whole_gallery(heads):
    """Same shortlist, same scores to the bit: only where the locals are read from differs."""
    tables = []
    for gallery, candidates, output in (("g.h5", "s.npz", "whole.parquet"),
                                        ("heads.h5", "heads.nn.npz", "heads.parquet")):
        result = cli_in("rerank", "--queries", "q.h5", "--gallery", gallery, "--candidates",
                        candidates, "--shortlist", HEAD, "--checkpoint", "c.pt", "-o", output,
                        cwd=heads)
        assert result.returncode == 0, result.stderr
        tables.append(pd.read_parquet(heads / output))
    columns = ["query_index", "rank", "gallery_index", "global_score", "raw_score", "score"]
    assert tables[0][columns].equals(tables[1][columns])
    assert tables[0]["raw_score"].notna().sum() == 2 * HEAD
    # images in some head are named by their paths; the file knows nothing of the others
    held = set(head_images(load_shortlist(heads / "s.npz").indices, HEAD).tolist())
    named = [path if index in held else str(index) for index, path in
             zip(tables[0]["gallery_index"], tables[0]["gallery_path"], strict=True)]
    assert tables[1]["gallery_path"].tolist() == named
    assert set(tables[0]["gallery_index"]) - held and set(tables[0]["gallery_index"]) & held


def test_rerank_beyond_the_head_is_refused(heads):
    result = cli_in("rerank", "--queries", "q.h5", "--gallery", "heads.h5", "--candidates",
                    "heads.nn.npz", "--shortlist", "3", "--checkpoint", "c.pt", cwd=heads)
    assert result.returncode == 1 and "re-rank at most 2" in result.stderr, result.stderr


def test_a_shortlist_of_another_gallery_is_refused(heads):
    result = cli_in("extract", "queries", "--only-shortlisted", "s.npz", "-o", "x.h5", *SMALL,
                    cwd=heads)
    assert result.returncode == 1, result.stderr
    assert "but the images given list 2: give the gallery's images" in result.stderr


def test_a_shortlisted_image_that_fails_is_an_error(tmp_path):
    """Rows after a failed image would shift, and re-rank the wrong images: refused."""
    write_views(tmp_path / "imgs")
    (tmp_path / "imgs" / "zz_broken.jpg").write_bytes(b"not a jpeg")  # gallery image 8
    save_shortlist(tmp_path / "s.npz", Shortlist(np.array([[8, 0]]),
                                                 np.array([[0.9, 0.8]], np.float32)))
    result = cli_in("extract", "imgs", "--only-shortlisted", "s.npz", "--head", 1, "-o",
                    "heads.h5", "--quiet", *SMALL, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("elvis: error: 1 shortlisted images could not be "
                                    "extracted (zz_broken.jpg: ")
    assert not (tmp_path / "heads.nn.npz").exists()


def _two_files(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    for name, count in (("base.h5", 4), ("added.h5", 3)):
        write_store(folder / name, rng, count, 6, [6] * count).close()
    return folder / "base.h5", folder / "added.h5"


def test_join_holds_the_base_rows_then_the_added(tmp_path):
    base, added = _two_files(tmp_path)
    result = cli_in("join", base, added, "-o", "joined.h5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 + 3 images -> joined.h5" in result.stdout
    with FeatureStore.open(tmp_path / "joined.h5") as joined, FeatureStore.open(base) as first, \
            FeatureStore.open(added) as second:
        assert joined.paths == first.paths + second.paths
        assert np.array_equal(joined.read_local(range(7)), np.concatenate(
            [first.read_local(range(4)), second.read_local(range(3))]))
        assert np.array_equal(joined.global_descriptors(), np.concatenate(
            [first.global_descriptors(), second.global_descriptors()]))
    assert verify_features(tmp_path / "joined.h5").ok


def test_a_base_changed_after_the_join_is_named(tmp_path):
    base, added = _two_files(tmp_path)
    assert cli_in("join", base, added, "-o", "joined.h5", cwd=tmp_path).returncode == 0
    with FeatureStore.open(tmp_path / "joined.h5") as joined:
        before = joined.identity()
    write_store(base, np.random.default_rng(7), 4, 6, [6] * 4).close()  # re-extracted
    report = verify_features(tmp_path / "joined.h5")
    assert [shard.name for shard in report.shards if not shard.ok] == ["base.h5"]
    assert report.hint == ("a join of added.h5 and base.h5: repair those (`elvis verify` "
                           "each), then run the same `elvis join` command again")
    assert cli_in("join", base, added, "-o", "joined.h5", cwd=tmp_path).returncode == 0
    with FeatureStore.open(tmp_path / "joined.h5") as joined:
        assert joined.identity() != before
    assert verify_features(tmp_path / "joined.h5").ok


def test_files_of_other_image_folders_keep_their_paths(tmp_path):
    """Distractors from another folder: paths relative to the common folder of the two."""
    base, _ = _two_files(tmp_path)
    (tmp_path / "other").mkdir()
    write_store(tmp_path / "other" / "added.h5", np.random.default_rng(2), 2, 6, [6, 6]).close()
    result = cli_in("join", base, "other/added.h5", "-o", "joined.h5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with FeatureStore.open(tmp_path / "joined.h5") as joined:
        assert joined.root == tmp_path
        assert joined.paths[3:] == ["img3.jpg", "other/img0.jpg", "other/img1.jpg"]


def test_files_of_other_settings_are_not_joined(tmp_path):
    _two_files(tmp_path)
    rows = np.zeros((1, 6, 5 + 48), np.float32)
    write_shard(shard_path(tmp_path / "x.h5", 0), rows, np.zeros((1, 3), np.float32), ["a"],
                ["a"], np.ones((1, 2), np.int32))
    finalize(tmp_path / "x.h5", [shard_path(tmp_path / "x.h5", 0)], {"name": "other"},
             tmp_path)
    result = cli_in("join", "base.h5", "x.h5", "-o", "joined.h5", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ("elvis: error: x.h5 differs from base.h5 in its backbone settings "
                             "({'name': 'other'} vs {'name': 'test'}): extract it as the base "
                             "was extracted\n")


def test_join_features_writes_what_elvis_join_writes(tmp_path):
    base, added = _two_files(tmp_path)
    assert cli_in("join", base, added, "-o", "cli.h5", cwd=tmp_path).returncode == 0
    report = join_features(base, added, tmp_path / "lib.h5")
    assert (report.num_base, report.num_added) == (4, 3)
    with FeatureStore.open(tmp_path / "cli.h5") as cli, FeatureStore.open(report.output) as lib:
        assert cli.paths == lib.paths
        assert np.array_equal(cli.read_local(range(7)), lib.read_local(range(7)))


def test_a_joined_file_where_it_cannot_read_its_sources_is_refused(tmp_path):
    base, added = _two_files(tmp_path)
    result = cli_in("join", base, added, "-o", "below/joined.h5", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "base.h5 is not in below/joined.h5's folder" in result.stderr
    assert not (tmp_path / "below" / "joined.h5").exists()


def test_head_needs_only_shortlisted(tmp_path):
    result = cli_in("extract", "imgs", "--head", "3", "-o", "x.h5", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        1, "elvis: error: --head goes with --only-shortlisted\n")
