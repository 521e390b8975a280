"""The re-ranking engine against the plain reference, on real HDF5 feature files."""

import h5py
import numpy as np
import pytest
import torch

from elvis_cli.features.store import FeatureStore
from elvis_cli.model.ames import Ames, AmesConfig
from elvis_cli.model.checkpoints import Checkpoint
from elvis_cli.model.elvis import uses_log_domain
from elvis_cli.model.elvis_reranker import ElvisReranker
from elvis_cli.model.registry import RERANKERS, load_reranker
from elvis_cli.model.reranker import Fusion, fuse_and_sort
from elvis_cli.retrieval.rerank import PairScorer, RerankConfig, rerank
from elvis_cli.retrieval.shortlist import Shortlist
from elvis_cli.util.errors import InputError
from tests.conftest import CANDIDATES, STORE_DIM
from tests.helpers import random_model, reference_pair_scores


@pytest.mark.parametrize("options", [
    {},  # everything in one block
    {"cache_images": 3, "read_images": 2, "workers": 2},  # many blocks and reads, two threads
    {"num_local": 10},  # fewer descriptors than stored
])
def test_scores_match_reference(stores, options):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=30)
    config = RerankConfig(device="cpu", **options)
    scores = PairScorer(ElvisReranker(model), queries, gallery, config).score(CANDIDATES)
    expected = reference_pair_scores(model, queries, gallery, CANDIDATES, config.num_local)
    assert np.array_equal(np.isnan(scores), np.isnan(expected))
    np.testing.assert_allclose(scores, expected, atol=1e-4, equal_nan=True)


def test_cpu_chunks_cross_queries_and_ignore_batch_size(stores):
    """CPU chunks span queries, as on CUDA, and do not depend on batch_size, so neither do the
    scores, to the bit."""
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=31)
    scores = [PairScorer(ElvisReranker(model), queries, gallery,
                         RerankConfig(device="cpu", batch_size=size)) for size in (1, 100)]
    assert scores[0].pairs_per_call == scores[1].pairs_per_call > CANDIDATES.shape[1]
    first, second = (scorer.score(CANDIDATES) for scorer in scores)
    assert first.tobytes() == second.tobytes()
    expected = reference_pair_scores(model, queries, gallery, CANDIDATES, None)
    np.testing.assert_allclose(first, expected, atol=1e-4, equal_nan=True)


def test_one_pair_per_call_scores_the_same_bits(stores, monkeypatch):
    """The model computes a chunk's pairs one by one; the chunk size changes nothing."""
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=36)
    config = RerankConfig(device="cpu", workers=2)
    chunked = PairScorer(ElvisReranker(model), queries, gallery, config).score(CANDIDATES)
    monkeypatch.setattr("elvis_cli.retrieval.rerank.CPU_PAIRS_PER_CALL", 1)
    scorer = PairScorer(ElvisReranker(model), queries, gallery, config)
    assert scorer.pairs_per_call == 1
    assert scorer.score(CANDIDATES).tobytes() == chunked.tobytes()


def test_large_dust_bin_takes_the_log_domain_path(stores):
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=32, dust_bin=40.0)
    scorer = PairScorer(ElvisReranker(model), queries, gallery, RerankConfig(device="cpu"))
    assert uses_log_domain(model.dust_bin, model.config.regularisation)
    expected = reference_pair_scores(model, queries, gallery, CANDIDATES, None)
    np.testing.assert_allclose(scorer.score(CANDIDATES), expected, atol=1e-4, equal_nan=True)


def test_threads_are_restored_and_progress_counts_queries(stores):
    queries, gallery = stores
    threads = torch.get_num_threads()
    calls = []
    PairScorer(ElvisReranker(random_model(dim=STORE_DIM)), queries, gallery,
               RerankConfig(device="cpu", workers=2, cache_images=4)).score(
        CANDIDATES, progress=lambda: calls.append(1))
    assert torch.get_num_threads() == threads
    assert len(calls) == len(CANDIDATES)


def test_float16_needs_cuda_and_precision_is_checked(stores):
    queries, gallery = stores
    with pytest.raises(InputError, match="CUDA"):
        PairScorer(ElvisReranker(random_model(dim=STORE_DIM)), queries, gallery,
                   RerankConfig(device="cpu", precision="float16"))
    with pytest.raises(InputError, match="precision"):
        RerankConfig(precision="bfloat16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_cuda_matches_reference(stores, precision):
    """Pinned float16 reads, cross-query batches, tensor-core products."""
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=33)
    expected = reference_pair_scores(model, queries, gallery, CANDIDATES, None)
    scorer = PairScorer(ElvisReranker(model), queries, gallery,
                        RerankConfig(device="cuda", batch_size=3, precision=precision))
    tolerance = 1e-4 if precision == "float32" else 1e-3
    np.testing.assert_allclose(scorer.score(CANDIDATES), expected, atol=tolerance, equal_nan=True)


def test_official_float32_files_score_like_ours(stores, tmp_path):
    """Released `features`-only files store float32 (and padding may hold anything)."""
    queries, gallery = stores
    for store, name in ((queries, "q"), (gallery, "g")):
        rows = store.read_local(np.arange(store.num_images))
        rows[rows[..., 3] > 0.5, 5:] = np.nan
        with h5py.File(tmp_path / f"{name}_local.hdf5", "w") as file:
            file.create_dataset("features", data=rows)
    model = random_model(dim=STORE_DIM, seed=34)
    with FeatureStore.open(tmp_path / "q_local.hdf5") as official_queries, \
            FeatureStore.open(tmp_path / "g_local.hdf5") as official_gallery:
        official = PairScorer(ElvisReranker(model), official_queries, official_gallery,
                              RerankConfig(device="cpu")).score(CANDIDATES)
    ours = PairScorer(ElvisReranker(model), queries, gallery,
                      RerankConfig(device="cpu")).score(CANDIDATES)
    np.testing.assert_allclose(official, ours, atol=1e-5, equal_nan=True)


def test_gallery_embeddings_are_kept_for_the_next_block_and_call(stores, monkeypatch):
    """Consecutive blocks and calls (evaluate's shortlist sizes) read only images not kept."""
    queries, gallery = stores
    model = random_model(dim=STORE_DIM, seed=35)
    read = []
    original = gallery.read_local
    monkeypatch.setattr(gallery, "read_local",
                        lambda rows, *args, **kwargs: read.append(list(rows)) or original(
                            rows, *args, **kwargs))
    scorer = PairScorer(ElvisReranker(model), queries, gallery,
                        RerankConfig(device="cpu", cache_images=5))
    first = np.array([[0, 1, 2], [1, 2, 3], [5, 6, 7]])  # blocks: queries 0-1, then query 2
    second = np.array([[5, 6, 8], [8, 7, -1], [0, 1, 4]])  # blocks: 0-1 (5, 6, 7 kept), 2
    scorer.score(first)
    assert read == [[0, 1, 2, 3], [5, 6, 7]]
    read.clear()
    scores = scorer.score(second)
    assert read == [[8], [0, 1, 4]]
    fresh = PairScorer(ElvisReranker(model), queries, gallery,
                       RerankConfig(device="cpu")).score(second)
    np.testing.assert_allclose(scores, fresh, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(scores, reference_pair_scores(model, queries, gallery, second, None),
                               atol=1e-4, equal_nan=True)


def test_every_registered_reranker_runs_through_the_engine(stores):
    """The registry's re-rankers share one interface: global keeps the list as it is."""
    queries, gallery = stores
    checkpoint = Checkpoint(random_model(dim=STORE_DIM, seed=37), "random", None, Fusion())
    shortlist = Shortlist(np.array([[3, 1, 8], [0, 2, 4], [5, 6, 7], [7, 6, 5]]),
                          np.tile(np.array([0.9, 0.5, 0.1], dtype=np.float32), (4, 1)))
    ames = Checkpoint(Ames(AmesConfig(descriptor_dim=STORE_DIM, layers=1)).eval(), "random",
                      None, Fusion())
    for name in RERANKERS:
        reranker = load_reranker(name, gallery, ames if name == "ames" else checkpoint, lam=0.3)
        result = rerank(reranker, queries, gallery, shortlist,
                        RerankConfig(shortlist=2, device="cpu"))
        assert np.isnan(result.scores).all() == (not reranker.scores_pairs), name
        if not reranker.scores_pairs:
            np.testing.assert_array_equal(result.indices, shortlist.indices)
        assert np.array_equal(result.indices[:, 2], shortlist.indices[:, 2])  # tail kept
    assert load_reranker("elvis", gallery, checkpoint, lam=0.3).fusion == Fusion(0.3, 0.5)
    with pytest.raises(InputError, match=r"unknown model 'elvs'.*did you mean 'elvis'"):
        load_reranker("elvs", gallery)


def test_fused_scores_do_not_depend_on_how_many_lists_are_fused_at_once():
    """`rerank` fuses a block of queries, `evaluate` a whole dataset, validation its own set:
    a pair's fused score, hence its rank, must be the same bits in each (torch's sigmoid
    rounds its vector body and its scalar tail apart)."""
    generator = torch.Generator().manual_seed(5)
    lists, length = 37, 53  # not whole vectors either way
    indices = np.tile(np.arange(length), (lists, 1))
    global_scores = torch.rand(lists, length, generator=generator).numpy()
    raw = (torch.randn(lists, length, generator=generator) * 50).numpy()
    fusion = Fusion(0.3, 0.07)
    together = fuse_and_sort(indices, global_scores, raw, 40, fusion)
    for row in range(lists):
        alone = fuse_and_sort(indices[row : row + 1], global_scores[row : row + 1],
                              raw[row : row + 1], 40, fusion)
        for name in ("indices", "scores"):
            assert getattr(alone, name)[0].tobytes() == getattr(together, name)[row].tobytes()
