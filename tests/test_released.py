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

from elvis_cli.checkpoints import Fusion
from elvis_cli.metrics import revisitop_map
from elvis_cli.model import Elvis, ElvisConfig
from elvis_cli.released import open_released
from elvis_cli.rerank import RerankConfig, rerank
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


def descriptors(rng, count, binarised):
    """(count, 700, 5 + D) rows: metadata, then descriptors; some padding, some beyond 600."""
    if binarised:
        desc = np.where(rng.random((count, STORED, DIM)) < 0.5, -1.0, 1.0)
    else:
        desc = rng.standard_normal((count, STORED, DIM))
        desc /= np.linalg.norm(desc, axis=-1, keepdims=True)
    meta = np.zeros((count, STORED, 5))
    meta[..., :2] = rng.random((count, STORED, 2))
    meta[..., 4] = np.sort(rng.random((count, STORED)))[:, ::-1]
    meta[1, 300:, 3] = 1.0  # image 1: only 300 real rows; its padding holds junk values
    return np.concatenate([meta, desc], axis=-1)


def write_local(path, rows, layout):
    if layout == "binarised":
        bits = np.packbits(rows[..., 5:] > 0, axis=-1)
        dtype = np.dtype([("metadata", np.float16, (STORED, 5)),
                          ("descriptor", np.uint8, (STORED, DIM // 8))])
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


def make_release(root, layout="float16", nn_rows=2, seed=0):
    """<root>/roxford5k in the official layout; returns what a reader should get back (gallery
    rows by full-gallery index) and the global similarities of the nn file."""
    folder = root / "roxford5k"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    queries, gallery = descriptors(rng, 2, layout == "binarised"), descriptors(
        rng, len(GALLERY), layout == "binarised")
    similarities = np.sort(rng.random(NN.shape))[:, ::-1]
    table = [similarities, NN]
    gallery_file = gallery
    if nn_rows == 3:  # the gallery file holds only shortlisted images, in its own order
        held = np.array([5, 2, 0, 4, 1, 3])
        gallery_file = gallery[held]
        row_of = {int(image): row for row, image in enumerate(held)}
        table.append(np.vectorize(row_of.get)(NN))
    write_local(folder / "dinov2_query_local.hdf5", queries, layout)
    write_local(folder / "dinov2_gallery_local.hdf5", gallery_file, layout)
    with open(folder / "nn_dinov2.pkl", "wb") as handle:
        pickle.dump(torch.tensor(np.stack(table), dtype=torch.float32), handle)
    with open(folder / "gnd_roxford5k.pkl", "wb") as handle:
        pickle.dump({"imlist": GALLERY, "qimlist": QUERIES, "gnd": GND}, handle)
    return stored(queries, layout), stored(gallery, layout), similarities


def official_checkpoint(path, seed=0, dim=DIM):
    torch.manual_seed(seed)
    model = Elvis(ElvisConfig(descriptor_dim=dim)).eval()
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
    model = official_checkpoint(tmp_path / "cache" / "checkpoints" / "dinov2_elvis_gld.pt")
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
    model = official_checkpoint(tmp_path / "ckpt.pt")
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
        result = rerank(model, query_store, gallery_store, ranking, Fusion(),
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
                   "third row points at rows up to 99", "holds 6 images")
    one_line_error(elvis(*evaluate, "--descriptors", "siglip2", cwd=tmp_path),
                   "lacks the released 'siglip2' files", "nn_siglip2.pkl")
