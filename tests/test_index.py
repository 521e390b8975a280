"""Shortlists by a faiss index (`--index`): exact flat as before, approximate ones saved beside
the features and reused until the features or the index change. Real faiss, real HDF5."""

import numpy as np
import pytest

from elvis_cli import IndexConfig, shortlist_files
from elvis_cli.features.store import FeatureStore
from elvis_cli.retrieval.index_choice import EXACT_LIMIT, plan_index
from elvis_cli.retrieval.shortlist import build_shortlist, load_shortlist, store_shortlist
from tests.helpers import cli_in, clustered_rows, one_line_error, write_globals

DIM = 32


@pytest.fixture
def gallery(tmp_path):
    """A gallery of 4,000 clustered global descriptors, its features file and the rows."""
    rows = clustered_rows(4000, DIM, seed=0)
    return write_globals(tmp_path / "g.h5", rows), rows


def _index_files(features):
    return sorted(path.name for path in features.with_name(features.name + ".index").iterdir())


def _events(features, **options):
    """The shortlist run and the progress tasks it announced."""
    events = []
    run = shortlist_files(features, k=10, progress=events.append, **options)
    return run, {event.task for event in events}


def test_flat_is_todays_exact_shortlist_bit_for_bit(gallery, tmp_path):
    features, rows = gallery
    queries = write_globals(tmp_path / "q.h5", clustered_rows(50, DIM, seed=1))
    with FeatureStore.open(features) as store, FeatureStore.open(queries) as query_store:
        same, found = store_shortlist(store, store, True, 20)
        pair, _ = store_shortlist(query_store, store, False, 20, config=IndexConfig("flat"))
        query_rows = query_store.global_descriptors()
    assert found.plan.exact and found.path is None  # auto picks flat for a small gallery
    for result, expected in ((same, build_shortlist(rows, rows, 20, exclude_self=True)),
                             (pair, build_shortlist(query_rows, rows, 20))):
        assert result.indices.tobytes() == expected.indices.tobytes()
        assert result.similarities.tobytes() == expected.similarities.tobytes()
    done = cli_in("shortlist", "--features", features, "-k", 20, "-o", "s.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "index flat (Flat): auto, 4,000 images (exact up to 200,000)" in done.stdout
    saved = load_shortlist(tmp_path / "s.npz")
    assert saved.indices.tobytes() == same.indices.tobytes()


def test_approximate_index_is_saved_reused_and_rebuilt_when_the_features_change(gallery):
    features, rows = gallery
    first, tasks = _events(features, index=IndexConfig("ivf"))
    saved = first.index.path
    assert first.index.built and "indexing" in tasks
    assert _index_files(features) == ["cls-IVF64_Flat.faiss", "cls-IVF64_Flat.json"]
    built_at = saved.stat().st_mtime_ns

    again, tasks = _events(features, index=IndexConfig("ivf", nprobe=64))  # a search knob
    assert not again.index.built and "indexing" not in tasks
    assert saved.stat().st_mtime_ns == built_at
    assert "read in" in again.index.describe() and "nprobe 64" in again.index.describe()

    changed = rows.copy()
    changed[[0, 1]] = changed[[1, 0]]  # the same vectors, two images swapped
    write_globals(features, changed)
    rebuilt, tasks = _events(features, index=IndexConfig("ivf"))
    assert rebuilt.index.built and "indexing" in tasks
    assert saved.stat().st_mtime_ns != built_at
    listed = rebuilt.indices >= 0  # each listed image's similarity is that of its new row
    assert np.isin([0, 1], rebuilt.indices[listed]).all()
    expected = np.einsum("qd,qkd->qk", changed, changed[rebuilt.indices])
    np.testing.assert_allclose(rebuilt.similarities[listed], expected[listed], atol=1e-5)


def test_another_index_gets_its_own_file_and_a_damaged_one_is_rebuilt(gallery):
    features, _ = gallery
    hnsw, _ = _events(features, index=IndexConfig("hnsw"))
    assert hnsw.index.built and hnsw.index.plan.ef_search == 128
    flat_ivf, _ = _events(features, index=IndexConfig("IVF16,Flat"))
    assert flat_ivf.index.built and flat_ivf.index.plan.nprobe == 8  # at least 8 lists
    assert _index_files(features) == ["cls-HNSW32_Flat.faiss", "cls-HNSW32_Flat.json",
                                      "cls-IVF16_Flat.faiss", "cls-IVF16_Flat.json"]
    path = hnsw.index.path
    path.write_bytes(path.read_bytes()[:1000])  # cut short: its record no longer matches
    again, tasks = _events(features, index=IndexConfig("hnsw"))
    assert again.index.built and "indexing" in tasks and again.index.path == path


def test_ivf_and_hnsw_recall_on_a_clustered_gallery(gallery):
    """Recall@10 of the default search settings against the exact index, all-vs-all."""
    features, rows = gallery
    exact = build_shortlist(rows, rows, 10, exclude_self=True).indices
    for name in ("ivf", "hnsw"):
        found, _ = _events(features, index=IndexConfig(name))
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.indices, exact,
                                                                    strict=True)])
        assert recall >= 0.9, (name, recall)
        assert not (found.indices == np.arange(len(rows))[:, None]).any()  # self excluded


def test_auto_chooses_by_gallery_size():
    assert plan_index(IndexConfig(), EXACT_LIMIT, 768).exact
    large = plan_index(IndexConfig(), 1_000_000, 768)
    assert (large.name, large.factory, large.nprobe) == ("ivf", "IVF1024,Flat", 16)
    huge = plan_index(IndexConfig(), 10_000_000, 1280)
    assert huge.factory == "IVF4096,PQ160x8" and "51 GB" in huge.reason


@pytest.mark.parametrize(("options", "fragments"), [
    (["--index", "ivf2"], ["--index 'ivf2': expected auto, flat, ivf, hnsw, ivfpq or a faiss "
                           "factory string such as IVF1024,Flat"]),
    (["--index", "IVF4,Bogus"], ["--index 'IVF4,Bogus': faiss cannot build it for 32-d",
                                 "could not parse code description Bogus"]),
    (["--index", "hnsw", "--nprobe", "4"], ["--nprobe applies to index ivf or ivfpq, not hnsw"]),
    (["--ef-search", "40"], ["--ef-search applies to index hnsw, not flat"]),
    (["--index", "ivf", "--post", "aqe"], ["--post aqe searches the gallery exactly, and index "
                                           "ivf is approximate", "pass --index flat"]),
])
def test_bad_index_options_are_one_line(gallery, tmp_path, options, fragments):
    features, _ = gallery
    done = cli_in("shortlist", "--features", features, "-o", "s.npz", *options, cwd=tmp_path)
    one_line_error(done, *fragments)
    assert not (tmp_path / "s.npz").exists()


def test_rerank_takes_the_index_and_refuses_it_with_given_candidates(gallery, tmp_path):
    features, _ = gallery
    done = cli_in("rerank", "--features", features, "--model", "global", "--index", "hnsw",
                  "--shortlist", 5, "-o", "r.csv", "--show", 0, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "index hnsw (HNSW32,Flat, efSearch 128): asked for, 4,000 images; built" in done.stdout
    refused = cli_in("rerank", "--features", features, "--candidates", "s.npz", "--index", "ivf",
                     "-o", "r2.csv", cwd=tmp_path)
    one_line_error(refused, "--index, --nprobe and --ef-search make the shortlist built here")


def test_an_index_that_cannot_be_saved_is_used_from_memory(gallery):
    features, _ = gallery
    features.with_name("g.h5.index").write_text("a file where the folder would go")
    run, _ = _events(features, index=IndexConfig("ivf"))
    assert run.index.path is None and run.index.built
    assert run.index.describe().endswith("not saved (File exists)"), run.index.describe()
    assert (run.indices >= 0).all()
