"""`elvis evaluate --all-datasets` over fixture benchmarks in every ground-truth layout.

Expected numbers are recomputed here from the cached feature files with plain numpy and the
spec's AP definitions written out again, independently of elvis_cli.evaluation.metrics.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from elvis_cli.backbones import create_backbone
from elvis_cli.features.store import FeatureStore
from tests.test_cli import SMALL, elvis, photos, random_checkpoint

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


@pytest.mark.slow
def test_evaluate_all_datasets_table_files_and_hand_computed_metrics(tmp_path):
    data = tmp_path / "data"
    make_fixtures(data)
    backbone = create_backbone("efficientnet-lite0", image_size=64, num_local=16)
    random_checkpoint(tmp_path / "ckpt.pt", 320, backbone.settings())
    result = elvis("evaluate", "--data-root", data, "--all-datasets", *SMALL,
                   "--model", "global,chamfer", "--model", "elvis", "--checkpoint", "ckpt.pt",
                   "--shortlist", "0", "2", "--out-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(tmp_path / "out" / "results.csv")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(
        rows.to_json(orient="records"))
    assert (tmp_path / "out" / "runtime.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(set(rows["dataset"])) == ["gldv2-test", "instre", "roxford5k", "sop-1k"]
    assert len(rows) == 4 * 3  # global, chamfer@2, elvis@2 per dataset
    got = {(r.dataset, r.model): r for r in rows.itertuples()}

    ranking, _, queries, gallery = features(data, "roxford5k")
    with queries, gallery:
        ranked = [list(row) for row in ranking]
        medium = np.mean([trapezoid_ap(ranked[p], {2 * p, 2 * p + 1}, {2} if p == 0 else set())
                          for p in range(4)])
        hard = np.mean([trapezoid_ap(ranked[p], {2 * p + 1}, ({2} if p == 0 else set()) | {2 * p})
                        for p in range(4)])
    assert got["roxford5k", "global"].map_medium == pytest.approx(medium)
    assert got["roxford5k", "global"].map_hard == pytest.approx(hard)
    assert got["roxford5k", "global"].map == pytest.approx((medium + hard) / 2)

    ranking, _, queries, gallery = features(data, "instre")
    with queries, gallery:
        expected = np.mean([plain_ap(list(ranking[p]), {2 * p, 2 * p + 1}, {2 * ((p + 1) % 4)},
                                     100) for p in range(4)])
        first = [next(g for g in ranking[p] if g != 2 * ((p + 1) % 4)) for p in range(4)]
    assert got["instre", "global"].map == pytest.approx(expected)
    instre = rows[(rows["dataset"] == "instre") & (rows["model"] == "global")].iloc[0]
    assert instre["recall@1"] == pytest.approx(
        100 * np.mean([first[p] // 2 == p for p in range(4)]))

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
    assert got["sop-1k", "global"].map == pytest.approx(np.mean(global_aps))
    assert got["sop-1k", "chamfer"].map == pytest.approx(np.mean(chamfer_aps))

    ranking, _, queries, gallery = features(data, "gldv2-test")
    with queries, gallery:
        # queries are ordered public first (photos 1, 3), then private (photos 0, 2); the index
        # lists photo p's views at rows 2p, 2p+1
        order = [1, 3, 0, 2]
        aps = [plain_ap(list(ranking[q]), {2 * p, 2 * p + 1}, set(), 100)
               for q, p in enumerate(order)]
    assert got["gldv2-test", "global"].map == pytest.approx(np.mean(aps[2:]))
    assert got["gldv2-test", "global"].map_public == pytest.approx(np.mean(aps[:2]))
    assert got["gldv2-test", "global"].map_all == pytest.approx(np.mean(aps))

    assert rows["paper_map"].isna().all()  # not the paper's configuration
    for model in ("chamfer", "elvis"):
        assert (rows[rows["model"] == model]["shortlist"] == 2).all()
    out = result.stdout
    for text in ("roxford5k", "instre", "sop-1k", "gldv2-test", "chamfer@2", "elvis@2",
                 "average (all)", "average (out-of-domain)", "runtime vs shortlist size",
                 "not evaluated: rparis6k (missing): elvis datasets prepare rparis6k"):
        assert text in out, text
    ood = (got["instre", "global"].map + got["sop-1k", "global"].map) / 2  # the registry's OOD sets
    average_line = next(line for line in out.splitlines() if "average (out-of-domain)" in line)
    assert f"{ood:.2f}" in average_line
