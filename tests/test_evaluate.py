"""`evaluate_dataset` on real feature files and a real (random) ELViS: which pairs the model
scores, how the global row is scored, and the fusion grid."""

import numpy as np
import pytest
import torch

from elvis_cli.evaluation.datasets import RetrievalDataset
from elvis_cli.evaluation.report import grid_best, results_table, summary_table
from elvis_cli.evaluation.run import (
    DatasetFeatures,
    DatasetResult,
    EvaluateConfig,
    FusionGrid,
    evaluate_dataset,
)
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.checkpoints import Checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.reranker import Fusion
from elvis_cli.retrieval.rerank import PairScorer
from elvis_cli.retrieval.shortlist import Shortlist
from tests.helpers import write_store

D = 16
# each query's global list, best first; ok/junk ground truth (INSTRE-style)
NN = np.array([[3, 7, 1, 0, 2, 4, 5, 6, 8, 9],
               [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
               [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
GND = [{"ok": np.array([1, 2]), "junk": np.array([3, 7])},
       {"ok": np.array([5]), "junk": np.array([0])},
       {"ok": np.array([0, 9]), "junk": np.array([], dtype=np.int64)}]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """(dataset, source, checkpoint, calls): `calls` records every candidate array scored."""
    rng = np.random.default_rng(5)
    write_store(tmp_path / "q.h5", rng, 3, 6, [6, 6, 6], dim=D).close()
    write_store(tmp_path / "g.h5", rng, 10, 6, [6] * 10, dim=D).close()
    dataset = RetrievalDataset("toy", tmp_path, [f"g{i}" for i in range(10)],
                               ["q0", "q1", "q2"], GND, "ok-junk", map_k=4)
    similarities = np.tile(np.linspace(0.9, 0.1, 10, dtype=np.float32), (3, 1))

    def source(dataset, config, progress):
        return DatasetFeatures(FeatureStore.open(tmp_path / "q.h5"),
                               FeatureStore.open(tmp_path / "g.h5"),
                               Shortlist(NN.copy(), similarities), 0.0, "test")

    torch.manual_seed(0)
    checkpoint = Checkpoint(Elvis(ElvisConfig(descriptor_dim=D)), "random", None,
                            Fusion(0.0, 2.0))
    calls = []
    score = PairScorer.score

    def counting(self, candidates, progress=None):
        calls.append(candidates.copy())
        return score(self, candidates, progress)

    monkeypatch.setattr(PairScorer, "score", counting)
    return dataset, source, checkpoint, calls


def run(toy, grid=None):
    dataset, source, checkpoint, _ = toy
    config = EvaluateConfig(shortlists=(0, 2), models=("global", "elvis"), device="cpu")
    return evaluate_dataset(dataset, config, checkpoint, progress=False, source=source,
                            grid=grid).rows


def test_ok_junk_leaves_the_reranking_slots_and_global_row_is_cut_then_junk(toy):
    rows = run(toy)
    calls = toy[3]
    assert len(calls) == 2  # warm-up, then shortlist 2
    # the top 2 once each query's junk is moved behind the rest: q0 [1 0 ...], q1 [1 2 ...]
    np.testing.assert_array_equal(calls[1], [[0, 1], [1, 2], [8, 9]])
    # the global row scores the global lists as they are, cut to map_k = 4, then junk out:
    # q0 [3 7 1 0] -> [1 0]: hit at 0, 1 / min(2 positives, 4) = 1/2
    # q1 [0 1 2 3] -> [1 2 3]: no hit -> 0;  q2 [9 8 7 6]: hit at 0 -> 1 / min(2, 4) = 1/2
    global_row = rows[0]
    assert global_row["map"] == pytest.approx(100 / 3)
    for k in (1, 10, 100):
        assert global_row[f"recall@{k}"] == pytest.approx(200 / 3)


def test_grid_marks_the_best_keeps_the_headline_and_scores_each_size_once(toy):
    headline = run(toy)
    toy[3].clear()
    grid = FusionGrid(shortlists=(3, 2), lams=(0.0, 1.0), temperatures=(2.0, 0.5))
    rows = run(toy, grid)
    calls = toy[3]
    # warm-up, shortlist 2 (headline and grid share it), shortlist 3: never once per (lam, temp)
    assert [call.shape[1] for call in calls] == [1, 2, 3]

    def metrics(row):
        return {key: value for key, value in row.items() if key != "seconds_per_query"}

    assert [metrics(row) for row in rows[:2]] == [metrics(row) for row in headline]
    assert not any(row["grid"] or row["best"] for row in rows[:2])
    combos = [(row["shortlist"], row["lam"], row["temperature"]) for row in rows[2:]]
    assert combos == [(k, lam, t) for k in (2, 3) for lam in (0.0, 1.0) for t in (0.5, 2.0)]
    assert all(row["grid"] and row["model"] == "elvis" for row in rows[2:])
    best = [row for row in rows if row["best"]]
    assert len(best) == 1 and best[0]["map"] == max(row["map"] for row in rows[2:])
    assert min(row["map"] for row in rows[2:]) < best[0]["map"]  # the grid does change ranks
    # the checkpoint's own fusion (0, 2) at shortlist 2 is the headline row, from reused scores
    same = next(row for row in rows[2:] if (row["shortlist"], row["lam"],
                                            row["temperature"]) == (2, 0.0, 2.0))
    assert same["map"] == rows[1]["map"]
    table = results_table([DatasetResult("toy", "ok", rows)])
    assert list(summary_table(table).loc[0, ["global", "elvis@2"]]) == [
        headline[0]["map"], headline[1]["map"]]
    picked = grid_best(table)
    assert len(picked) == 1 and picked.loc[0, "map"] == best[0]["map"]


def test_fusion_grid_refuses_bad_values():
    from elvis_cli.util.errors import InputError

    for bad in ({"shortlists": (0,)}, {"lams": (1.5,)}, {"temperatures": (0.0,)}):
        with pytest.raises(InputError):
            FusionGrid(**bad)
