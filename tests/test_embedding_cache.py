"""The on-disk embedding cache: same scores, no re-embedding, and never a reason to fail."""

import h5py
import numpy as np
import pytest

from elvis_cli.model.elvis_reranker import ElvisReranker
from elvis_cli.retrieval.embedder import ImageEmbedder
from elvis_cli.retrieval.rerank import PairScorer, RerankConfig, cache_embeddings
from elvis_cli.util.errors import DiskFullError, ElvisWarning
from tests.conftest import CANDIDATES, STORE_DIM
from tests.helpers import random_model, reference_pair_scores


def scorer(model, queries, gallery, cache_dir, monkeypatch, read: list):
    """A PairScorer whose reads of local descriptors are recorded in `read` (image rows)."""
    original = ImageEmbedder._read

    def recording(self, rows):
        read.extend((self.store is gallery, int(row)) for row in rows)
        return original(self, rows)

    monkeypatch.setattr(ImageEmbedder, "_read", recording)
    return PairScorer(ElvisReranker(model), queries, gallery,
                      RerankConfig(device="cpu", embedding_cache=cache_dir, cache_images=3))


def test_a_second_run_reads_nothing_and_scores_the_same_bits(stores, tmp_path, monkeypatch):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=70)
    first_reads, second_reads = [], []
    first = scorer(model, queries, gallery, tmp_path, monkeypatch, first_reads).score(CANDIDATES)
    second = scorer(model, queries, gallery, tmp_path, monkeypatch,
                    second_reads).score(CANDIDATES)
    assert first_reads and not second_reads
    assert first.tobytes() == second.tobytes()
    uncached = PairScorer(ElvisReranker(model), queries, gallery,
                          RerankConfig(device="cpu")).score(CANDIDATES)
    assert first.tobytes() == uncached.tobytes()
    expected = reference_pair_scores(model, queries, gallery, CANDIDATES, None)
    np.testing.assert_allclose(first, expected, atol=1e-4, equal_nan=True)


def test_only_new_images_are_embedded_and_other_weights_miss(stores, tmp_path, monkeypatch):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=71)
    scorer(model, queries, gallery, tmp_path, monkeypatch, []).score(CANDIDATES[:2])
    reads = []
    scorer(model, queries, gallery, tmp_path, monkeypatch, reads).score(CANDIDATES)
    old = {int(row) for row in CANDIDATES[:2].ravel() if row >= 0}
    new = {int(row) for row in CANDIDATES.ravel() if row >= 0} - old
    assert {row for is_gallery, row in reads if is_gallery} == new
    assert {row for is_gallery, row in reads if not is_gallery} == {2, 3}  # queries 0, 1 kept
    other = random_model(dim=STORE_DIM, seed=72)
    reads = []
    scorer(other, queries, gallery, tmp_path, monkeypatch, reads).score(CANDIDATES)
    assert {row for is_gallery, row in reads if is_gallery} == old | new


def test_a_damaged_part_is_reported_and_its_images_embedded_again(stores, tmp_path,
                                                                    monkeypatch):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=73)
    expected = scorer(model, queries, gallery, tmp_path, monkeypatch, []).score(CANDIDATES)
    parts = sorted(tmp_path.glob("*/part-*.h5"))
    assert parts
    for part in parts:  # truncated
        part.write_bytes(part.read_bytes()[:100])
    (parts[0].parent / ".part-killed.h5.tmp").write_bytes(b"half a write")
    reads = []
    with pytest.warns(ElvisWarning, match="unreadable embedding cache part"):
        again = scorer(model, queries, gallery, tmp_path, monkeypatch, reads)
    assert again.score(CANDIDATES).tobytes() == expected.tobytes()
    assert reads  # the damaged part's images


def test_a_flipped_bit_in_an_embedding_is_caught_on_reading(stores, tmp_path, monkeypatch):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=75)
    expected = scorer(model, queries, gallery, tmp_path, monkeypatch, []).score(CANDIDATES)
    for part in tmp_path.glob("*/part-*.h5"):  # the first image's descriptors in every part
        with h5py.File(part, "r") as file:
            chunk = file["descriptors"].id.get_chunk_info(0)
        data = bytearray(part.read_bytes())
        data[chunk.byte_offset + 100] ^= 0x10
        part.write_bytes(bytes(data))
    reads = []
    again = scorer(model, queries, gallery, tmp_path, monkeypatch, reads)  # opens fine
    with pytest.warns(ElvisWarning, match="damaged embedding cache part"):
        assert again.score(CANDIDATES).tobytes() == expected.tobytes()
    assert reads  # the damaged part's images, embedded again


def test_a_full_disk_leaves_the_scores_alone(stores, tmp_path, monkeypatch):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=74)

    def full(*_args, **_kwargs):
        raise DiskFullError("no space left on the device")

    monkeypatch.setattr("elvis_cli.retrieval.embedding_cache.new_hdf5", full)
    with pytest.warns(ElvisWarning, match="not written"):
        scores = scorer(model, queries, gallery, tmp_path, monkeypatch, []).score(CANDIDATES)
    expected = reference_pair_scores(model, queries, gallery, CANDIDATES, None)
    np.testing.assert_allclose(scores, expected, atol=1e-4, equal_nan=True)


def test_filling_the_cache_needs_no_scorer(stores, tmp_path, monkeypatch):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=76)
    config = RerankConfig(device="cpu", embedding_cache=tmp_path)
    count, size = cache_embeddings(ElvisReranker(model), gallery, config)
    assert count == gallery.num_images and size > 0
    assert cache_embeddings(ElvisReranker(model), gallery, config)[0] == 0  # all there
    reads = []
    scorer(model, queries, gallery, tmp_path, monkeypatch, reads).score(CANDIDATES)
    assert reads and not any(is_gallery for is_gallery, _ in reads)
