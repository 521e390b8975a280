"""`evaluate_dataset` on real feature files and a real (random) ELViS: which pairs the model
scores, how the global row is scored, and the fusion grid. Then `evaluate_datasets` on a real
benchmark folder: its progress events, per-query results and a missing image."""

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from elvis_cli import TaskProgress, evaluate_datasets
from elvis_cli.evaluation.datasets import RetrievalDataset, load_dataset
from elvis_cli.evaluation.report import (
    grid_best,
    reranking_changes,
    results_table,
    summary_table,
)
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
from elvis_cli.util.errors import InputError
from tests.conftest import SMALL
from tests.helpers import cli_in, one_line_error, photos, write_store, write_views

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


def test_a_model_can_use_its_own_number_of_descriptors(toy):
    dataset, source, checkpoint, _ = toy

    def rows(**given):
        config = EvaluateConfig(shortlists=(0, 2), models=("global", "elvis", "chamfer"),
                                device="cpu", **given)
        found = evaluate_dataset(dataset, config, checkpoint, progress=False,
                                 source=source).rows
        return {row["model"]: row for row in found}

    both, fewer = rows(), rows(num_local_of={"chamfer": 1})
    for row in (both["elvis"], fewer["elvis"]):
        del row["seconds_per_query"]
    assert fewer["elvis"] == both["elvis"]
    assert fewer["chamfer"]["bytes_per_image"] < both["chamfer"]["bytes_per_image"]
    with pytest.raises(InputError, match="--use-local-of sv=3: give a positive count for one"):
        EvaluateConfig(models=("global", "elvis"), num_local_of={"sv": 3})


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


# --- a real benchmark on disk: progress events, per-query results, missing images -------------

SMALL_OPTIONS = {"image_size": 64, "num_local": 16}


def write_revisitop(root: Path, queries: list[str], gallery: list[str], gnd: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"gnd_{root.name}.pkl", "wb") as handle:
        pickle.dump({"imlist": gallery, "qimlist": queries, "gnd": gnd}, handle)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> SimpleNamespace:
    """`evaluate_datasets` once on data/mini (revisitop layout, 4 queries, 4 gallery images,
    query 0 without a hard positive) with global and chamfer at shortlists 2 and 3, its
    progress events collected."""
    cwd = tmp_path_factory.mktemp("mini")
    names = write_views(cwd / "data" / "mini" / "jpg")
    gnd = [{"easy": [0], "hard": [], "junk": [1]}] + [
        {"easy": [], "hard": [i], "junk": []} for i in range(1, 4)]
    write_revisitop(cwd / "data" / "mini", names[0::2], names[1::2], gnd)
    events: list[TaskProgress] = []
    config = EvaluateConfig(backbone_options=SMALL_OPTIONS, models=["global", "chamfer"],
                            shortlists=[0, 2, 3], device="cpu")
    run = evaluate_datasets(cwd / "data", ["mini"], config, out_dir=cwd / "out",
                            progress=events.append)
    return SimpleNamespace(cwd=cwd, run=run, events=events)


def progress_of(events: list[TaskProgress], task: str) -> dict[str, list[tuple[int, int]]]:
    """(done, total) of each event of `task`, by detail."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for event in events:
        if event.task == task:
            seen.setdefault(event.detail, []).append((event.done, event.total))
    return seen


def test_evaluate_reports_each_image_extracted_with_its_dataset_and_total(mini):
    assert progress_of(mini.events, "extracting") == {
        "mini: query": [(done, 4) for done in range(5)],
        "mini: gallery": [(done, 4) for done in range(5)]}


def test_evaluate_reports_each_query_reranked_per_model_and_shortlist(mini):
    assert progress_of(mini.events, "re-ranking") == {
        f"mini: chamfer, shortlist {size}": [(done, 4) for done in range(5)] for size in (2, 3)}


def test_evaluate_counts_its_stages_to_the_end(mini):
    stages = [event for event in mini.events if event.task == "evaluating"]
    assert [(event.done, event.total) for event in stages] == [(done, 3) for done in range(4)]
    assert [event.detail for event in stages[1:3]] == [
        "mini: chamfer re-ranking, shortlist 2", "mini: chamfer re-ranking, shortlist 3"]


def test_per_query_aps_average_exactly_to_each_rows_map(mini):
    per_query, table = mini.run.per_query, mini.run.table
    assert len(per_query) == len(table) * 2 * 4  # rows x protocols x queries
    assert np.isnan(per_query[(per_query["protocol"] == "hard")
                              & (per_query["query_index"] == 0)]["ap"]).all()
    for row in table.itertuples():
        rows = per_query[(per_query["model"] == row.model)
                         & (per_query["shortlist"] == row.shortlist)]
        maps = {}
        for protocol in ("medium", "hard"):
            of_protocol = rows[rows["protocol"] == protocol]
            assert list(of_protocol["query"]) == list(load_dataset(
                mini.cwd / "data", "mini").queries)
            maps[protocol] = np.mean(of_protocol["ap"].dropna().to_numpy())
            assert maps[protocol] == getattr(row, f"map_{protocol}"), (row.model, protocol)
        assert (maps["medium"] + maps["hard"]) / 2 == row.map


def test_per_query_file_is_written_beside_the_results(mini):
    assert mini.run.outputs["per_query"] == mini.cwd / "out" / "per_query.csv"
    written = pd.read_csv(mini.run.outputs["per_query"])
    pd.testing.assert_frame_equal(written, mini.run.per_query, check_exact=False, rtol=1e-12)


def test_changes_count_the_queries_reranking_made_better_and_worse(mini):
    per_query = mini.run.per_query
    mean = per_query.groupby(["model", "shortlist", "query_index"])["ap"].mean()
    change = (mean["chamfer", 3] - mean["global", 0]).to_numpy()
    changes = mini.run.changes
    assert len(changes) == 1
    row = changes.iloc[0]
    assert (row["model"], row["shortlist"]) == ("chamfer", 3)
    assert [row["better"], row["worse"], row["same"]] == [
        int((change > 0).sum()), int((change < 0).sum()), int((change == 0).sum())]
    if row["better"]:
        assert row["gain"] == change.max()


def test_elvis_evaluate_prints_the_changes_and_writes_per_query_where_asked(mini):
    result = cli_in("evaluate", "--data-root", "data", "--dataset", "mini", *SMALL,
                    "--model", "global,chamfer", "--shortlist", "0", "3", "--out-dir", "cli",
                    "--per-query", "mine.csv", cwd=mini.cwd,
                    env={"ELVIS_PROGRESS_INTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    assert "mini: chamfer@3 vs global: " in result.stdout
    assert "results -> " in result.stdout and "mine.csv" in result.stdout
    assert len(pd.read_csv(mini.cwd / "mine.csv")) == 2 * 2 * 4  # global, chamfer@3
    assert "elvis: re-ranking 4/4 (mini: chamfer, shortlist 3): " in result.stderr


def test_a_missing_image_is_named_with_the_path_evaluate_tried(mini):
    root = mini.cwd / "data" / "gone"
    (root / "jpg").mkdir(parents=True)
    Image.fromarray(photos()["cat"]).save(root / "jpg" / "cat.jpg")
    write_revisitop(root, ["cat"], ["cat", "lost"], [{"easy": [0], "hard": [], "junk": []}])
    result = cli_in("evaluate", "--data-root", "data", "--dataset", "gone", *SMALL,
                    "--model", "global", "--shortlist", "0", "--quiet", cwd=mini.cwd)
    one_line_error(result, f"first {root / 'jpg' / 'lost.jpg'}: ", f"ground truth in {root} ")


def test_no_changes_are_counted_without_the_plain_global_ranking():
    """`--post gss` alone scores no plain global ranking: there is nothing to compare with."""
    rows = [{"dataset": "d", "model": model, "shortlist": size, "protocol": "ok",
             "query_index": query, "query": f"q{query}", "ap": ap}
            for model, size in (("global+gss", 0), ("elvis+gss", 5))
            for query, ap in enumerate((50.0, 100.0))]
    assert reranking_changes(pd.DataFrame(rows)).empty
    plain = [{**row, "model": "global"} for row in rows if row["model"] == "global+gss"]
    assert len(reranking_changes(pd.DataFrame(rows + plain))) == 2
