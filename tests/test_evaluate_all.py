"""`elvis evaluate --all-datasets` over fixture benchmarks in every ground-truth layout.

Expected numbers are recomputed here from the cached feature files with plain numpy and the
spec's AP definitions written out again, independently of elvis_cli.evaluation.metrics.
"""

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from elvis_cli.backbones import create_backbone
from elvis_cli.features.store import FeatureStore
from tests.conftest import SMALL
from tests.helpers import elvis, photos, random_checkpoint

PHOTOS = list(photos())  # astronaut, cat, coffee, rocket


def views(pixels: np.ndarray) -> list[Image.Image]:
    """Three overlapping crops of one photo, small so extraction takes milliseconds."""
    h, w = pixels.shape[:2]
    crops = (pixels[: 3 * h // 4, : 3 * w // 4], pixels[h // 4:, w // 4:],
             pixels[h // 8: 7 * h // 8, w // 8: 7 * w // 8])
    return [Image.fromarray(crop).resize((80, 64)) for crop in crops]


def save_views(path_of) -> None:
    """path_of(photo index, view index) -> Path or None; saves each wanted view there."""
    for p, pixels in enumerate(photos().values()):
        for v, image in enumerate(views(pixels)):
            path = path_of(p, v)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)


def make_fixtures(root: Path) -> None:
    # revisitop easy/hard/junk: queries = view 0, gallery = views 1 and 2 of every photo
    gallery = [f"{name}_{v}" for name in PHOTOS for v in (1, 2)]
    gnd = [{"easy": [2 * p], "hard": [2 * p + 1], "junk": [], "bbx": [0, 0, 80, 64]}
           for p in range(4)]
    gnd[0]["junk"] = [2]  # the cat's first view is junk for the astronaut query
    _pickle(root, "roxford5k", {"imlist": gallery, "qimlist": [f"{n}_0" for n in PHOTOS],
                                "gnd": gnd})
    save_views(lambda p, v: root / "roxford5k" / "jpg" / f"{PHOTOS[p]}_{v}.jpg")
    # ok/junk with file suffixes
    _pickle(root, "instre", {"imlist": [f"{g}.png" for g in gallery],
                             "qimlist": [f"{n}_0.png" for n in PHOTOS],
                             "gnd": [{"ok": [2 * p, 2 * p + 1], "junk": [2 * ((p + 1) % 4)]}
                                     for p in range(4)]})
    save_views(lambda p, v: root / "instre" / "jpg" / f"{PHOTOS[p]}_{v}.png")
    # class-labelled lines: every image is a query and in the gallery
    (root / "sop-1k" / "jpg").mkdir(parents=True)
    (root / "sop-1k" / "gallery.txt").write_text(
        "".join(f"{name}/{v}.jpg,{p},super\n" for p, name in enumerate(PHOTOS) for v in range(3)))
    save_views(lambda p, v: root / "sop-1k" / "jpg" / PHOTOS[p] / f"{v}.jpg")
    # GLDv2: index = views 1, 2; test = view 0; two public and two private queries
    index_id = {(p, v): f"{'abcd'[p]}{v}{p}x" for p in range(4) for v in (1, 2)}
    (root / "gldv2-test").mkdir()
    (root / "gldv2-test" / "index.csv").write_text("id\n" + "".join(f"{i}\n" for i in
                                                               index_id.values()))
    usage = ["Private", "Public", "Private", "Public"]
    (root / "gldv2-test" / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\n" + "".join(f"q{p}zz,{index_id[p, 1]} {index_id[p, 2]},{usage[p]}\n"
                                      for p in range(4)) + "q9zz,None,Ignored\n")
    save_views(lambda p, v: root / "gldv2-test" / "test" / "q" / str(p) / "z" / f"q{p}zz.jpg"
               if v == 0 else root / "gldv2-test" / "index" / Path(*index_id[p, v][:3])
               / f"{index_id[p, v]}.jpg")


def _pickle(root: Path, name: str, data: dict) -> None:
    (root / name).mkdir(parents=True)
    with open(root / name / f"gnd_{name}.pkl", "wb") as handle:
        pickle.dump(data, handle)


def features(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, FeatureStore, FeatureStore]:
    queries = FeatureStore.open(next((root / name / "features").glob("*/query.h5")))
    gallery = FeatureStore.open(next((root / name / "features").glob("*/gallery.h5")))
    scores = queries.global_descriptors() @ gallery.global_descriptors().T
    return np.argsort(-scores, axis=1, kind="stable"), scores, queries, gallery


def trapezoid_ap(ranked: list[int], positives: set[int], junk: set[int]) -> float:
    kept = [g for g in ranked if g not in junk or g in positives]
    hits = [r for r, g in enumerate(kept) if g in positives]
    area = 0.0
    for k, r in enumerate(hits):
        area += ((k / r if r else 1.0) + (k + 1) / (r + 1)) / 2
    return 100 * area / len(positives)


def plain_ap(ranked: list[int], positives: set[int], junk: set[int], k: int) -> float:
    """The list cut to its first k, then junk out; precision at each positive summed and
    divided by min(#positives, length of the cut list)."""
    cut = ranked[:k]
    kept = [g for g in cut if g not in junk]
    hits = [r for r, g in enumerate(kept) if g in positives]
    total = sum((n + 1) / (r + 1) for n, r in enumerate(hits))
    return 100 * total / min(len(positives), len(cut))


def chamfer_rerank(ranked: list[int], query: np.ndarray, gallery: FeatureStore, top: int,
                   mask: np.ndarray) -> list[int]:
    """Top `top` re-sorted by mean best cosine (query padding excluded), the rest kept."""
    def chamfer(row: int) -> float:
        desc, pad = gallery.local_descriptors([row])
        g = desc[0][~pad[0]]
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        q = query[~mask] / np.linalg.norm(query[~mask], axis=1, keepdims=True)
        return float((q @ g.T).max(axis=1).mean())

    head = sorted(ranked[:top], key=lambda row: -chamfer(row))
    return head + ranked[top:]


pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> SimpleNamespace:
    """`elvis evaluate --all-datasets` once over the four fixture benchmarks with the global,
    chamfer and ELViS models; its results table and the data folder with the cached
    features."""
    cwd = tmp_path_factory.mktemp("evaluate_all")
    data = cwd / "data"
    make_fixtures(data)
    backbone = create_backbone("efficientnet-lite0", image_size=64, num_local=16)
    random_checkpoint(cwd / "ckpt.pt", backbone.local_dim, backbone.settings())
    result = elvis("evaluate", "--data-root", data, "--all-datasets", *SMALL,
                   "--model", "global,chamfer", "--model", "elvis", "--checkpoint", "ckpt.pt",
                   "--shortlist", "0", "2", "--out-dir", "out", cwd=cwd)
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(cwd / "out" / "results.csv")
    return SimpleNamespace(cwd=cwd, data=data, stdout=result.stdout, rows=rows,
                           got={(r.dataset, r.model): r for r in rows.itertuples()})


def test_results_json_holds_the_csv_rows(evaluated):
    assert json.loads((evaluated.cwd / "out" / "results.json").read_text()) == json.loads(
        evaluated.rows.to_json(orient="records"))


def test_a_runtime_plot_is_written(evaluated):
    assert (evaluated.cwd / "out" / "runtime.png").read_bytes()[:4] == b"\x89PNG"


def test_every_dataset_present_gets_a_row_per_model(evaluated):
    rows = evaluated.rows
    assert sorted(set(rows["dataset"])) == ["gldv2-test", "instre", "roxford5k", "sop-1k"]
    assert len(rows) == 4 * 3  # global, chamfer@2, elvis@2 per dataset


def test_revisitop_medium_and_hard_are_the_trapezoidal_maps(evaluated):
    ranking, _, queries, gallery = features(evaluated.data, "roxford5k")
    with queries, gallery:
        ranked = [list(row) for row in ranking]
        medium = np.mean([trapezoid_ap(ranked[p], {2 * p, 2 * p + 1}, {2} if p == 0 else set())
                          for p in range(4)])
        hard = np.mean([trapezoid_ap(ranked[p], {2 * p + 1}, ({2} if p == 0 else set()) | {2 * p})
                        for p in range(4)])
    row = evaluated.got["roxford5k", "global"]
    assert row.map_medium == pytest.approx(medium)
    assert row.map_hard == pytest.approx(hard)
    assert row.map == pytest.approx((medium + hard) / 2)


def test_ok_junk_lists_give_the_plain_map_and_recall(evaluated):
    ranking, _, queries, gallery = features(evaluated.data, "instre")
    with queries, gallery:
        expected = np.mean([plain_ap(list(ranking[p]), {2 * p, 2 * p + 1}, {2 * ((p + 1) % 4)},
                                     100) for p in range(4)])
        first = [next(g for g in ranking[p] if g != 2 * ((p + 1) % 4)) for p in range(4)]
    rows = evaluated.rows
    instre = rows[(rows["dataset"] == "instre") & (rows["model"] == "global")].iloc[0]
    assert instre["map"] == pytest.approx(expected)
    assert instre["recall@1"] == pytest.approx(
        100 * np.mean([first[p] // 2 == p for p in range(4)]))


def sop_aps(data: Path) -> tuple[list[float], list[float]]:
    """Each sop-1k query's AP over the global ranking and over its chamfer re-ranking."""
    ranking, _, queries, gallery = features(data, "sop-1k")
    with queries, gallery:
        global_aps, chamfer_aps = [], []
        for q in range(12):
            positives = {g for g in range(12) if g // 3 == q // 3 and g != q}
            # its own row takes no re-ranking slot, and no slot of the top 100
            ranked = [g for g in ranking[q] if g != q]
            global_aps.append(plain_ap(ranked, positives, set(), 100))
            desc, pad = queries.local_descriptors([q])
            reranked = chamfer_rerank([*ranked, q], desc[0], gallery, 2, pad[0])
            chamfer_aps.append(plain_ap([g for g in reranked if g != q], positives, set(), 100))
    return global_aps, chamfer_aps


def test_class_lines_exclude_the_query_itself(evaluated):
    global_aps, _ = sop_aps(evaluated.data)
    assert evaluated.got["sop-1k", "global"].map == pytest.approx(np.mean(global_aps))


def test_chamfer_reranks_the_head_by_mean_best_cosine(evaluated):
    _, chamfer_aps = sop_aps(evaluated.data)
    assert evaluated.got["sop-1k", "chamfer"].map == pytest.approx(np.mean(chamfer_aps))


def test_gldv2_reports_private_public_and_all(evaluated):
    ranking, _, queries, gallery = features(evaluated.data, "gldv2-test")
    with queries, gallery:
        # queries are ordered public first (photos 1, 3), then private (photos 0, 2); the index
        # lists photo p's views at rows 2p, 2p+1
        order = [1, 3, 0, 2]
        aps = [plain_ap(list(ranking[q]), {2 * p, 2 * p + 1}, set(), 100)
               for q, p in enumerate(order)]
    row = evaluated.got["gldv2-test", "global"]
    assert row.map == pytest.approx(np.mean(aps[2:]))
    assert row.map_public == pytest.approx(np.mean(aps[:2]))
    assert row.map_all == pytest.approx(np.mean(aps))


def test_no_paper_number_beside_another_configuration(evaluated):
    assert evaluated.rows["paper_map"].isna().all()


def test_rerankers_are_run_at_the_shortlist_sizes_asked_for(evaluated):
    rows = evaluated.rows
    for model in ("chamfer", "elvis"):
        assert list(rows[rows["model"] == model]["shortlist"]) == [2] * 4, model


@pytest.mark.parametrize("text", [
    "roxford5k", "instre", "sop-1k", "gldv2-test", "chamfer@2", "elvis@2", "average (all)",
    "average (out-of-domain)", "runtime vs shortlist size",
    "not evaluated: rparis6k (missing): elvis datasets prepare rparis6k",
    "sop-1k: chamfer@2 vs global: ", "gldv2-test: elvis@2 vs global: ", "out/per_query.csv"])
def test_the_printed_table_has(evaluated, text):
    assert text in evaluated.stdout


def test_the_out_of_domain_average_is_over_the_registrys_ood_sets(evaluated):
    got = evaluated.got
    ood = (got["instre", "global"].map + got["sop-1k", "global"].map) / 2
    average_line = next(line for line in evaluated.stdout.splitlines()
                        if "average (out-of-domain)" in line)
    assert f"{ood:.2f}" in average_line


@pytest.fixture(scope="module")
def per_query(evaluated) -> pd.DataFrame:
    return pd.read_csv(evaluated.cwd / "out" / "per_query.csv")


def test_per_query_aps_average_to_the_map_of_every_kind_of_ground_truth(evaluated, per_query):
    means = per_query.groupby(["dataset", "model", "shortlist", "protocol"])["ap"].mean()
    for row in evaluated.rows.itertuples():
        mean = means.loc[row.dataset, row.model, row.shortlist]  # by protocol
        if row.dataset == "roxford5k":
            assert mean["medium"] == pytest.approx(row.map_medium, abs=1e-9)
            assert mean["hard"] == pytest.approx(row.map_hard, abs=1e-9)
        elif row.dataset == "gldv2-test":
            rows = per_query[(per_query["dataset"] == row.dataset)
                             & (per_query["model"] == row.model)]
            private = rows[rows["split"] == "private"]["ap"]
            assert len(private) == 2 and private.mean() == pytest.approx(row.map, abs=1e-9)
            assert mean["ok"] == pytest.approx(row.map_all, abs=1e-9)
        else:
            assert mean["ok"] == pytest.approx(row.map, abs=1e-9), row


def test_per_query_aps_are_each_querys_own(evaluated, per_query):
    global_aps, chamfer_aps = sop_aps(evaluated.data)
    sop = per_query[per_query["dataset"] == "sop-1k"]
    for model, expected in (("global", global_aps), ("chamfer", chamfer_aps)):
        rows = sop[sop["model"] == model]
        assert list(rows["query"]) == [f"{name}/{v}.jpg" for name in PHOTOS for v in range(3)]
        np.testing.assert_allclose(rows["ap"], expected, atol=1e-9)
