"""The authors' release layout (ELVIS_SPEC §4) through the real `elvis` command: a fixture folder
with random descriptors and a random-weight checkpoint in the official format."""

import json
import os
import pickle
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from elvis_cli.evaluation.metrics import revisitop_map
from elvis_cli.features.released import open_local, open_released
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.elvis_reranker import ElvisReranker
from elvis_cli.retrieval.rerank import RerankConfig, rerank
from elvis_cli.util.errors import InputError
from tests.helpers import cli_in, elvis, one_line_error
from tests.reference_elvis import reference_score

DIM, STORED, USED = 16, 700, 600
QUERIES = ["q_all_souls", "q_radcliffe"]
GALLERY = [f"img_{i}" for i in range(7)]  # image 6 is in no shortlist
# each query's global list, best first, and its revisitop ground truth
NN = np.array([[3, 1, 4, 0, 5, 2], [0, 2, 5, 1, 3, 4]])
GND = [{"easy": [1], "hard": [0], "junk": [4], "bbx": [0, 0, 5, 5]},
       {"easy": [], "hard": [2, 5], "junk": [], "bbx": [1, 1, 9, 9]}]
# By hand (trapezoidal AP after junk removal). q0 Medium: list 3 1 0 5 2, positives at ranks
# 1, 2 -> (0 + 1/2)/2 and (1/2 + 2/3)/2, halved: 41.67; q0 Hard: 3 0 5 2 -> (0 + 1/2)/2 = 25;
# q1 Medium = Hard: 0 2 5 ... -> 41.67. Medium 41.67, Hard 33.33, mean 37.50.
GLOBAL_MAP = {"map_medium": 125 / 3, "map_hard": 100 / 3, "map": 37.5}


BITS = 128  # binarised files: the ITQ bits, the input of the binarised model's Linear(128, 128)


def descriptors(rng, count, binarised):
    """(count, 700, 5 + D) rows: metadata, then descriptors (-1/+1 bits when binarised); some
    padding, some beyond 600."""
    if binarised:
        desc = np.where(rng.random((count, STORED, BITS)) < 0.5, -1.0, 1.0)
    else:
        desc = rng.standard_normal((count, STORED, DIM))
        desc /= np.linalg.norm(desc, axis=-1, keepdims=True)
    meta = np.zeros((count, STORED, 5))
    meta[..., :2] = rng.random((count, STORED, 2))
    meta[..., 4] = np.sort(rng.random((count, STORED)))[:, ::-1]
    meta[1, 300:, 3] = 1.0  # image 1: only 300 real rows; its padding holds junk values
    return np.concatenate([meta, desc], axis=-1)


def write_local(path, rows, layout):
    if layout == "binarised":  # as the authors' extraction stores them
        bits = np.packbits(rows[..., 5:] > 0, axis=-1)
        dtype = np.dtype([("metadata", np.float16, (STORED, 5)),
                          ("descriptor", np.uint8, (STORED, BITS // 8))])
        table = np.zeros(len(rows), dtype=dtype)
        table["metadata"], table["descriptor"] = rows[..., :5], bits
        with h5py.File(path, "w") as file:
            file.create_dataset("features", data=table)
        return
    dtype = np.float32 if layout == "float32-chunks" else np.float16
    if layout != "float32-chunks":
        with h5py.File(path, "w") as file:
            file.create_dataset("features", data=rows.astype(dtype))
        return
    vds = h5py.VirtualLayout(shape=rows.shape, dtype=dtype)
    for start in range(0, len(rows), 3):  # chunk files of 3 images, joined virtually
        chunk = path.with_name(f"{path.stem}_{start // 3}.hdf5")
        with h5py.File(chunk, "w") as file:
            file.create_dataset("features", data=rows[start : start + 3].astype(dtype))
        part = rows[start : start + 3].shape
        vds[start : start + part[0]] = h5py.VirtualSource(chunk.name, "features", shape=part)
    with h5py.File(path, "w") as file:
        file.create_virtual_dataset("features", vds)


def stored(rows, layout):
    """What a reader gets back from `rows` written in `layout`, as float32."""
    return rows.astype(np.float32 if layout != "float16" else np.float16).astype(np.float32)


def authors_head(nn, head):
    """The authors' find_unique_shortlist, written out: the images in some query's top `head`
    in order of first appearance, rank-major, and the third row (their row in a file holding
    only them; every other entry keeps its own index)."""
    held = []
    for rank in range(head):
        for query in range(len(nn)):
            if nn[query, rank] not in held:
                held.append(int(nn[query, rank]))
    row_of = {image: row for row, image in enumerate(held)}
    return np.array(held), np.array([[row_of.get(g, g) for g in row] for row in nn])


def write_nn(path, similarities, nn, third=None):
    table = [similarities, nn] + ([] if third is None else [third])
    with open(path, "wb") as handle:
        pickle.dump(torch.tensor(np.stack(table), dtype=torch.float32), handle)


def make_release(root, layout="float16", nn_rows=2, seed=0, head=NN.shape[1]):
    """<root>/roxford5k in the official layout; with nn_rows=3 the gallery file holds only the
    images in some query's top `head`. Returns what a reader should get back (gallery rows by
    full-gallery index) and the global similarities of the nn file."""
    folder = root / "roxford5k"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    queries, gallery = descriptors(rng, 2, layout == "binarised"), descriptors(
        rng, len(GALLERY), layout == "binarised")
    similarities = np.sort(rng.random(NN.shape))[:, ::-1]
    gallery_file, third = gallery, None
    if nn_rows == 3:
        held, third = authors_head(NN, head)
        gallery_file = gallery[held]
    write_local(folder / "dinov2_query_local.hdf5", queries, layout)
    write_local(folder / "dinov2_gallery_local.hdf5", gallery_file, layout)
    write_nn(folder / "nn_dinov2.pkl", similarities, NN, third)
    with open(folder / "gnd_roxford5k.pkl", "wb") as handle:
        pickle.dump({"imlist": GALLERY, "qimlist": QUERIES, "gnd": GND}, handle)
    return stored(queries, layout), stored(gallery, layout), similarities


def official_checkpoint(path, seed=0, dim=DIM, binarised=False):
    """Random weights in the official format; binarised: the authors' Matcher(binarized=True)
    state (remap_local.0.W the ITQ projection (dim, 128), then Linear(128, 128), LayerNorm)."""
    torch.manual_seed(seed)
    model = Elvis(ElvisConfig(descriptor_dim=dim, binarised=binarised)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "optim": {}, "epoch": 3}, path)
    return model


def raw_score(model, query_rows, gallery_rows):
    """The model on the first 600 rows of one pair, padding masked."""
    src, tgt = (torch.from_numpy(rows[None, :USED]) for rows in (query_rows, gallery_rows))
    with torch.no_grad():
        return float(model(src[..., 5:], tgt[..., 5:], src[..., 3] > 0.5, tgt[..., 3] > 0.5))


def expected_rerank(model, queries, gallery, ranking, top):
    """Each list's first `top` re-sorted by lam * global + (1 - lam) * sigmoid(temp * raw)."""
    order = []
    for q, (images, sims) in enumerate(ranking):
        head = [(0.5 * s + 0.5 / (1 + np.exp(-0.5 * raw_score(model, queries[q], gallery[g]))),
                 -k, g) for k, (g, s) in enumerate(zip(images[:top], sims[:top], strict=True))]
        order.append([g for *_, g in sorted(head, reverse=True)] + list(images[top:]))
    return np.array(order)


RELEASE_RERANK = "--queries", "roxford5k/dinov2_query_local.hdf5", "--gallery", \
    "roxford5k/dinov2_gallery_local.hdf5", "--candidates", "roxford5k/nn_dinov2.pkl"


@pytest.fixture(scope="module", params=[("float16", 2), ("float32-chunks", 3), ("binarised", 3)],
                ids=["float16", "float32-chunks", "binarised"])
def release_reranked(request, tmp_path_factory):
    """`elvis rerank` of a release in each layout, with the checkpoint named as the cache
    holds it."""
    layout, nn_rows = request.param
    cwd = tmp_path_factory.mktemp("release")
    queries, gallery, similarities = make_release(cwd, layout, nn_rows)
    model = official_checkpoint(cwd / "cache" / "checkpoints" / "dinov2_elvis_gld.pt",
                                binarised=layout == "binarised")
    result = elvis("rerank", *RELEASE_RERANK, "--checkpoint", "dinov2_elvis_gld",
                   "--shortlist", "100", "-o", "out.csv", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(queries=queries, gallery=gallery, similarities=similarities,
                           model=model, table=pd.read_csv(cwd / "out.csv"))


@pytest.mark.subprocess
def test_rerank_on_a_release_names_each_rows_images(release_reranked):
    table = release_reranked.table
    assert len(table) == NN.size
    assert list(table["query_path"]) == [QUERIES[q] for q in table["query_index"]]
    assert list(table["gallery_path"]) == [GALLERY[g] for g in table["gallery_index"]]


@pytest.mark.subprocess
def test_rerank_on_a_release_raw_scores_are_the_models(release_reranked):
    run = release_reranked
    assert len(run.table) == NN.size
    for row in run.table.itertuples():
        expected = raw_score(run.model, run.queries[row.query_index],
                             run.gallery[row.gallery_index])
        assert row.raw_score == pytest.approx(expected, rel=1e-4)  # sums of ~1000 float32 terms


@pytest.mark.subprocess
def test_rerank_on_a_release_orders_by_the_fused_score(release_reranked):
    run = release_reranked
    order = expected_rerank(run.model, run.queries, run.gallery,
                            list(zip(NN, run.similarities, strict=True)), 100)
    np.testing.assert_array_equal(run.table["gallery_index"].to_numpy().reshape(NN.shape), order)


@pytest.mark.subprocess
def test_rerank_on_a_release_keeps_the_nn_files_global_scores(release_reranked):
    run = release_reranked
    global_of = [dict(zip(NN[q], run.similarities[q], strict=True)) for q in range(2)]
    order = run.table["gallery_index"].to_numpy().reshape(NN.shape)
    np.testing.assert_allclose(run.table["global_score"].to_numpy().reshape(NN.shape),
                               [[global_of[q][g] for g in order[q]] for q in range(2)], rtol=1e-6)


@pytest.fixture(scope="module")
def num_local_runs(tmp_path_factory):
    """The same rerank with the default number of descriptors and with --use-local 700."""
    cwd = tmp_path_factory.mktemp("num_local")
    queries, gallery, _ = make_release(cwd)
    model = official_checkpoint(cwd / "ckpt.pt")
    common = (*RELEASE_RERANK, "--checkpoint", "ckpt.pt", "--shortlist", "1")
    assert cli_in("rerank", *common, "-o", "a.csv", cwd=cwd).returncode == 0
    assert cli_in("rerank", *common, "--use-local", "700", "-o", "b.csv", cwd=cwd).returncode == 0
    return SimpleNamespace(queries=queries, gallery=gallery, model=model,
                           default=pd.read_csv(cwd / "a.csv").iloc[0],
                           all_rows=pd.read_csv(cwd / "b.csv").iloc[0])


@pytest.mark.subprocess
def test_the_first_600_of_700_descriptors_are_used_by_default(num_local_runs):
    run = num_local_runs
    assert run.default.raw_score == pytest.approx(
        raw_score(run.model, run.queries[0], run.gallery[3]), rel=1e-4)


@pytest.mark.subprocess
def test_num_local_700_uses_every_stored_descriptor(num_local_runs):
    run = num_local_runs
    src = torch.from_numpy(run.queries[None, 0, :, 5:])
    tgt = torch.from_numpy(run.gallery[None, 3, :, 5:])
    with torch.no_grad():
        assert run.all_rows.raw_score == pytest.approx(float(run.model(src, tgt)), rel=1e-4)


@pytest.mark.subprocess
def test_the_last_100_descriptors_change_the_score(num_local_runs):
    """Else the two tests above could not tell 600 from 700."""
    assert abs(num_local_runs.default.raw_score - num_local_runs.all_rows.raw_score) > 1.0


@pytest.fixture(scope="module", params=[("float16", 2), ("binarised", 3)],
                ids=["float16", "binarised"])
def release_evaluated(request, tmp_path_factory):
    """`elvis evaluate` of a release twice: filling the embedding cache, then from it."""
    layout, nn_rows = request.param
    cwd = tmp_path_factory.mktemp("evaluate")
    queries, gallery, similarities = make_release(cwd / "data", layout, nn_rows)
    model = official_checkpoint(cwd / "ckpt.pt", binarised=layout == "binarised")

    def evaluate(json_name: str):
        result = cli_in("evaluate", "--data-root", cwd / "data", "--dataset", "roxford5k",
                       "--descriptors", "dinov2", "--checkpoint", "ckpt.pt",
                       "--shortlist", "0", "100", "400", "--json", json_name, "--quiet",
                       "--embedding-cache", "kept", cwd=cwd)
        assert result.returncode == 0, result.stderr
        rows = json.loads((cwd / json_name).read_text())
        return result, [{k: v for k, v in row.items() if k != "seconds_per_query"}
                        for row in rows]

    _, filling = evaluate("filling.json")
    result, rows = evaluate("res.json")  # every image's embedding from the cache
    return SimpleNamespace(queries=queries, gallery=gallery, similarities=similarities,
                           model=model, filling=filling, result=result, rows=rows)


@pytest.mark.subprocess
def test_evaluate_from_the_embedding_cache_gives_the_same_rows(release_evaluated):
    assert release_evaluated.rows == release_evaluated.filling


@pytest.mark.subprocess
def test_evaluate_on_a_release_has_a_row_per_shortlist_size(release_evaluated):
    assert [row["shortlist"] for row in release_evaluated.rows] == [0, 100, 400]


@pytest.mark.subprocess
def test_evaluate_on_a_release_global_row_is_the_hand_computed_map(release_evaluated):
    for key, value in GLOBAL_MAP.items():
        assert release_evaluated.rows[0][key] == pytest.approx(value), key


@pytest.mark.subprocess
def test_evaluate_on_a_release_prints_the_hand_computed_map(release_evaluated):
    table = [[cell.strip() for cell in line.split("│")[1:-1]]
             for line in release_evaluated.result.stdout.splitlines() if line.startswith("│")]
    by_name = {row[0]: row for row in table}
    assert by_name["roxford5k"][2] == "37.50"  # global column: mean of Medium and Hard
    assert by_name["roxford5k medium"][2] == "41.67"
    assert by_name["roxford5k hard"][2] == "33.33"


@pytest.mark.subprocess
def test_evaluate_on_a_release_reranked_map_is_the_models(release_evaluated):
    run = release_evaluated
    expected = {}
    for protocol, junk_keys in (("medium", ("junk",)), ("hard", ("junk", "easy"))):
        lists = []
        for q, entry in enumerate(GND):
            junk = [g for key in junk_keys for g in entry[key]]
            keep = [k for k, g in enumerate(NN[q]) if g not in junk]
            moved = keep + [k for k in range(NN.shape[1]) if k not in keep]
            lists.append((NN[q][moved], run.similarities[q][moved]))
        ranking = expected_rerank(run.model, run.queries, run.gallery, lists, 100)
        expected[protocol] = revisitop_map(ranking, GND, protocol)["map"]
    assert len(run.rows) == 3
    for row in run.rows[1:]:
        assert row["map_medium"] == pytest.approx(expected["medium"], abs=1e-6)
        assert row["map_hard"] == pytest.approx(expected["hard"], abs=1e-6)


@pytest.fixture(scope="module")
def reference_rerank(tmp_path_factory):
    """The library's rerank over released stores (float32 chunks, a 3-row nn file)."""
    folder = tmp_path_factory.mktemp("reference")
    queries, gallery, _ = make_release(folder, "float32-chunks", 3)
    model = official_checkpoint(folder / "ckpt.pt", seed=4)
    query_store, gallery_store, ranking = open_released(folder / "roxford5k", "dinov2", 7)
    with query_store, gallery_store:
        result = rerank(ElvisReranker(model), query_store, gallery_store, ranking,
                        RerankConfig(shortlist=2, num_local=40, batch_size=1))
    return SimpleNamespace(queries=queries, gallery=gallery, model=model, result=result)


def test_released_stores_match_the_reference_through_rerank(reference_rerank):
    """The production path (stores, engine, model) against the plain ELVIS_SPEC §1 reference."""
    run = reference_rerank
    state = run.model.state_dict()
    for q in range(2):
        for k in range(2):
            g = run.result.indices[q, k]
            src, tgt = run.queries[q, :40], run.gallery[g, :40]
            expected = reference_score(state, torch.from_numpy(src[:, 5:]),
                                       torch.from_numpy(tgt[:, 5:]),
                                       torch.from_numpy(src[:, 3] > 0.5),
                                       torch.from_numpy(tgt[:, 3] > 0.5))
            assert run.result.raw_scores[q, k] == pytest.approx(expected, abs=1e-4)


def test_pairs_past_the_shortlist_get_no_raw_score(reference_rerank):
    assert np.isnan(reference_rerank.result.raw_scores[:, 2:]).all()


# --- failure modes: one line on stderr, exit code 1 ----------------------------------------------


def rerank_release(tmp_path, checkpoint="ckpt.pt"):
    return cli_in("rerank", *RELEASE_RERANK, "--checkpoint", checkpoint,
                 "--shortlist", "3", "-o", "out.csv", cwd=tmp_path)


class _Exploit:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.subprocess
def test_malicious_nn_pickle_is_refused_and_never_run(tmp_path):
    make_release(tmp_path)
    official_checkpoint(tmp_path / "ckpt.pt")
    _Exploit.marker = str(tmp_path / "pwned")
    with open(tmp_path / "roxford5k" / "nn_dinov2.pkl", "wb") as handle:
        pickle.dump(_Exploit(), handle)
    one_line_error(rerank_release(tmp_path), "refusing to load", "posix.system")
    assert not (tmp_path / "pwned").exists()



def wide_checkpoint(path):
    official_checkpoint(path, dim=32)


def checkpoint_with_wrong_keys(path):
    state = Elvis(ElvisConfig(descriptor_dim=DIM)).state_dict()
    state.pop("f.3.bias")
    state["f.9.weight"] = torch.zeros(1)
    torch.save({"state": state}, path)


def checkpoint_not_in_the_official_format(path):
    torch.save({"weights": Elvis(ElvisConfig(descriptor_dim=DIM)).state_dict()}, path)


@pytest.mark.subprocess
@pytest.mark.parametrize(("write_checkpoint", "fragments"), [
    (wide_checkpoint, ("expects 32-d", "16-d")),
    (checkpoint_with_wrong_keys, ("missing f.3.bias", "unexpected f.9")),
    (checkpoint_not_in_the_official_format, ("not in the official format",)),
], ids=["wrong-width", "wrong-keys", "not-official"])
def test_a_bad_checkpoint_is_a_one_line_error(tmp_path, write_checkpoint, fragments):
    make_release(tmp_path)
    write_checkpoint(tmp_path / "bad.pt")
    one_line_error(rerank_release(tmp_path, "bad.pt"), *fragments)


def missing_chunk(folder):
    (folder / "dinov2_gallery_local_1.hdf5").unlink()


def two_dimensional_features(folder):
    with h5py.File(folder / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("features", data=np.zeros((7, 21), dtype=np.float16))


def a_table_without_descriptors(folder):
    with h5py.File(folder / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("features", data=np.zeros(7, dtype=[("metadata", "f2", (4, 5))]))


def no_features_dataset(folder):
    with h5py.File(folder / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("descriptors", data=np.zeros((7, 4, 21)))


@pytest.mark.subprocess
@pytest.mark.parametrize(("damage", "fragments"), [
    (missing_chunk, ("missing shard", "dinov2_gallery_local_1.hdf5")),
    (two_dimensional_features, ("'features' has shape (7, 21)",)),
    (a_table_without_descriptors, ("need fields metadata and descriptor",)),
    (no_features_dataset, ("no 'features' dataset",)),
], ids=["missing-chunk", "2d-features", "no-descriptor-field", "no-features"])
def test_a_wrong_hdf5_layout_is_a_one_line_error(tmp_path, damage, fragments):
    make_release(tmp_path, "float32-chunks")
    official_checkpoint(tmp_path / "ckpt.pt")
    damage(tmp_path / "roxford5k")
    one_line_error(rerank_release(tmp_path), *fragments)


def evaluate_release(tmp_path, *args):
    return cli_in("evaluate", "--data-root", tmp_path / "data", "--dataset", "roxford5k",
                 "--checkpoint", "ckpt.pt", "--shortlist", "0", "--quiet", *args, cwd=tmp_path)


@pytest.mark.subprocess
def test_a_third_nn_row_that_is_not_the_first_appearance_mapping_is_refused(tmp_path):
    make_release(tmp_path / "data", "float16", 3)
    official_checkpoint(tmp_path / "ckpt.pt")
    nn_file = tmp_path / "data" / "roxford5k" / "nn_dinov2.pkl"
    table = pickle.loads(nn_file.read_bytes())
    table[2, 0, 0] = 99  # a row the shortlisted-only gallery file does not have
    nn_file.write_bytes(pickle.dumps(table))
    one_line_error(evaluate_release(tmp_path, "--descriptors", "dinov2"),
                   "third row is not the first-appearance mapping of the top 3",
                   "query 0, rank 0: 99, expected 0")


@pytest.mark.subprocess
def test_descriptors_the_release_lacks_are_named_with_their_file(tmp_path):
    make_release(tmp_path / "data", "float16", 3)
    official_checkpoint(tmp_path / "ckpt.pt")
    one_line_error(evaluate_release(tmp_path, "--descriptors", "siglip2"),
                   "lacks the released 'siglip2' files", "nn_siglip2.pkl")


# --- 3-row nn files whose lists are longer than the extracted head (ELVIS_SPEC §4) -------------


@pytest.fixture
def short_head(tmp_path):
    """K = 6 > h = 2: the gallery file holds the 4 images of the queries' top 2 (3, 0, 1, 2 in
    rank-major first appearance); later entries keep their own index, which may collide with
    a file row (image 1 -> row 1 holds image 0) and must never be read from it."""
    queries, gallery, _ = make_release(tmp_path, "float32-chunks", 3, head=2)
    model = official_checkpoint(tmp_path / "ckpt.pt", seed=2)
    query_store, gallery_store, ranking = open_released(tmp_path / "roxford5k", "dinov2", 7)
    with query_store, gallery_store:
        yield SimpleNamespace(queries=queries, gallery=gallery, model=model,
                              query_store=query_store, gallery_store=gallery_store,
                              ranking=ranking)


def test_a_head_shorter_than_the_lists_is_rebuilt(short_head):
    run = short_head
    assert run.gallery_store.head == 2
    # a release without names: gallery images are named by index, never by their file row
    assert run.gallery_store.paths == [str(index) for index in range(7)]
    result = rerank(ElvisReranker(run.model), run.query_store, run.gallery_store, run.ranking,
                    RerankConfig(shortlist=2, num_local=30, batch_size=1))
    for q in range(2):
        for k in range(2):
            g = result.indices[q, k]
            assert result.raw_scores[q, k] == pytest.approx(
                raw_score(run.model, run.queries[q, :30], run.gallery[g, :30]), rel=1e-4)


def test_a_shortlist_past_the_head_is_refused_never_read(short_head):
    run = short_head
    with pytest.raises(InputError, match=r"gallery image 4 has no descriptors in "
                                         r"dinov2_gallery_local\.hdf5, .* top 2 .*"
                                         r"re-rank at most 2"):
        rerank(ElvisReranker(run.model), run.query_store, run.gallery_store, run.ranking,
               RerankConfig(shortlist=3, num_local=30))


def evaluate_short_head(tmp_path, *args):
    make_release(tmp_path / "data", "float16", 3, head=2)
    official_checkpoint(tmp_path / "ckpt.pt")
    return cli_in("evaluate", "--data-root", tmp_path / "data", "--dataset", "roxford5k",
                 "--descriptors", "dinov2", "--checkpoint", "ckpt.pt", "--quiet", *args,
                 cwd=tmp_path)


@pytest.mark.subprocess
def test_evaluate_reranks_within_a_head_shorter_than_the_lists(tmp_path):
    result = evaluate_short_head(tmp_path, "--shortlist", "0", "2", "--json", "res.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "res.json").read_text())
    assert rows[0]["map"] == pytest.approx(GLOBAL_MAP["map"]) and rows[1]["shortlist"] == 2


@pytest.mark.subprocess
def test_evaluate_past_the_head_is_one_line_and_no_number(tmp_path):
    one_line_error(evaluate_short_head(tmp_path, "--shortlist", "4"),
                   "has no descriptors in dinov2_gallery_local.hdf5", "re-rank at most 2")


# --- binarised files need the binarised model ---------------------------------------------------


def test_binarised_bits_unpack_big_endian_to_signs(tmp_path):
    """numpy's default bit order, as the authors' np.unpackbits: the first bit is the MSB."""
    dtype = np.dtype([("metadata", np.float16, (1, 5)), ("descriptor", np.uint8, (1, 16))])
    table = np.zeros(1, dtype=dtype)
    table["descriptor"][0, 0, 0] = 0b10000001
    with h5py.File(tmp_path / "bits.hdf5", "w") as file:
        file.create_dataset("features", data=table)
    with open_local(tmp_path / "bits.hdf5") as store:
        assert store.binarised and store.local_dim == 128
        signs = store.read_local([0])[0, 0, 5:]
    assert signs[:8].tolist() == [1, -1, -1, -1, -1, -1, -1, 1]
    assert (signs[8:] == -1).all()


@pytest.mark.subprocess
def test_binarised_files_with_a_float_checkpoint_are_a_one_line_error(tmp_path):
    make_release(tmp_path, "binarised", 3)
    official_checkpoint(tmp_path / "ckpt.pt", dim=128)
    one_line_error(rerank_release(tmp_path), "the features are binarised (128 bits)",
                   "use a binarised checkpoint")


@pytest.mark.subprocess
def test_float_files_run_through_the_binarised_models_itq_step(tmp_path):
    """Float descriptors with a binarised checkpoint: ITQ bits first (the reference's form)."""
    queries, gallery, _ = make_release(tmp_path)
    model = official_checkpoint(tmp_path / "ckpt.pt", seed=5, binarised=True)
    assert rerank_release(tmp_path).returncode == 0
    table = pd.read_csv(tmp_path / "out.csv")
    state = model.state_dict()
    head = table[table["rank"] <= 3]  # ranks count from 1; --shortlist 3 re-ranks 3 a query
    assert len(head) == len(QUERIES) * 3 and head["raw_score"].notna().all()
    for row in head.itertuples():
        src, tgt = queries[row.query_index, :USED], gallery[row.gallery_index, :USED]
        expected = reference_score(state, *(torch.from_numpy(x[:, 5:]) for x in (src, tgt)),
                                   *(torch.from_numpy(x[:, 3] > 0.5) for x in (src, tgt)))
        assert row.raw_score == pytest.approx(expected, rel=1e-4)


# --- +1M sets: their own folder, nn and gnd files (ELVIS_SPEC §4) --------------------------------

# the +1M nn file ranks the whole joined gallery: 7 base images, then 3 distractors (7, 8, 9)
NN_1M = np.array([[8, 3, 7, 1, 4, 0, 9, 5, 2, 6], [9, 7, 0, 2, 5, 1, 3, 4, 8, 6]])


def make_1m_release(data_root, seed=1):
    """roxford5k+1m/ as the authors' merge_hdf5.py and prepare_topk_global.py leave it: its
    gallery file joins ../roxford5k's gallery and ../revisitop1m's file by virtual datasets.
    Returns the joined gallery's rows."""
    rng = np.random.default_rng(seed)
    distractors = descriptors(rng, 3, False)
    (data_root / "revisitop1m").mkdir()
    write_local(data_root / "revisitop1m" / "dinov2_local.hdf5", distractors, "float16")
    folder = data_root / "roxford5k+1m"
    folder.mkdir()
    width = 5 + DIM
    layout = h5py.VirtualLayout(shape=(10, STORED, width), dtype=np.float16)
    layout[:7] = h5py.VirtualSource("../roxford5k/dinov2_gallery_local.hdf5", "features",
                                    shape=(7, STORED, width))
    layout[7:] = h5py.VirtualSource("../revisitop1m/dinov2_local.hdf5", "features",
                                    shape=(3, STORED, width))
    with h5py.File(folder / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_virtual_dataset("features", layout)
    with h5py.File(data_root / "roxford5k" / "dinov2_query_local.hdf5") as base, \
            h5py.File(folder / "dinov2_query_local.hdf5", "w") as own:
        own.create_dataset("features", data=base["features"][()])
    write_nn(folder / "nn_dinov2.pkl", np.sort(rng.random(NN_1M.shape))[:, ::-1], NN_1M)
    with open(folder / "gnd_roxford5k+1m.pkl", "wb") as handle:
        pickle.dump({"imlist": GALLERY, "qimlist": QUERIES, "gnd": GND}, handle)
    return stored(distractors, "float16")



@pytest.fixture(scope="module")
def with_1m(tmp_path_factory):
    """roxford5k and roxford5k+1m side by side, each evaluated with global descriptors."""
    cwd = tmp_path_factory.mktemp("plus_1m")
    make_release(cwd / "data")
    make_1m_release(cwd / "data")
    result = cli_in("evaluate", "--data-root", cwd / "data", "--dataset", "roxford5k",
                   "--dataset", "roxford5k+1m", "--descriptors", "dinov2", "--model", "global",
                   "--shortlist", "0", "--json", "res.json", "--quiet", cwd=cwd)
    assert result.returncode == 0, result.stderr
    rows = {row["dataset"]: row for row in json.loads((cwd / "res.json").read_text())}
    return SimpleNamespace(cwd=cwd, rows=rows)


@pytest.mark.subprocess
def test_the_base_row_beside_a_1m_row_is_the_base_folders_number(with_1m):
    assert with_1m.rows["roxford5k"]["map"] == pytest.approx(GLOBAL_MAP["map"])


@pytest.mark.subprocess
def test_a_1m_row_reports_the_1m_folders_number(with_1m):
    """Different rankings in the two folders: each row's number is its own folder's."""
    row = with_1m.rows["roxford5k+1m"]
    assert row["map_medium"] == pytest.approx(revisitop_map(NN_1M, GND, "medium")["map"])
    assert row["map_hard"] == pytest.approx(revisitop_map(NN_1M, GND, "hard")["map"])
    assert abs(row["map"] - GLOBAL_MAP["map"]) > 1.0  # the base number would be told apart


def test_a_1m_gallery_reads_base_rows_then_the_distractors(tmp_path):
    _, gallery, _ = make_release(tmp_path / "data")
    distractors = make_1m_release(tmp_path / "data")
    queries, joined, ranking = open_released(tmp_path / "data" / "roxford5k+1m", "dinov2")
    with queries, joined:
        np.testing.assert_array_equal(ranking.indices, NN_1M)
        rows = joined.read_local([2, 8], 40)
        np.testing.assert_array_equal(rows[0], stored(gallery, "float16")[2, :40])
        np.testing.assert_array_equal(rows[1], distractors[1, :40])


def evaluate_global(tmp_path, dataset):
    return cli_in("evaluate", "--data-root", tmp_path / "data", "--descriptors", "dinov2",
                 "--model", "global", "--shortlist", "0", "--quiet", "--dataset", dataset,
                 cwd=tmp_path)


@pytest.mark.subprocess
def test_a_1m_set_without_its_folder_never_reads_the_base_folders_files(tmp_path):
    make_release(tmp_path / "data")
    one_line_error(evaluate_global(tmp_path, "roxford5k+1m"),
                   "roxford5k+1m needs its own folder", "gnd_roxford5k+1m.pkl")


@pytest.mark.subprocess
def test_a_1m_set_with_only_the_distractor_list_says_its_folder_is_missing(tmp_path):
    make_release(tmp_path / "data")
    (tmp_path / "data" / "revisitop1m").mkdir()  # the image route's distractor list
    (tmp_path / "data" / "revisitop1m" / "revisitop1m.txt").write_text("d1\nd2\n")
    one_line_error(evaluate_global(tmp_path, "roxford5k+1m"),
                   "no folder", "roxford5k+1m: the released files of roxford5k+1m")


@pytest.mark.subprocess
def test_the_old_r1m_name_says_the_new_one(tmp_path):
    make_release(tmp_path / "data")
    one_line_error(evaluate_global(tmp_path, "roxford5k+r1m"),
                   "'roxford5k+r1m' is now called 'roxford5k+1m'")


def write_globals(folder, split, kind, count, seed):
    """The authors' `dinov2_<split>_<kind>.hdf5`: (N, D) float16, rows L2-normalised."""
    values = np.random.default_rng(seed).standard_normal((count, 8))
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    with h5py.File(folder / f"dinov2_{split}_{kind}.hdf5", "w") as file:
        file.create_dataset("features", data=values.astype(np.float16))
    return values.astype(np.float16).astype(np.float32)



@pytest.fixture
def with_globals(tmp_path):
    """A release with cls and w-avg global files of its own beside the local files."""
    make_release(tmp_path)
    folder = tmp_path / "roxford5k"
    cls = [write_globals(folder, split, "cls", n, seed)
           for split, n, seed in (("query", 2, 1), ("gallery", len(GALLERY), 2))]
    pooled = [write_globals(folder, split, "w-avg", n, seed)
              for split, n, seed in (("query", 2, 3), ("gallery", len(GALLERY), 4))]
    pair = ["--queries", folder / "dinov2_query_local.hdf5",
            "--gallery", folder / "dinov2_gallery_local.hdf5", "-k", "3"]
    return SimpleNamespace(folder=folder, globals={"cls": cls, "w-avg": pooled}, pair=pair)


def test_official_global_files_beside_a_release_are_read(with_globals):
    cls, pooled = with_globals.globals["cls"], with_globals.globals["w-avg"]
    with open_local(with_globals.folder / "dinov2_query_local.hdf5") as store:
        assert store.global_types == ["cls", "w-avg"] and store.global_dim == 8
        np.testing.assert_array_equal(store.global_descriptors(), cls[0])
        np.testing.assert_array_equal(store.global_descriptors("w-avg"), pooled[0])


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["cls", "w-avg"])
def test_a_release_shortlist_uses_the_global_type_asked_for(with_globals, tmp_path, kind):
    result = cli_in("shortlist", *with_globals.pair, "--global-type", kind, "-o", "out.npz",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    queries, gallery = with_globals.globals[kind]
    with np.load(tmp_path / "out.npz") as saved:
        expected = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :3]
        np.testing.assert_array_equal(saved["indices"], expected)


@pytest.mark.subprocess
def test_a_global_type_without_its_files_is_a_one_line_error(with_globals, tmp_path):
    one_line_error(cli_in("shortlist", *with_globals.pair, "--global-type", "og-avg",
                         cwd=tmp_path), "has no 'og-avg' global descriptors")


@pytest.mark.subprocess
def test_a_global_file_of_the_wrong_length_is_a_one_line_error(with_globals, tmp_path):
    write_globals(with_globals.folder, "query", "og-avg", 2, 5)
    write_globals(with_globals.folder, "gallery", "og-avg", 3, 6)  # fewer rows than images
    one_line_error(cli_in("shortlist", *with_globals.pair, "--global-type", "og-avg",
                         cwd=tmp_path), "3 og-avg global descriptors for the 7 images")
