"""`elvis explain`: a pair's correspondences, dustbin gains and raw score taken apart, checked
against the model's own tensors and against `elvis rerank`; a checkpoint's f and g, with the
votes of a labelled set; one-line errors for images that are not there."""

import json
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from elvis_cli import (
    ExtractConfig,
    FeatureStore,
    Fusion,
    RerankConfig,
    explain_checkpoint,
    explain_pair,
    extract_images,
    load_checkpoint,
    rerank_files,
    save_checkpoint,
    search_images,
)
from elvis_cli.explanation.curves import curves_figure
from elvis_cli.explanation.pair import pair_figure
from elvis_cli.model.elvis import Elvis, ElvisConfig
from tests.helpers import cli_in, one_line_error, photos, write_views

# the network's local descriptors: a 4 x 4 grid at most, so non-square photos pad
OPTIONS = {"local_descriptors": "network", "image_size": 128, "num_local": 16}
TOP = 6


def extract(source, output) -> None:
    extract_images(source, output, ExtractConfig(backbone_options=OPTIONS))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A labelled benchmark `tiny` (two views of four photos; the first views are the queries,
    the second ones their matches) extracted small as `elvis evaluate` keeps it, and the
    bundled model saved as a checkpoint of its own fusion (its votes are spread apart: no near
    ties among the strongest)."""
    cwd = tmp_path_factory.mktemp("explain")
    root = cwd / "tiny"
    names = write_views(root / "jpg")
    gallery = [name for name in names if name.endswith("_1")] + ["cat_0", "rocket_0"]
    queries = [name for name in names if name.endswith("_0")]
    # the same view in the gallery is junk for its query
    ground_truth = [{"ok": np.array([gallery.index(q[:-1] + "1")]),
                     "junk": np.array([gallery.index(q)] if q in gallery else [], int)}
                    for q in queries]
    (root / "gnd_tiny.pkl").write_bytes(pickle.dumps(
        {"imlist": gallery, "qimlist": queries, "gnd": ground_truth}))
    settings = root / "features" / "small"
    extract([root / "jpg" / f"{name}.jpg" for name in gallery], settings / "gallery.h5")
    extract([root / "jpg" / f"{n}.jpg" for n in queries], settings / "query.h5")
    with FeatureStore.open(settings / "gallery.h5") as store:
        save_checkpoint(cwd / "c.pt", load_checkpoint("efficientnet-lite0").model,
                        store.backbone_settings, Fusion(0.3, 0.2))
        padded = int((store.read_local(range(store.num_images))[..., 3] > 0.5).sum())
    assert padded, "the test wants padding slots"
    return SimpleNamespace(cwd=cwd, root=root, gallery=settings / "gallery.h5",
                           queries=settings / "query.h5", checkpoint=cwd / "c.pt",
                           gallery_names=gallery)


def checkpoint_model(files) -> Elvis:
    """The model of the fixture's checkpoint, loaded here without the library's loader."""
    state = torch.load(files.checkpoint, weights_only=True)["state"]
    model = Elvis(ElvisConfig(descriptor_dim=state["remap_local.0.weight"].shape[1])).eval()
    model.load_state_dict(state)
    return model


def explained(files, query="cat_1.jpg", gallery="cat_0.jpg", **options):
    return explain_pair(query, gallery, features=files.gallery, checkpoint=files.checkpoint,
                        top=TOP, **options)


def plan_in_float64(model: Elvis, src, tgt) -> np.ndarray:
    """P' of ELVIS_SPEC §1 steps 3-7, in float64 log domain, from the model's embeddings."""
    s, t = (e.descriptors[0].double().numpy() for e in (src, tgt))
    hs, ht = (e.gains[0].double().numpy() for e in (src, tgt))
    pads = [np.zeros(len(x), bool) if e.mask is None else e.mask[0].numpy()
            for x, e in ((s, src), (t, tgt))]
    m, n = len(s), len(t)
    augmented = np.empty((m + 1, n + 1))
    augmented[:m, :n] = np.where(pads[0][:, None] | pads[1][None, :], -np.inf, s @ t.T)
    augmented[m, :n], augmented[:m, n], augmented[m, n] = ht, hs, model.dust_bin.item()
    big_m = augmented / 0.1
    log_a = np.full(m + 1, -math.log(m + n))
    log_b = np.full(n + 1, -math.log(m + n))
    log_a[m] += math.log(n)
    log_b[n] += math.log(m)
    u, v = np.zeros(m + 1), np.zeros(n + 1)
    for _ in range(10):
        u = log_a - np.logaddexp.reduce(big_m + v[None, :], axis=1)
        v = log_b - np.logaddexp.reduce(big_m + u[:, None], axis=0)
    return np.exp(big_m + u[:, None] + v[None, :] + math.log(m + n))[:m, :n]


def test_the_drawn_correspondences_are_the_models_strongest_votes(files):
    explanation = explained(files)
    elvis = checkpoint_model(files)
    with FeatureStore.open(files.gallery) as store:
        rows = [files.gallery_names.index(name) for name in ("cat_1", "cat_0")]
        descriptors, padding = store.local_descriptors(rows)
    with torch.no_grad():
        src, tgt = (elvis.embed(torch.from_numpy(descriptors[i:i + 1]) * ~torch.from_numpy(
            padding[i:i + 1, :, None]), torch.from_numpy(padding[i:i + 1])) for i in (0, 1))
    plan = plan_in_float64(elvis, src, tgt)
    real_q, real_g = ~padding[0], ~padding[1]
    with torch.no_grad():
        def contribution(vote):
            return torch.sigmoid(elvis.f(torch.tensor([[vote]], dtype=torch.float32))).item()

        votes = [(contribution(plan[i].max()), i, int(plan[i].argmax())) for i in
                 np.flatnonzero(real_q)]
        votes += [(contribution(plan[:, j].max()), int(plan[:, j].argmax()), j) for j in
                  np.flatnonzero(real_g)]
    best: dict[tuple[int, int], float] = {}
    for value, i, j in votes:
        best[i, j] = max(value, best.get((i, j), 0.0))
    expected = sorted(best, key=lambda ends: -best[ends])[:TOP]
    drawn = [(match.query, match.gallery) for match in explanation.vote_matches]
    assert drawn == expected
    assert [match.value for match in explanation.vote_matches] == pytest.approx(
        [best[ends] for ends in expected], abs=1e-5)
    similarity = (src.descriptors[0] @ tgt.descriptors[0].T).detach().numpy()
    similarity[padding[0]] = -np.inf
    similarity[:, padding[1]] = -np.inf
    flat = np.argsort(-similarity, axis=None, kind="stable")[:TOP]
    assert [(m.query, m.gallery) for m in explanation.similarity_matches] == [
        divmod(int(i), similarity.shape[1]) for i in flat]

    # the lines drawn join exactly those descriptors' positions on the two photos
    figure = pair_figure(explanation)
    for axis, matches in zip(figure.axes[:2], (explanation.similarity_matches,
                                               explanation.vote_matches), strict=True):
        (lines,) = axis.collections
        (ql, qr, qb, _), (gl, gr, gb, _) = (image.get_extent() for image in axis.images)
        ends = np.array([[[ql + explanation.query.positions[m.query, 1] * (qr - ql),
                           explanation.query.positions[m.query, 0] * qb],
                          [gl + explanation.gallery.positions[m.gallery, 1] * (gr - gl),
                           explanation.gallery.positions[m.gallery, 0] * gb]]
                         for m in matches])
        np.testing.assert_allclose(np.array(lines.get_segments()), ends)
        np.testing.assert_allclose(lines.get_array(), [m.value for m in matches])


def test_the_contributions_add_up_to_the_raw_score_of_elvis_rerank(files, tmp_path):
    run = rerank_files(files.gallery, checkpoint=files.checkpoint,
                       config=RerankConfig(shortlist=5, workers=1), output=tmp_path / "r.csv")
    table = run.table
    for query, gallery in (("cat_1", "cat_0"), ("coffee_1", "rocket_1")):
        rows = table[table["query_path"].str.endswith(f"{query}.jpg")
                     & table["gallery_path"].str.endswith(f"{gallery}.jpg")]
        assert len(rows) == 1  # every other image is in the shortlist of 5
        explanation = explained(files, f"{query}.jpg", f"{gallery}.jpg")
        reranked = rows.iloc[0]
        assert explanation.raw_score == pytest.approx(reranked["raw_score"], abs=1e-4)
        assert float(explanation.contributions.sum()) == pytest.approx(reranked["raw_score"],
                                                                       abs=1e-4)
        assert explanation.score == pytest.approx(reranked["score"], abs=1e-5)
        assert explanation.global_score == pytest.approx(reranked["global_score"], abs=1e-5)
        parts = explanation.ranges()
        assert sum(part.votes for part in parts) == explanation.counted_votes
        assert sum(part.total for part in parts) == pytest.approx(explanation.raw_score,
                                                                  abs=1e-4)


def test_a_photo_not_in_the_file_is_extracted_as_search_would(files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(photos()["cat"][40:, 60:]).save(tmp_path / "new.jpg")
    explanation = explain_pair("new.jpg", "cat_0.jpg", features=files.gallery,
                               checkpoint=files.checkpoint)
    found = search_images("new.jpg", files.gallery, checkpoint=files.checkpoint,
                          config=RerankConfig(shortlist=6, workers=1))
    row = files.gallery_names.index("cat_0")
    rank = list(found.result.indices[0]).index(row)
    assert explanation.query.features is None and explanation.query.path == "new.jpg"
    assert explanation.raw_score == pytest.approx(found.result.raw_scores[0, rank], abs=1e-4)
    # a stored image named by its path, or by its row, is read from the file
    by_path = explain_pair(files.root / "jpg" / "cat_1.jpg", "cat_0.jpg",
                           features=files.gallery, checkpoint=files.checkpoint)
    by_row = explain_pair(files.gallery_names.index("cat_1"), str(row),
                          features=files.gallery, checkpoint=files.checkpoint)
    assert by_path.query.index == by_row.query.index == files.gallery_names.index("cat_1")
    assert by_path.raw_score == by_row.raw_score


def test_elvis_explain_writes_the_picture_svg_and_numbers(files):
    result = cli_in("explain", "cat_1.jpg", "cat_0.jpg", "--features", files.gallery,
                    "--checkpoint", files.checkpoint, "-o", "out/pair.png", "--svg",
                    "--json", "out/pair.json", cwd=files.cwd)
    assert result.returncode == 0, result.stderr
    numbers = json.loads((files.cwd / "out" / "pair.json").read_text())
    explanation = explained(files)
    assert numbers["raw_score"] == pytest.approx(explanation.raw_score)
    assert numbers["contributions_sum"] == pytest.approx(numbers["raw_score"], abs=1e-4)
    after = numbers["correspondences_after_transport"]  # the strongest 25, ours the first 6
    assert [(c["query"], c["gallery"]) for c in after[:TOP]] == [
        (m.query, m.gallery) for m in explanation.vote_matches]
    assert f"raw score {explanation.raw_score:.2f}" in result.stdout
    assert (files.cwd / "out" / "pair.svg").read_text().lstrip().startswith("<?xml")
    with Image.open(files.cwd / "out" / "pair.png") as picture:
        assert picture.format == "PNG" and picture.width > 500


@pytest.mark.parametrize(("args", "fragments"), [
    (["0", "99"], ["image index 99 out of range", "holds 6 images (0..5)"]),
    (["cat_1.jpg", "nowhere.jpg"], ["nowhere.jpg: not an image of", "gallery.h5"]),
    (["cat_1.jpg"], ["give two images, QUERY and GALLERY"]),
    (["cat_1.jpg", "cat_0.jpg", "-o", "pair.jpg"], ["output must end in .png"]),
])
def test_bad_input_is_one_line(files, args, fragments):
    one_line_error(cli_in("explain", *args, "--features", files.gallery, "--checkpoint",
                          files.checkpoint, cwd=files.cwd), *fragments)


def test_f_and_g_with_the_votes_of_a_labelled_set(files):
    curves = explain_checkpoint(files.checkpoint, features=files.gallery, pairs_per_query=3)
    labelled = curves.labelled
    assert labelled.dataset == "tiny"
    assert len(labelled.matching_scores) == len(labelled.other_scores) == 4  # one positive each
    # each matching pair scores as its explanation does
    with FeatureStore.open(files.queries) as queries:
        first = queries.paths[0]
    pair = explain_pair(0, files.gallery_names.index(first[:-6] + "_1"), features=files.queries,
                        gallery_features=files.gallery, checkpoint=files.checkpoint)
    assert labelled.matching_scores[0] == pytest.approx(pair.raw_score, abs=1e-4)
    real = ~np.concatenate([pair.query.padding, pair.gallery.padding])
    np.testing.assert_array_equal(labelled.matching_votes[:pair.counted_votes], pair.votes[real])
    model = checkpoint_model(files)
    with torch.no_grad():
        f = torch.sigmoid(model.f(torch.tensor(curves.votes, dtype=torch.float32)[:, None]))
    np.testing.assert_allclose(curves.f, f[:, 0].numpy(), rtol=1e-6)
    figure = curves_figure(curves)
    assert len(figure.axes) == 4  # f and g, the distributions beneath them


def test_elvis_explain_without_images_draws_the_bundled_checkpoint(files):
    result = cli_in("explain", "-o", "fg.png", "--json", "fg.json", cwd=files.cwd)
    assert result.returncode == 0, result.stderr
    assert "checkpoint efficientnet-lite0-rootsift" in result.stdout
    numbers = json.loads((files.cwd / "fg.json").read_text())
    assert numbers["f"]["sigmoid_f"][0] < 0.1 < 0.9 < numbers["f"]["sigmoid_f"][-1]
    one_line_error(cli_in("explain", "--features", files.cwd / "c.pt", cwd=files.cwd),
                   "not a labelled set")


def test_keypoint_gains_are_dots_at_the_keypoints(files):
    """RootSIFT keypoints (the default backbone's) lie on no grid: the gains panel puts a dot
    at each real one, coloured by its gain; grid features paint cells instead."""
    photo = files.root / "jpg"
    explanation = explain_pair(photo / "cat_0.jpg", photo / "cat_1.jpg")
    assert explanation.checkpoint == "efficientnet-lite0-rootsift"
    gains_axis = pair_figure(explanation).axes[2]
    assert len(gains_axis.images) == 2  # the photos
    for dots, image in zip(gains_axis.collections, (explanation.query, explanation.gallery),
                           strict=True):
        real = ~image.padding
        assert len(dots.get_offsets()) == real.sum() > 0
        np.testing.assert_allclose(dots.get_array(), image.gains[real])
    grid_axis = pair_figure(explained(files)).axes[2]
    assert len(grid_axis.images) == 4 and not grid_axis.collections  # photos, their grids
