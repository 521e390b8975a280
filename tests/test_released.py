"""The authors' release layout (ELVIS_SPEC §4) through the real `elvis` command: a fixture folder
with random descriptors and a random-weight checkpoint in the official format."""

import json
import os
import pickle

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
from tests.reference_elvis import reference_score
from tests.test_cli import elvis

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


@pytest.mark.parametrize("layout,nn_rows", [("float16", 2), ("float32-chunks", 3),
                                            ("binarised", 3)])
def test_rerank_command_on_a_release(tmp_path, layout, nn_rows):
    queries, gallery, similarities = make_release(tmp_path, layout, nn_rows)
    model = official_checkpoint(tmp_path / "cache" / "checkpoints" / "dinov2_elvis_gld.pt",
                                binarised=layout == "binarised")
    result = elvis("rerank", "--queries", "roxford5k/dinov2_query_local.hdf5",
                   "--gallery", "roxford5k/dinov2_gallery_local.hdf5",
                   "--candidates", "roxford5k/nn_dinov2.pkl", "--checkpoint", "dinov2_elvis_gld",
                   "--shortlist", "100", "-o", "out.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out.csv")
    assert len(table) == NN.size
    for row in table.itertuples():
        assert row.query_path == QUERIES[row.query_index]
        assert row.gallery_path == GALLERY[row.gallery_index]
        expected = raw_score(model, queries[row.query_index], gallery[row.gallery_index])
        assert row.raw_score == pytest.approx(expected, rel=1e-4)  # sums of ~1000 float32 terms
    order = expected_rerank(model, queries, gallery, list(zip(NN, similarities, strict=True)),
                            100)
    np.testing.assert_array_equal(table["gallery_index"].to_numpy().reshape(NN.shape), order)
    global_of = [dict(zip(NN[q], similarities[q], strict=True)) for q in range(2)]
    np.testing.assert_allclose(table["global_score"].to_numpy().reshape(NN.shape),
                               [[global_of[q][g] for g in order[q]] for q in range(2)], rtol=1e-6)


def test_the_first_600_of_700_descriptors_are_used_by_default(tmp_path):
    queries, gallery, _ = make_release(tmp_path)
    model = official_checkpoint(tmp_path / "ckpt.pt")
    common = ("--queries", "roxford5k/dinov2_query_local.hdf5", "--gallery",
              "roxford5k/dinov2_gallery_local.hdf5", "--candidates", "roxford5k/nn_dinov2.pkl",
              "--checkpoint", "ckpt.pt", "--shortlist", "1")
    assert elvis("rerank", *common, "-o", "a.csv", cwd=tmp_path).returncode == 0
    assert elvis("rerank", *common, "--num-local", "700", "-o", "b.csv",
                 cwd=tmp_path).returncode == 0
    first = pd.read_csv(tmp_path / "a.csv").iloc[0]
    all_rows = pd.read_csv(tmp_path / "b.csv").iloc[0]
    assert first.raw_score == pytest.approx(raw_score(model, queries[0], gallery[3]), rel=1e-4)
    src, tgt = torch.from_numpy(queries[None, 0, :, 5:]), torch.from_numpy(gallery[None, 3, :, 5:])
    with torch.no_grad():
        assert all_rows.raw_score == pytest.approx(float(model(src, tgt)), rel=1e-4)
    assert abs(first.raw_score - all_rows.raw_score) > 1.0


@pytest.mark.parametrize("layout,nn_rows", [("float16", 2), ("binarised", 3)])
def test_evaluate_command_on_a_release_prints_the_hand_computed_map(tmp_path, layout, nn_rows):
    queries, gallery, similarities = make_release(tmp_path / "data", layout, nn_rows)
    model = official_checkpoint(tmp_path / "ckpt.pt", binarised=layout == "binarised")
    def evaluate(json_name: str):
        result = elvis("evaluate", "--data-root", tmp_path / "data", "--dataset", "roxford5k",
                       "--descriptors", "dinov2", "--checkpoint", "ckpt.pt",
                       "--shortlist", "0", "100", "400", "--json", json_name, "--quiet",
                       "--embedding-cache", "kept", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        rows = json.loads((tmp_path / json_name).read_text())
        return result, [{k: v for k, v in row.items() if k != "seconds_per_query"}
                        for row in rows]

    _, filling = evaluate("filling.json")
    result, rows = evaluate("res.json")  # every image's embedding from the cache
    assert rows == filling
    assert [row["shortlist"] for row in rows] == [0, 100, 400]
    for key, value in GLOBAL_MAP.items():
        assert rows[0][key] == pytest.approx(value)
    table = [[cell.strip() for cell in line.split("│")[1:-1]]
             for line in result.stdout.splitlines() if line.startswith("│")]
    by_name = {row[0]: row for row in table}
    assert by_name["roxford5k"][2] == "37.50"  # global column: mean of Medium and Hard
    assert by_name["roxford5k medium"][2] == "41.67"
    assert by_name["roxford5k hard"][2] == "33.33"
    expected = {}
    for protocol, junk_keys in (("medium", ("junk",)), ("hard", ("junk", "easy"))):
        lists = []
        for q, entry in enumerate(GND):
            junk = [g for key in junk_keys for g in entry[key]]
            keep = [k for k, g in enumerate(NN[q]) if g not in junk]
            moved = keep + [k for k in range(NN.shape[1]) if k not in keep]
            lists.append((NN[q][moved], similarities[q][moved]))
        ranking = expected_rerank(model, queries, gallery, lists, 100)
        expected[protocol] = revisitop_map(ranking, GND, protocol)["map"]
    for row in rows[1:]:
        assert row["map_medium"] == pytest.approx(expected["medium"], abs=1e-6)
        assert row["map_hard"] == pytest.approx(expected["hard"], abs=1e-6)


def test_released_stores_match_the_reference_through_rerank(tmp_path):
    """The production path (stores, engine, model) against the plain ELVIS_SPEC §1 reference."""
    queries, gallery, _ = make_release(tmp_path, "float32-chunks", 3)
    model = official_checkpoint(tmp_path / "ckpt.pt", seed=4)
    query_store, gallery_store, ranking = open_released(tmp_path / "roxford5k", "dinov2", 7)
    with query_store, gallery_store:
        result = rerank(ElvisReranker(model), query_store, gallery_store, ranking,
                        RerankConfig(shortlist=2, num_local=40, batch_size=1))
    state = model.state_dict()
    for q in range(2):
        for k in range(2):
            g = result.indices[q, k]
            src, tgt = queries[q, :40], gallery[g, :40]
            expected = reference_score(state, torch.from_numpy(src[:, 5:]),
                                       torch.from_numpy(tgt[:, 5:]),
                                       torch.from_numpy(src[:, 3] > 0.5),
                                       torch.from_numpy(tgt[:, 3] > 0.5))
            assert result.raw_scores[q, k] == pytest.approx(expected, abs=1e-4)
    assert np.isnan(result.raw_scores[:, 2:]).all()


# --- failure modes: one line on stderr, exit code 1 ----------------------------------------------


def one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("elvis: error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def rerank_release(tmp_path, checkpoint="ckpt.pt"):
    return elvis("rerank", "--queries", "roxford5k/dinov2_query_local.hdf5",
                 "--gallery", "roxford5k/dinov2_gallery_local.hdf5",
                 "--candidates", "roxford5k/nn_dinov2.pkl", "--checkpoint", checkpoint,
                 "--shortlist", "3", "-o", "out.csv", cwd=tmp_path)


class _Exploit:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_nn_pickle_is_refused_and_never_run(tmp_path):
    make_release(tmp_path)
    official_checkpoint(tmp_path / "ckpt.pt")
    _Exploit.marker = str(tmp_path / "pwned")
    with open(tmp_path / "roxford5k" / "nn_dinov2.pkl", "wb") as handle:
        pickle.dump(_Exploit(), handle)
    one_line_error(rerank_release(tmp_path), "refusing to load", "posix.system")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow  # several CLI processes
def test_bad_checkpoints_are_one_line_errors(tmp_path):
    make_release(tmp_path)
    official_checkpoint(tmp_path / "wide.pt", dim=32)
    one_line_error(rerank_release(tmp_path, "wide.pt"), "expects 32-d", "16-d")
    state = Elvis(ElvisConfig(descriptor_dim=DIM)).state_dict()
    state.pop("f.3.bias")
    state["f.9.weight"] = torch.zeros(1)
    torch.save({"state": state}, tmp_path / "keys.pt")
    one_line_error(rerank_release(tmp_path, "keys.pt"), "missing f.3.bias", "unexpected f.9")
    torch.save({"weights": state}, tmp_path / "plain.pt")
    one_line_error(rerank_release(tmp_path, "plain.pt"), "not in the official format")


@pytest.mark.slow  # several CLI processes
def test_wrong_hdf5_layouts_are_one_line_errors(tmp_path):
    make_release(tmp_path, "float32-chunks")
    official_checkpoint(tmp_path / "ckpt.pt")
    folder = tmp_path / "roxford5k"
    (folder / "dinov2_gallery_local_1.hdf5").unlink()
    one_line_error(rerank_release(tmp_path), "missing shard", "dinov2_gallery_local_1.hdf5")
    with h5py.File(folder / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("features", data=np.zeros((7, 21), dtype=np.float16))
    one_line_error(rerank_release(tmp_path), "'features' has shape (7, 21)")
    with h5py.File(folder / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("features", data=np.zeros(7, dtype=[("metadata", "f2", (4, 5))]))
    one_line_error(rerank_release(tmp_path), "need fields metadata and descriptor")
    with h5py.File(folder / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("descriptors", data=np.zeros((7, 4, 21)))
    one_line_error(rerank_release(tmp_path), "no 'features' dataset")


@pytest.mark.slow  # several CLI processes
def test_inconsistent_release_files_are_one_line_errors(tmp_path):
    make_release(tmp_path / "data", "float16", 3)
    official_checkpoint(tmp_path / "ckpt.pt")
    nn_file = tmp_path / "data" / "roxford5k" / "nn_dinov2.pkl"
    table = pickle.loads(nn_file.read_bytes())
    table[2, 0, 0] = 99  # a row the shortlisted-only gallery file does not have
    nn_file.write_bytes(pickle.dumps(table))
    evaluate = ("evaluate", "--data-root", tmp_path / "data", "--dataset", "roxford5k",
                "--checkpoint", "ckpt.pt", "--shortlist", "0", "--quiet")
    one_line_error(elvis(*evaluate, "--descriptors", "dinov2", cwd=tmp_path),
                   "third row is not the first-appearance mapping of the top 3",
                   "query 0, rank 0: 99, expected 0")
    one_line_error(elvis(*evaluate, "--descriptors", "siglip2", cwd=tmp_path),
                   "lacks the released 'siglip2' files", "nn_siglip2.pkl")


# --- 3-row nn files whose lists are longer than the extracted head (ELVIS_SPEC §4) -------------


def test_a_head_shorter_than_the_lists_is_rebuilt_and_never_read_past(tmp_path):
    """K = 6 > h = 2: the gallery file holds the 4 images of the queries' top 2 (3, 0, 1, 2 in
    rank-major first appearance); later entries keep their own index, which may collide with
    a file row (image 1 -> row 1 holds image 0) and must never be read from it."""
    queries, gallery, _ = make_release(tmp_path, "float32-chunks", 3, head=2)
    model = official_checkpoint(tmp_path / "ckpt.pt", seed=2)
    query_store, gallery_store, ranking = open_released(tmp_path / "roxford5k", "dinov2", 7)
    with query_store, gallery_store:
        assert gallery_store.head == 2
        result = rerank(ElvisReranker(model), query_store, gallery_store, ranking,
                        RerankConfig(shortlist=2, num_local=30, batch_size=1))
        for q in range(2):
            for k in range(2):
                g = result.indices[q, k]
                assert result.raw_scores[q, k] == pytest.approx(
                    raw_score(model, queries[q, :30], gallery[g, :30]), rel=1e-4)
        with pytest.raises(InputError, match=r"gallery image 4 has no descriptors in "
                                             r"dinov2_gallery_local\.hdf5, .* top 2 .*"
                                             r"re-rank at most 2"):
            rerank(ElvisReranker(model), query_store, gallery_store, ranking,
                   RerankConfig(shortlist=3, num_local=30))


def test_evaluate_with_a_head_shorter_than_the_lists(tmp_path):
    """Re-ranking within the head works end to end; past it, one line and no number."""
    make_release(tmp_path / "data", "float16", 3, head=2)
    official_checkpoint(tmp_path / "ckpt.pt")
    common = ("evaluate", "--data-root", tmp_path / "data", "--dataset", "roxford5k",
              "--descriptors", "dinov2", "--checkpoint", "ckpt.pt", "--quiet")
    result = elvis(*common, "--shortlist", "0", "2", "--json", "res.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "res.json").read_text())
    assert rows[0]["map"] == pytest.approx(GLOBAL_MAP["map"]) and rows[1]["shortlist"] == 2
    one_line_error(elvis(*common, "--shortlist", "4", cwd=tmp_path),
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


def test_binarised_files_with_a_float_checkpoint_are_a_one_line_error(tmp_path):
    make_release(tmp_path, "binarised", 3)
    official_checkpoint(tmp_path / "ckpt.pt", dim=128)
    one_line_error(rerank_release(tmp_path), "the features are binarised (128 bits)",
                   "use a binarised checkpoint")


def test_float_files_run_through_the_binarised_models_itq_step(tmp_path):
    """Float descriptors with a binarised checkpoint: ITQ bits first (the reference's form)."""
    queries, gallery, _ = make_release(tmp_path)
    model = official_checkpoint(tmp_path / "ckpt.pt", seed=5, binarised=True)
    assert rerank_release(tmp_path).returncode == 0
    table = pd.read_csv(tmp_path / "out.csv")
    state = model.state_dict()
    for row in table[table["rank"] < 3].itertuples():
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


def test_a_1m_row_reports_the_1m_folders_number(tmp_path):
    """Both folders there, different rankings: each row's number is its own folder's."""
    _, gallery, _ = make_release(tmp_path / "data")
    distractors = make_1m_release(tmp_path / "data")
    result = elvis("evaluate", "--data-root", tmp_path / "data", "--dataset", "roxford5k",
                   "--dataset", "roxford5k+1m", "--descriptors", "dinov2", "--model", "global",
                   "--shortlist", "0", "--json", "res.json", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["dataset"]: row for row in json.loads((tmp_path / "res.json").read_text())}
    expected = {protocol: revisitop_map(NN_1M, GND, protocol)["map"]
                for protocol in ("medium", "hard")}
    assert rows["roxford5k"]["map"] == pytest.approx(GLOBAL_MAP["map"])
    assert rows["roxford5k+1m"]["map_medium"] == pytest.approx(expected["medium"])
    assert rows["roxford5k+1m"]["map_hard"] == pytest.approx(expected["hard"])
    assert abs(rows["roxford5k+1m"]["map"] - GLOBAL_MAP["map"]) > 1.0
    queries, joined, ranking = open_released(tmp_path / "data" / "roxford5k+1m", "dinov2")
    with queries, joined:  # the joined gallery reads base rows, then the distractors'
        np.testing.assert_array_equal(ranking.indices, NN_1M)
        rows = joined.read_local([2, 8], 40)
        np.testing.assert_array_equal(rows[0], stored(gallery, "float16")[2, :40])
        np.testing.assert_array_equal(rows[1], distractors[1, :40])


def test_a_1m_set_never_reads_the_base_folders_files(tmp_path):
    make_release(tmp_path / "data")
    common = ("evaluate", "--data-root", tmp_path / "data", "--descriptors", "dinov2",
              "--model", "global", "--shortlist", "0", "--quiet")
    one_line_error(elvis(*common, "--dataset", "roxford5k+1m", cwd=tmp_path),
                   "roxford5k+1m needs its own folder", "gnd_roxford5k+1m.pkl")
    (tmp_path / "data" / "revisitop1m").mkdir()  # the image route's distractor list
    (tmp_path / "data" / "revisitop1m" / "revisitop1m.txt").write_text("d1\nd2\n")
    one_line_error(elvis(*common, "--dataset", "roxford5k+1m", cwd=tmp_path),
                   "no folder", "roxford5k+1m: the released files of roxford5k+1m")
    one_line_error(elvis(*common, "--dataset", "roxford5k+r1m", cwd=tmp_path),
                   "'roxford5k+r1m' is now called 'roxford5k+1m'")


def write_globals(folder, split, kind, count, seed):
    """The authors' `dinov2_<split>_<kind>.hdf5`: (N, D) float16, rows L2-normalised."""
    values = np.random.default_rng(seed).standard_normal((count, 8))
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    with h5py.File(folder / f"dinov2_{split}_{kind}.hdf5", "w") as file:
        file.create_dataset("features", data=values.astype(np.float16))
    return values.astype(np.float16).astype(np.float32)


def test_official_global_files_beside_a_release_are_read(tmp_path):
    """Global descriptors of each type sit in files of their own beside the local files; a
    shortlist of the release is then built from them, by the type asked for."""
    make_release(tmp_path)
    folder = tmp_path / "roxford5k"
    cls = [write_globals(folder, split, "cls", n, seed)
           for split, n, seed in (("query", 2, 1), ("gallery", len(GALLERY), 2))]
    pooled = [write_globals(folder, split, "w-avg", n, seed)
              for split, n, seed in (("query", 2, 3), ("gallery", len(GALLERY), 4))]
    with open_local(folder / "dinov2_query_local.hdf5") as store:
        assert store.global_types == ["cls", "w-avg"] and store.global_dim == 8
        np.testing.assert_array_equal(store.global_descriptors(), cls[0])
        np.testing.assert_array_equal(store.global_descriptors("w-avg"), pooled[0])
    pair = ["--queries", folder / "dinov2_query_local.hdf5",
            "--gallery", folder / "dinov2_gallery_local.hdf5", "-k", "3"]
    for kind, (queries, gallery) in (("cls", cls), ("w-avg", pooled)):
        result = elvis("shortlist", *pair, "--global-type", kind, "-o", f"{kind}.npz",
                       cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        with np.load(tmp_path / f"{kind}.npz") as saved:
            expected = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :3]
            np.testing.assert_array_equal(saved["indices"], expected)
    one_line_error(elvis("shortlist", *pair, "--global-type", "og-avg", cwd=tmp_path),
                   "has no 'og-avg' global descriptors")
    write_globals(folder, "query", "og-avg", 2, 5)
    write_globals(folder, "gallery", "og-avg", 3, 6)  # fewer rows than the gallery has images
    one_line_error(elvis("shortlist", *pair, "--global-type", "og-avg", cwd=tmp_path),
                   "3 og-avg global descriptors for the 7 images")
