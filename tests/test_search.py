"""`elvis search`: new photos against an extracted gallery in one call, scored exactly as
`elvis extract` then `elvis rerank --queries --gallery` would; and the refusal of query and
gallery files that were not extracted alike."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from elvis_cli import (
    ExtractConfig,
    FeatureStore,
    InputError,
    RerankConfig,
    export_official,
    extract_images,
    rerank_files,
    search_images,
)
from tests.helpers import cli_in, one_line_error, random_checkpoint, write_store, write_views

OPTIONS = {"image_size": 64, "num_local": 16}
CONFIG = RerankConfig(shortlist=3, workers=1)


def extract(source, output, **options) -> None:
    extract_images(source, output, ExtractConfig(backbone_options={**OPTIONS, **options}))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> SimpleNamespace:
    """imgs/ (two views of four photos) extracted small into g.h5, a checkpoint c.pt for it,
    and one view extracted alone into q.h5, as a user would before `elvis rerank`."""
    cwd = tmp_path_factory.mktemp("search")
    write_views(cwd / "imgs")
    extract(cwd / "imgs", cwd / "g.h5")
    extract(cwd / "imgs" / "cat_0.jpg", cwd / "q.h5")
    with FeatureStore.open(cwd / "g.h5") as store:
        random_checkpoint(cwd / "c.pt", store.local_dim, store.backbone_settings)
    return SimpleNamespace(cwd=cwd, checkpoint=cwd / "c.pt")


def search(gallery, queries, **options):
    return search_images(queries, gallery.cwd / "g.h5", checkpoint=gallery.checkpoint,
                         config=CONFIG, **options)


def test_a_searched_photo_scores_as_its_extracted_file_reranked(gallery, monkeypatch):
    monkeypatch.chdir(gallery.cwd)
    run = search(gallery, "imgs/cat_0.jpg")
    reranked = rerank_files(queries=gallery.cwd / "q.h5", gallery=gallery.cwd / "g.h5",
                            checkpoint=gallery.checkpoint, config=CONFIG)
    pd.testing.assert_frame_equal(run.table, reranked.table, check_exact=True)
    assert run.queries == ["imgs/cat_0.jpg"] and run.skipped == []
    # the photo itself is in the gallery: found first, by a path that opens from here
    assert run.gallery_paths[run.result.indices[0, 0]] == "imgs/cat_0.jpg"

def test_several_photos_folders_and_globs_each_once(gallery, monkeypatch):
    monkeypatch.chdir(gallery.cwd)
    run = search(gallery, ["imgs/rocket_1.jpg", "imgs/cat_*.jpg", "imgs/cat_0.jpg"])
    assert run.queries == ["imgs/rocket_1.jpg", "imgs/cat_0.jpg", "imgs/cat_1.jpg"]
    assert list(run.table["query_path"].unique()) == run.queries
    assert len(search(gallery, "imgs").queries) == 8
    with pytest.raises(InputError, match="no images found"):
        search(gallery, "imgs/dog_*.jpg")


def test_unreadable_photos_are_named_and_skipped(gallery, tmp_path):
    (tmp_path / "notes.jpg").write_text("just text\n")
    photo = gallery.cwd / "imgs" / "coffee_1.jpg"
    missing = tmp_path / "gone.jpg"
    result = cli_in("search", photo, tmp_path / "notes.jpg", missing, "--gallery", "g.h5",
                    "--checkpoint", "c.pt", "--shortlist", "3", "--quiet", cwd=gallery.cwd)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"elvis: skipped {tmp_path / 'notes.jpg'}: not a recognised image format",
        f"elvis: skipped {missing}: cannot read (No such file or directory)"]
    assert "imgs/coffee_1.jpg" in result.stdout  # the one photo read was searched
    one_line_error(cli_in("search", tmp_path / "notes.jpg", missing, "--gallery", "g.h5",
                          "--checkpoint", "c.pt", "--quiet", cwd=gallery.cwd),
                   "no photo could be read", "notes.jpg (not a recognised image format)",
                   "gone.jpg (cannot read")


def test_search_checks_its_output_and_gallery_before_any_work(gallery, tmp_path):
    one_line_error(cli_in("search", "imgs/cat_0.jpg", "--gallery", "g.h5", "-o", "out.txt",
                          cwd=gallery.cwd), "output must end in .csv")
    one_line_error(cli_in("search", "imgs/cat_0.jpg", cwd=tmp_path),
                   "feats.h5: features file not found")


def test_a_gallery_without_backbone_settings_is_refused(gallery, tmp_path):
    export_official(gallery.cwd / "g.h5", tmp_path, "lite", "gallery")
    one_line_error(cli_in("search", gallery.cwd / "imgs" / "cat_0.jpg", "--gallery",
                          tmp_path / "lite_gallery_local.hdf5", cwd=gallery.cwd),
                   "records no backbone settings", "elvis rerank --queries")


@pytest.mark.parametrize(("option", "difference"), [
    ({"image_size": 96}, "image_size 96 vs 64"),
    ({"global_pooling": "avg"}, "global_pooling avg vs gem"),
])
def test_rerank_refuses_queries_extracted_otherwise(gallery, tmp_path, option, difference):
    extract(gallery.cwd / "imgs" / "cat_0.jpg", tmp_path / "other.h5", **option)
    one_line_error(cli_in("rerank", "--queries", tmp_path / "other.h5", "--gallery", "g.h5",
                          "--checkpoint", "c.pt", cwd=gallery.cwd),
                   "other.h5 and g.h5 were extracted with different backbone settings",
                   difference)


def test_rerank_refuses_descriptors_of_another_dimension(gallery, tmp_path):
    """Released files record no settings: their dimensions are compared."""
    extract(gallery.cwd / "imgs" / "cat_0.jpg", tmp_path / "stage5.h5",
            local_descriptors="network", local_layer=5)
    export_official(tmp_path / "stage5.h5", tmp_path, "lite", "query")
    export_official(gallery.cwd / "g.h5", tmp_path, "lite", "gallery")
    one_line_error(cli_in("rerank", "--queries", tmp_path / "lite_query_local.hdf5",
                          "--gallery", tmp_path / "lite_gallery_local.hdf5", "--checkpoint",
                          "c.pt", cwd=gallery.cwd),
                   "lite_query_local.hdf5 holds 112-d local descriptors and", "128-d")
    # files of equal settings but other widths are refused as well, before any model runs
    rng = np.random.default_rng(0)
    write_store(tmp_path / "a.h5", rng, 2, 4, [4, 4], dim=48).close()
    write_store(tmp_path / "b.h5", rng, 2, 4, [4, 4], dim=32).close()
    one_line_error(cli_in("rerank", "--queries", "a.h5", "--gallery", "b.h5", cwd=tmp_path),
                   "a.h5 holds 48-d local descriptors and", "b.h5 32-d")



def test_the_embedding_cache_keeps_the_gallery_not_the_photos(gallery, tmp_path):
    config = RerankConfig(shortlist=3, workers=1, embedding_cache=tmp_path / "cache")
    first = search_images(gallery.cwd / "imgs" / "cat_0.jpg", gallery.cwd / "g.h5",
                          checkpoint=gallery.checkpoint, config=config)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one features file: the gallery's
    again = search_images(gallery.cwd / "imgs" / "cat_0.jpg", gallery.cwd / "g.h5",
                          checkpoint=gallery.checkpoint, config=config)
    np.testing.assert_array_equal(again.result.scores, first.result.scores)
    np.testing.assert_array_equal(again.result.scores, search(gallery, gallery.cwd / "imgs" /
                                                              "cat_0.jpg").result.scores)
