"""Global shortlists with a real faiss index, checked against a brute-force numpy ranking."""

import pickle

import numpy as np
import pytest
import torch

from elvis_cli.retrieval.shortlist import build_shortlist, load_shortlist, save_shortlist
from elvis_cli.util.errors import InputError


def unit_rows(count, dim, seed):
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_matches_brute_force():
    queries, gallery = unit_rows(7, 16, 0), unit_rows(50, 16, 1)
    result = build_shortlist(queries, gallery, 10)
    expected = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
    np.testing.assert_array_equal(result.indices, expected)
    np.testing.assert_allclose(result.similarities,
                               np.take_along_axis(queries @ gallery.T, expected, 1), atol=1e-5)


def test_all_vs_all_excludes_self_and_clips_k():
    rows = unit_rows(6, 8, 2)
    result = build_shortlist(rows, rows, 100, exclude_self=True)
    assert result.indices.shape == (6, 5)
    for query, row in enumerate(result.indices):
        assert query not in row and len(set(row)) == 5


def test_exclude_self_with_duplicate_images():
    """A duplicate may outrank the query itself; the query's own row is still the one dropped."""
    rows = unit_rows(4, 8, 3)
    rows = np.concatenate([rows, rows[:1]])
    result = build_shortlist(rows, rows, 2, exclude_self=True)
    assert 0 not in result.indices[0] and result.indices[0][0] == 4


def test_round_trip_npz_and_official_pickle(tmp_path):
    result = build_shortlist(unit_rows(3, 8, 4), unit_rows(9, 8, 5), 4)
    save_shortlist(tmp_path / "s.npz", result)
    again = load_shortlist(tmp_path / "s.npz")
    np.testing.assert_array_equal(again.indices, result.indices)
    table = torch.stack([torch.from_numpy(result.similarities),
                         torch.from_numpy(result.indices).float()])
    with open(tmp_path / "nn_plain.pkl", "wb") as handle:
        pickle.dump(table, handle)
    official = load_shortlist(tmp_path / "nn_plain.pkl")
    np.testing.assert_array_equal(official.indices, result.indices)


@pytest.mark.parametrize("k", [0, -3])
def test_bad_k(k):
    with pytest.raises(InputError, match="positive"):
        build_shortlist(unit_rows(2, 4, 6), unit_rows(3, 4, 7), k)


def test_dimension_mismatch():
    with pytest.raises(InputError, match="differ in size: 4 vs 5"):
        build_shortlist(unit_rows(2, 4, 8), unit_rows(3, 5, 9), 2)


def test_official_pickle_with_a_third_row(tmp_path):
    table = torch.tensor([[[0.9, 0.5], [0.8, 0.1]], [[4, 2], [2, 9]], [[1, 0], [0, 2]]])
    with open(tmp_path / "nn_three.pkl", "wb") as handle:
        pickle.dump(table, handle)
    loaded = load_shortlist(tmp_path / "nn_three.pkl")
    np.testing.assert_array_equal(loaded.indices, [[4, 2], [2, 9]])
    np.testing.assert_array_equal(loaded.file_rows, [[1, 0], [0, 2]])
    table[1, 0, 0] = float("nan")
    with open(tmp_path / "nn_nan.pkl", "wb") as handle:
        pickle.dump(table, handle)
    with pytest.raises(InputError, match="must be finite"):
        load_shortlist(tmp_path / "nn_nan.pkl")
