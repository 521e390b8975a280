"""Global post-processing: αQE and GSS against hand-computed values on tiny fixtures, GSS's
training (its loss falls, a seed fixes it), and `--post` through shortlist, rerank and evaluate
(the CLI gives what the library gives)."""

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from elvis_cli import (
    EvaluateConfig,
    ExtractConfig,
    InputError,
    PostConfig,
    TaskProgress,
    alpha_query_expansion,
    evaluate_datasets,
    extract_images,
    guided_similarity_separation,
    load_shortlist,
    post_processed_shortlist,
    rerank_files,
    shortlist_files,
)
from elvis_cli.evaluation.report import headline_rows, runtime_curve
from elvis_cli.retrieval.gss import GssNetwork, gss_loss, knn_adjacency, normalised_adjacency
from elvis_cli.retrieval.post import LocalFeatures
from elvis_cli.retrieval.query_expansion import expand_reranked
from tests.conftest import SMALL
from tests.helpers import cli_in, one_line_error, random_checkpoint, write_views

SMALL_OPTIONS = {"image_size": 64, "num_local": 16}
# four gallery images on the unit circle and a query at angle 0
GALLERY = np.array([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def test_aqe_adds_the_top_n_weighted_by_similarity_to_the_alpha():
    first, _ = post_processed_shortlist(QUERY, GALLERY, 2, False)
    assert first.indices.tolist() == [[0, 1]]
    expanded = alpha_query_expansion(QUERY, GALLERY, first.indices, first.similarities, 3.0)
    # 1 * q + 0.8^3 * g0 + 0.6^3 * g1 = (1 + 0.512*0.8 + 0.216*0.6, 0.512*0.6 + 0.216*0.8)
    x, y = 1 + 0.4096 + 0.1296, 0.3072 + 0.1728
    norm = math.sqrt(x * x + y * y)
    np.testing.assert_allclose(expanded, [[x / norm, y / norm]], rtol=1e-6)


def test_aqe_gives_negative_and_missing_neighbours_no_weight():
    # g2 (similarity 0), g3 (-1) and a padded slot add nothing: only g0 counts
    neighbours = np.array([[0, 2, 3, -1]])
    similarities = np.array([[0.8, 0.0, -1.0, -np.inf]], dtype=np.float32)
    expanded = alpha_query_expansion(QUERY, GALLERY, neighbours, similarities, 3.0)
    x, y = 1 + 0.512 * 0.8, 0.512 * 0.6
    np.testing.assert_allclose(expanded, [[x, y]] / np.hypot(x, y), rtol=1e-6)


def test_aqe_searches_again_with_the_expanded_query():
    shortlist, report = post_processed_shortlist(
        QUERY, GALLERY, 4, False, "aqe", PostConfig(aqe_n=2, aqe_alpha=3.0))
    x, y = 1.5392, 0.48
    expected = GALLERY @ (np.array([x, y]) / np.hypot(x, y))
    assert shortlist.indices.tolist() == [[0, 1, 2, 3]]
    np.testing.assert_allclose(shortlist.similarities[0], expected, rtol=1e-5)
    assert report.method == "aqe" and report.losses == []


def test_aqe_after_reranking_keeps_the_reranked_top_n_first_then_searches_again():
    # a fifth image g4 (similarity 0.3) comes before g2 (0) for the query itself; expanded with
    # g1, the re-ranker's first, (1, 0) + 0.6 * (0.6, 0.8) = (1.36, 0.48): g2 scores 0.48 and
    # g4 0.3 * 1.36 - 0.954 * 0.48 < 0, so g2 now comes first among the rest
    gallery = np.vstack([GALLERY, [[0.3, -math.sqrt(1 - 0.09)]]]).astype(np.float32)
    ranking = np.array([[1, 0, 4, 2, 3]])
    assert expand_reranked(QUERY, gallery, ranking, 1, 1.0).tolist() == [[1, 0, 2, 4, 3]]
    assert expand_reranked(QUERY, gallery, ranking, 1, 1.0)[0, 0] == 1


SIMILARITY = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.0]], dtype=np.float32)


def test_gss_graph_keeps_each_images_top_k_both_ways_without_self_edges():
    # top 2 of each row: 0 -> {0, 1}, 1 -> {1, 0}, 2 -> {2, 1}; self-edges dropped
    expected = np.array([[0, 0.5, 0], [0.5, 0, 0.2], [0, 0.2, 0]], dtype=np.float32)
    np.testing.assert_array_equal(knn_adjacency(SIMILARITY, 2, symmetric=True), expected)
    queries = knn_adjacency(SIMILARITY[:1], 2, symmetric=False)
    np.testing.assert_array_equal(queries, [[1.0, 0.5, 0.0]])


def test_gss_propagation_is_the_normalised_graph_then_elu():
    adjacency = knn_adjacency(SIMILARITY, 2, symmetric=True)
    # A + I has row sums 1.5, 1.7, 1.2; entry ij divided by sqrt(d_i d_j)
    degree = [1.5, 1.7, 1.2]
    with_self = [[1, 0.5, 0], [0.5, 1, 0.2], [0, 0.2, 1]]
    propagation = normalised_adjacency(adjacency)
    for i in range(3):
        for j in range(3):
            assert propagation[i, j] == pytest.approx(
                with_self[i][j] / math.sqrt(degree[i] * degree[j]), rel=1e-6)
    features = np.array([[1.0, -1.0], [0.0, 2.0], [3.0, 0.0]], dtype=np.float32)
    network = GssNetwork(2, layers=1, layer_decay=0.3, init_std=0.0, seed=0)  # identity
    out = network(torch.from_numpy(features), torch.from_numpy(propagation).to_sparse())
    mixed = propagation.astype(np.float64) @ features
    activated = np.where(mixed > 0, mixed, np.exp(mixed) - 1)  # elu
    expected = activated / np.linalg.norm(activated, axis=1, keepdims=True)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_gss_loss_is_minus_half_the_mean_squared_distance_from_beta():
    # relu(e e^T) = [[1, 0], [0, 1]]: (1 - 0.3)^2 twice, (0 - 0.3)^2 twice
    embeddings = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert gss_loss(embeddings, 0.3).item() == pytest.approx(-0.5 * (0.49 + 0.09) / 2)


def clustered(seed: int = 0) -> np.ndarray:
    """12 unit descriptors in three loose clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 8))
    points = np.repeat(centres, 4, axis=0) + 0.6 * rng.standard_normal((12, 8))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_gss_training_loss_falls_epoch_by_epoch():
    config = PostConfig(gss_k=3, gss_epochs=30, gss_lr=3e-3)
    result = guided_similarity_separation(None, clustered(), config)
    losses = np.array(result.losses)
    assert len(losses) == 30
    assert losses[-1] < losses[0] - 0.04
    assert (np.diff(losses) < 0).all()


def test_gss_reports_each_epoch_and_refuses_a_gallery_of_one():
    events: list[TaskProgress] = []
    guided_similarity_separation(None, clustered(), PostConfig(gss_k=3, gss_epochs=3),
                                 events.append)
    assert [(event.task, event.done, event.total) for event in events] == [
        ("training GSS", done, 3) for done in range(4)]
    with pytest.raises(InputError, match="GSS needs a gallery of 2 to 20000 images"):
        guided_similarity_separation(None, clustered()[:1])


def test_gss_is_fixed_by_its_seed():
    queries = clustered(1)[:2]
    config = PostConfig(gss_k=3, gss_epochs=5, gss_lr=1e-2, gss_init_std=0.1)
    first = guided_similarity_separation(queries, clustered(), config)
    again = guided_similarity_separation(queries, clustered(), config)
    other = guided_similarity_separation(queries, clustered(), PostConfig(
        gss_k=3, gss_epochs=5, gss_lr=1e-2, gss_init_std=0.1, gss_seed=1))
    np.testing.assert_array_equal(first.queries, again.queries)
    np.testing.assert_array_equal(first.gallery, again.gallery)
    assert first.losses == again.losses
    assert not np.array_equal(first.gallery, other.gallery)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> SimpleNamespace:
    cwd = tmp_path_factory.mktemp("post")
    write_views(cwd / "imgs")
    extract_images(cwd / "imgs", cwd / "f.h5", ExtractConfig(backbone_options=SMALL_OPTIONS))
    return SimpleNamespace(cwd=cwd, features=cwd / "f.h5")


def test_elvis_shortlist_post_aqe_is_shortlist_files(extracted):
    result = cli_in("shortlist", "--features", "f.h5", "-k", "3", "-o", "s.npz", "--post", "aqe",
                    "--aqe-n", "3", cwd=extracted.cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("post aqe: ")
    from_cli = load_shortlist(extracted.cwd / "s.npz")
    library = shortlist_files(extracted.features, k=3, post="aqe", post_config=PostConfig(aqe_n=3))
    np.testing.assert_array_equal(from_cli.indices, library.indices)
    np.testing.assert_array_equal(from_cli.similarities, library.similarities)
    assert library.post.method == "aqe"


def test_elvis_shortlist_post_gss_prints_the_loss_by_epoch(extracted):
    result = cli_in("shortlist", "--features", "f.h5", "-k", "3", "-o", "g.npz", "--post", "gss",
                    "--gss-epochs", "4", "--gss-k", "3", cwd=extracted.cwd)
    assert result.returncode == 0, result.stderr
    library = shortlist_files(extracted.features, k=3, post="gss",
                              post_config=PostConfig(gss_epochs=4, gss_k=3))
    losses = ", ".join(f"{epoch + 1}: {loss:.6f}" for epoch, loss in
                       enumerate(library.post.losses))
    assert f"loss by epoch: {losses}\n" in result.stdout
    np.testing.assert_array_equal(load_shortlist(extracted.cwd / "g.npz").indices,
                                  library.indices)


def test_elvis_rerank_post_reranks_the_post_processed_ranking(extracted):
    result = cli_in("rerank", "--features", "f.h5", "--model", "chamfer", "--shortlist", "2",
                    "--post", "aqe", "-o", "r.csv", cwd=extracted.cwd)
    assert result.returncode == 0, result.stderr
    run = rerank_files(extracted.features, model="chamfer", post="aqe",
                       config=_rerank_config(2))
    numbers = ["query_index", "rank", "gallery_index", "global_score", "raw_score", "score"]
    pd.testing.assert_frame_equal(pd.read_csv(extracted.cwd / "r.csv")[numbers],
                                  run.table[numbers], check_dtype=False)
    expanded = shortlist_files(extracted.features, k=2, post="aqe")
    first = run.table[run.table["query_index"] == 0].sort_values("gallery_index")
    order = np.argsort(expanded.indices[0])
    np.testing.assert_allclose(first["global_score"], expanded.similarities[0][order],
                               rtol=1e-6)
    assert run.post.method == "aqe"


def _rerank_config(shortlist: int):
    from elvis_cli import RerankConfig

    return RerankConfig(shortlist=shortlist)


def test_post_refuses_given_candidates_and_unknown_names(extracted):
    cli_in("shortlist", "--features", "f.h5", "-k", "3", "-o", "c.npz", cwd=extracted.cwd)
    result = cli_in("rerank", "--features", "f.h5", "--candidates", "c.npz", "--post", "aqe",
                    cwd=extracted.cwd)
    one_line_error(result, "--post aqe searches again", "leave out --candidates")
    result = cli_in("shortlist", "--features", "f.h5", "--post", "dqe", cwd=extracted.cwd)
    one_line_error(result, "unknown post-processing 'dqe'; use none, aqe, gss, gss-v, rerank-aqe")
    result = cli_in("rerank", "--features", "f.h5", "--post", "rerank-aqe", cwd=extracted.cwd)
    one_line_error(result, "--post rerank-aqe is offered by `elvis evaluate` only")
    result = cli_in("shortlist", "--features", "f.h5", "--post", "aqe", "--aqe-n", "0",
                    cwd=extracted.cwd)
    assert result.returncode == 2  # below its minimum: a usage error


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> SimpleNamespace:
    """A revisitop-layout dataset of 4 queries and 4 gallery images, evaluated with chamfer at
    shortlist 2 on the plain and the αQE global ranking, and with αQE after re-ranking."""
    cwd = tmp_path_factory.mktemp("bench")
    root = cwd / "data" / "mini"
    names = write_views(root / "jpg")
    gnd = [{"easy": [0], "hard": [], "junk": [1]}] + [
        {"easy": [], "hard": [i], "junk": []} for i in range(1, 4)]
    with open(root / "gnd_mini.pkl", "wb") as handle:
        pickle.dump({"imlist": names[1::2], "qimlist": names[0::2], "gnd": gnd}, handle)
    common = {"backbone_options": SMALL_OPTIONS, "models": ["global", "chamfer"],
              "shortlists": [0, 2], "device": "cpu"}
    plain = evaluate_datasets(cwd / "data", ["mini"], EvaluateConfig(**common),
                              out_dir=cwd / "plain")
    events: list[TaskProgress] = []
    both = evaluate_datasets(cwd / "data", ["mini"], EvaluateConfig(
        **common, post=["none", "aqe", "rerank-aqe"]), out_dir=cwd / "both",
        progress=events.append)
    after = evaluate_datasets(cwd / "data", ["mini"], EvaluateConfig(**common,
                                                                     post=["rerank-aqe"]),
                              out_dir=cwd / "after")
    return SimpleNamespace(cwd=cwd, plain=plain, both=both, after=after, events=events)


def test_evaluate_post_is_a_row_dimension_and_leaves_the_plain_rows_alone(benchmark):
    table = benchmark.both.table
    assert table[["model", "shortlist", "post"]].values.tolist() == [
        ["global", 0, "none"], ["chamfer", 2, "none"], ["chamfer", 2, "rerank-aqe"],
        ["global", 0, "aqe"], ["chamfer", 2, "aqe"]]
    summary = benchmark.both.summary
    assert list(summary.columns) == ["dataset", "metric", "global", "global+aqe", "chamfer@2",
                                     "chamfer@2+aqe", "chamfer@2+rerank-aqe", "paper"]
    for column in benchmark.plain.summary.columns:
        pd.testing.assert_series_equal(summary[column], benchmark.plain.summary[column])
    assert set(benchmark.both.per_query["model"]) == {
        "global", "chamfer", "global+aqe", "chamfer+aqe", "chamfer+rerank-aqe"}
    stages = [event for event in benchmark.events if event.task == "evaluating"]
    assert stages[-1].done == stages[-1].total == 4  # features, aqe, chamfer twice


def test_evaluate_rerank_aqe_alone_gives_only_its_rows(benchmark):
    after = benchmark.after.table
    assert after[["model", "post"]].values.tolist() == [["chamfer", "rerank-aqe"]]
    both = benchmark.both.table
    np.testing.assert_allclose(after["map"], both.loc[both["post"] == "rerank-aqe", "map"])


def test_elvis_evaluate_post_prints_each_combination(benchmark):
    result = cli_in("evaluate", "--data-root", "data", "--dataset", "mini", *SMALL,
                    "--model", "global,chamfer", "--shortlist", "0,2",
                    "--post", "none,aqe,rerank-aqe", "--device", "cpu", "--quiet",
                    "--out-dir", "cli", cwd=benchmark.cwd)
    assert result.returncode == 0, result.stderr
    for label in ("global+aqe", "chamfer@2+aqe", "chamfer@2+rerank-aqe"):
        assert label in result.stdout
    assert "mini: global+aqe vs global: " in result.stdout
    written = pd.read_csv(benchmark.cwd / "cli" / "results.csv")
    pd.testing.assert_frame_equal(written[["model", "shortlist", "post", "map"]],
                                  benchmark.both.table[["model", "shortlist", "post", "map"]])


def test_runtime_curve_starts_each_post_processed_model_at_its_global_ranking(benchmark):
    curve = benchmark.both.curve
    starts = curve[curve["shortlist"] == 0].set_index("method")["map"]
    table = benchmark.both.table
    global_map = table[(table["model"] == "global")].set_index("post")["map"]
    assert starts["chamfer+aqe"] == global_map["aqe"]
    assert starts["chamfer+rerank-aqe"] == global_map["none"]  # it re-ranks the plain ranking
    assert set(curve["method"]) == {"global", "global+aqe", "chamfer", "chamfer+aqe",
                                    "chamfer+rerank-aqe"}
    # the plot reads the headline rows again: naming them twice must not change them
    pd.testing.assert_frame_equal(runtime_curve(headline_rows(table)), curve)


def chamfer_fused(store, query: int, row: int) -> float:
    """Chamfer's fused score by hand: sigmoid of the mean best cosine (its lam 0, temp 1)."""
    descriptors, padding = store.local_descriptors([query, row])
    q, g = (d[~p] / np.linalg.norm(d[~p], axis=1, keepdims=True)
            for d, p in zip(descriptors, padding, strict=True))
    return 1 / (1 + math.exp(-float((q @ g.T).max(axis=1).mean())))


def test_gss_v_drops_exactly_the_edges_the_verifier_scores_below_the_threshold(extracted):
    from elvis_cli.features.store import FeatureStore
    from elvis_cli.retrieval.gss_verification import reranker_edge_filter

    with FeatureStore.open(extracted.features) as store:
        descriptors = store.global_descriptors()
        similarity = descriptors @ descriptors.T
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :3]
        edges = [(i, int(j)) for i in range(len(top)) for j in top[i]]
        scores = {edge: chamfer_fused(store, *edge) for edge in edges}
        # halfway between two middle scores: some edges stay, some go, none sits on the line
        ordered = sorted(scores.values())
        threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        edge_filter = reranker_edge_filter(LocalFeatures(store, store), PostConfig(
            gss_verifier="chamfer", gss_verify_threshold=threshold))
        for of_queries in (False, True):
            kept = edge_filter(top, np.take_along_axis(similarity, top, axis=1), of_queries)
            expected = [[scores[(i, int(j))] >= threshold and (of_queries or i != j)
                         for j in top[i]] for i in range(len(top))]
            assert kept.tolist() == expected
        assert 0 < np.sum(expected) < len(edges) - len(top)
        graph = knn_adjacency(similarity, 3, symmetric=True,
                              verify=lambda t, v: edge_filter(t, v, False))
    by_hand = np.zeros_like(graph)
    for i, j in edges:
        if i != j and scores[(i, j)] >= threshold:
            by_hand[i, j] = by_hand[j, i] = similarity[i, j]
    np.testing.assert_array_equal(graph, by_hand)


def test_gss_v_keeping_every_edge_is_gss_bit_for_bit(extracted):
    from elvis_cli.features.store import FeatureStore
    from elvis_cli.retrieval.gss_verification import reranker_edge_filter

    config = PostConfig(gss_k=3, gss_query_k=2, gss_epochs=3, gss_lr=1e-2, gss_init_std=0.1,
                        gss_verifier="chamfer", gss_verify_threshold=0.0)
    with FeatureStore.open(extracted.features) as store:
        descriptors = store.global_descriptors()
        verified = guided_similarity_separation(descriptors, descriptors, config, None,
                                                reranker_edge_filter(LocalFeatures(store, store),
                                                                     config))
    plain = guided_similarity_separation(descriptors, descriptors, config)
    np.testing.assert_array_equal(verified.queries, plain.queries)
    np.testing.assert_array_equal(verified.gallery, plain.gallery)
    assert verified.losses == plain.losses
    options = {"k": 3, "post_config": config}
    gss_v = shortlist_files(extracted.features, post="gss-v", **options)
    gss = shortlist_files(extracted.features, post="gss", **options)
    np.testing.assert_array_equal(gss_v.indices, gss.indices)
    np.testing.assert_array_equal(gss_v.similarities, gss.similarities)
    # no edge verified: a different graph, so different descriptors
    strict = shortlist_files(extracted.features, post="gss-v", k=3, post_config=PostConfig(
        gss_k=3, gss_epochs=3, gss_verifier="chamfer", gss_verify_threshold=2.0))
    assert not np.array_equal(strict.similarities, gss.similarities)


def test_elvis_shortlist_post_gss_v_is_shortlist_files(extracted):
    result = cli_in("shortlist", "--features", "f.h5", "-k", "3", "-o", "v.npz", "--post",
                    "gss-v", "--gss-epochs", "3", "--gss-k", "3", "--gss-verifier", "chamfer",
                    "--gss-verify-threshold", "0.68", cwd=extracted.cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("post gss-v: ")
    library = shortlist_files(extracted.features, k=3, post="gss-v", post_config=PostConfig(
        gss_epochs=3, gss_k=3, gss_verifier="chamfer", gss_verify_threshold=0.68))
    np.testing.assert_array_equal(load_shortlist(extracted.cwd / "v.npz").indices,
                                  library.indices)
    np.testing.assert_array_equal(load_shortlist(extracted.cwd / "v.npz").similarities,
                                  library.similarities)


def test_gss_v_refuses_a_verifier_that_scores_no_pairs(extracted):
    result = cli_in("shortlist", "--features", "f.h5", "--post", "gss-v", "--gss-verifier",
                    "chamfr", cwd=extracted.cwd)
    one_line_error(result, "unknown gss verifier 'chamfr' (did you mean 'chamfer'?)")
    result = cli_in("shortlist", "--features", "f.h5", "--post", "gss-v", "--gss-verifier",
                    "global", cwd=extracted.cwd)
    one_line_error(result, "--gss-verifier global scores no pairs; name a local re-ranker")


def test_elvis_evaluate_post_gss_v_gives_its_rows(benchmark):
    result = cli_in("evaluate", "--data-root", "data", "--dataset", "mini", *SMALL,
                    "--model", "global,chamfer", "--shortlist", "0,2", "--post", "gss,gss-v",
                    "--gss-epochs", "3", "--gss-k", "2", "--gss-verifier", "chamfer",
                    "--device", "cpu", "--quiet", "--out-dir", "gssv", cwd=benchmark.cwd)
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(benchmark.cwd / "gssv" / "results.csv")
    assert written[["model", "shortlist", "post"]].values.tolist() == [
        ["global", 0, "gss"], ["chamfer", 2, "gss"], ["global", 0, "gss-v"],
        ["chamfer", 2, "gss-v"]]
    for label in ("global+gss-v", "chamfer@2+gss-v"):
        assert label in result.stdout


def test_elvis_rerank_post_gss_v_is_rerank_files(extracted):
    from elvis_cli import RerankConfig
    from elvis_cli.features.store import FeatureStore

    with FeatureStore.open(extracted.features) as store:
        random_checkpoint(extracted.cwd / "c.pt", store.local_dim, store.backbone_settings)
    result = cli_in("rerank", "--features", "f.h5", "--checkpoint", "c.pt", "--shortlist", "2",
                    "--post", "gss-v", "--gss-epochs", "2", "--gss-k", "3", "-o", "v.csv",
                    cwd=extracted.cwd)
    assert result.returncode == 0, result.stderr
    run = rerank_files(extracted.features, checkpoint=extracted.cwd / "c.pt", post="gss-v",
                       post_config=PostConfig(gss_epochs=2, gss_k=3),
                       config=RerankConfig(shortlist=2))
    numbers = ["query_index", "rank", "gallery_index", "global_score", "raw_score", "score"]
    pd.testing.assert_frame_equal(pd.read_csv(extracted.cwd / "v.csv")[numbers],
                                  run.table[numbers], check_dtype=False)
    assert run.post.method == "gss-v"
