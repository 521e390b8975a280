"""Asymmetric low-resolution queries: queries extracted at a smaller image size than the
gallery (`evaluate --query-image-size`, `search --query-image-size`), and `rerank
--asymmetric`, which accepts exactly that difference between query and gallery files and
still refuses every other."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from elvis_cli import (
    EvaluateConfig,
    ExtractConfig,
    FeatureStore,
    InputError,
    RerankConfig,
    extract_images,
    rerank_files,
    search_images,
)
from elvis_cli.evaluation.datasets import RetrievalDataset
from elvis_cli.evaluation.run import evaluate_dataset, extract_dataset, score_rankings
from elvis_cli.features.layout import META_PADDING
from elvis_cli.retrieval.shortlist import build_shortlist
from tests.helpers import cli_in, one_line_error, random_checkpoint, write_views

GALLERY = {"local_descriptors": "network", "image_size": 96, "num_local": 16}
CONFIG = RerankConfig(shortlist=3, workers=1)


def extract(source, output, **options) -> None:
    extract_images(source, output, ExtractConfig(backbone_options={**GALLERY, **options}))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """imgs/ (two views of four photos) extracted at 96 px into g.h5 with a checkpoint c.pt,
    and one view extracted at 64 px (q64.h5), at 128 px (q128.h5) and at 64 px with another
    global pooling (q64avg.h5)."""
    cwd = tmp_path_factory.mktemp("asymmetric")
    write_views(cwd / "imgs")
    extract(cwd / "imgs", cwd / "g.h5")
    photo = cwd / "imgs" / "cat_0.jpg"
    extract(photo, cwd / "q64.h5", image_size=64)
    extract(photo, cwd / "q128.h5", image_size=128)
    extract(photo, cwd / "q64avg.h5", image_size=64, global_pooling="avg")
    with FeatureStore.open(cwd / "g.h5") as store:
        random_checkpoint(cwd / "c.pt", store.local_dim, store.backbone_settings)
    return SimpleNamespace(cwd=cwd)


def rerank(files, queries: str, **options):
    return rerank_files(queries=files.cwd / queries, gallery=files.cwd / "g.h5",
                        checkpoint=files.cwd / "c.pt", config=CONFIG, **options)


def test_rerank_takes_smaller_queries_only_when_asked(files):
    one_line_error(cli_in("rerank", "--queries", "q64.h5", "--gallery", "g.h5",
                          "--checkpoint", "c.pt", cwd=files.cwd),
                   "q64.h5 and g.h5 were extracted with different backbone settings "
                   "(image_size 64 vs 96): extract the queries as the gallery was, or pass "
                   "--asymmetric for queries made smaller on purpose")
    result = cli_in("rerank", "--queries", "q64.h5", "--gallery", "g.h5", "--checkpoint",
                    "c.pt", "--shortlist", "3", "--asymmetric", "-o", "out.csv", cwd=files.cwd)
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(files.cwd / "out.csv")
    assert len(written) == 3 and written["raw_score"].notna().all()


@pytest.mark.parametrize(("queries", "message"), [
    ("q64avg.h5", "(global_pooling avg vs gem, image_size 64 vs 96): extract the queries as "
                  "the gallery was (--asymmetric allows only the image size to differ)"),
    ("q128.h5", "(image_size 128 vs 96): --asymmetric takes queries extracted smaller than "
                "the gallery"),
])
def test_asymmetric_still_refuses_any_other_difference(files, queries, message):
    with pytest.raises(InputError, match=r"were extracted with different backbone settings") \
            as refused:
        rerank(files, queries, asymmetric=True)
    assert message in str(refused.value)


def test_asymmetric_needs_a_query_and_a_gallery_file(files):
    with pytest.raises(InputError, match="--asymmetric needs --queries and --gallery"):
        rerank_files(files.cwd / "g.h5", asymmetric=True)


def test_search_extracts_the_photos_at_the_query_size(files, monkeypatch):
    """Exactly the scores of the photo extracted at 64 px and re-ranked asymmetrically."""
    monkeypatch.chdir(files.cwd)
    run = search_images("imgs/cat_0.jpg", files.cwd / "g.h5", checkpoint=files.cwd / "c.pt",
                        config=CONFIG, query_image_size=64)
    pd.testing.assert_frame_equal(run.table, rerank(files, "q64.h5", asymmetric=True).table,
                                  check_exact=True)
    symmetric = search_images("imgs/cat_0.jpg", files.cwd / "g.h5",
                              checkpoint=files.cwd / "c.pt", config=CONFIG)
    assert not np.array_equal(run.result.raw_scores, symmetric.result.raw_scores,
                              equal_nan=True)
    with pytest.raises(InputError, match="query image size must be positive"):
        search_images("imgs/cat_0.jpg", files.cwd / "g.h5", query_image_size=0)


def test_search_and_evaluate_take_the_option(files):
    result = cli_in("search", "imgs/cat_0.jpg", "--gallery", "g.h5", "--checkpoint", "c.pt",
                    "--shortlist", "3", "--query-image-size", "64", "--quiet", cwd=files.cwd)
    assert result.returncode == 0, result.stderr
    assert "imgs/cat_0.jpg" in result.stdout
    assert cli_in("evaluate", "--dataset", "x", "--query-image-size", "0",
                  cwd=files.cwd).returncode == 2
    one_line_error(cli_in("evaluate", "--data-root", ".", "--dataset", "x", "--descriptors",
                          "dinov2", "--query-image-size", "64", cwd=files.cwd),
                   "--query-image-size extracts the queries")


@pytest.fixture(scope="module")
def toy(files) -> RetrievalDataset:
    """The views as a benchmark: each photo's first view a query, its second the positive."""
    (files.cwd / "toy").mkdir(exist_ok=True)
    if not (files.cwd / "toy" / "jpg").exists():
        (files.cwd / "toy" / "jpg").symlink_to(files.cwd / "imgs")
    names = ["astronaut", "cat", "coffee", "rocket"]
    ground_truth = [{"ok": np.array([i]), "junk": np.array([], dtype=np.int64)}
                    for i in range(4)]
    return RetrievalDataset("toy", files.cwd / "toy", [f"{n}_1" for n in names],
                            [f"{n}_0" for n in names], ground_truth, "ok-junk", map_k=4)


def evaluate_config(files, **options) -> EvaluateConfig:
    return EvaluateConfig(backbone_options=GALLERY, models=["global", "chamfer"],
                          shortlists=[0, 2], device="cpu", features_dir=files.cwd / "features",
                          **options)


def real_descriptors(store: FeatureStore) -> np.ndarray:
    return (store.read_local(np.arange(store.num_images))[..., META_PADDING] < 0.5).sum(axis=1)


def test_evaluate_extracts_the_queries_smaller_and_ranks_with_them(files, toy):
    small = evaluate_config(files, query_image_size=64)
    queries, gallery = extract_dataset(toy, small)
    full_queries, same_gallery = extract_dataset(toy, evaluate_config(files))
    with queries, gallery, full_queries, same_gallery:
        assert gallery.path == same_gallery.path  # one gallery for every query size
        assert queries.path.parent != full_queries.path.parent  # queries keyed by their size
        assert queries.backbone_settings == {**gallery.backbone_settings, "image_size": 64}
        assert full_queries.backbone_settings == gallery.backbone_settings
        # a 64 px image has a coarser grid: fewer real local descriptors than at 96 px
        assert (real_descriptors(queries) < real_descriptors(full_queries)).all()
        ranking = build_shortlist(queries.global_descriptors(), gallery.global_descriptors(),
                                  gallery.num_images)
        expected = score_rankings(toy, {"ok": ranking.indices})["map"]
        # float32 global descriptor; chamfer also reads the 16 float16 rows of 5 + D numbers
        global_bytes = 4 * gallery.global_dim
        reranked_bytes = global_bytes + 16 * 2 * (5 + gallery.local_dim)
    rows = evaluate_dataset(toy, small, progress=False).rows
    assert rows[0]["model"] == "global" and rows[0]["map"] == expected
    assert {row["features"] for row in rows} == {"efficientnet-lite0, queries at 64 px"}
    assert [row["bytes_per_image"] for row in rows] == [global_bytes, reranked_bytes]
