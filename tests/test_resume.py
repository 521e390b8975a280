"""Re-ranking runs that resume (retrieval/job.py): a run written to a file is done in parts, one
per block of queries; killed and run again with the same command it keeps the parts done and
writes the same bytes as an uninterrupted run; a run with other inputs or settings never
reuses them."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from elvis_cli import RerankConfig, TaskProgress, rerank_files
from elvis_cli.evaluation.datasets import RetrievalDataset
from elvis_cli.evaluation.run import DatasetFeatures, EvaluateConfig, evaluate_dataset
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.checkpoints import Checkpoint, save_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.fusion import Fusion
from elvis_cli.model.registry import load_reranker
from elvis_cli.retrieval.job import parts_folder
from elvis_cli.retrieval.rerank import BlockReranker, PairScorer
from elvis_cli.retrieval.result_files import write_results
from elvis_cli.retrieval.shortlist import Shortlist, build_shortlist
from elvis_cli.util.errors import InputError
from elvis_cli.util.lock import exclusive_lock
from tests.helpers import REPO, cli_in, random_checkpoint, random_model, write_store

NUM_IMAGES, SHORTLIST, BLOCK = 12, 4, 3  # 4 blocks of 3 queries, 12 pairs each
ARGS = ["rerank", "--features", "g.h5", "--checkpoint", "c.pt", "--shortlist", str(SHORTLIST),
        "--block-size", str(BLOCK), "--workers", "1", "--show", "1"]


def make_folder(folder: Path, seed: int = 0) -> Path:
    """g.h5 (12 images, some mostly or all padding) and a checkpoint c.pt for it."""
    folder.mkdir(parents=True, exist_ok=True)
    real = [14, 14, 3, 14, 0, 14, 9, 14, 14, 5, 14, 14]
    write_store(folder / "g.h5", np.random.default_rng(seed), NUM_IMAGES, 14, real).close()
    random_checkpoint(folder / "c.pt", 48, {"name": "test"})
    return folder


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "run")


def rerank(folder: Path, output: str, **settings) -> SimpleNamespace:
    """`rerank_files` as ARGS run it, from `folder` (image paths relative to it); the run,
    the re-ranking's progress events and the bytes of its output."""
    events: list[TaskProgress] = []
    config = RerankConfig(shortlist=settings.pop("shortlist", SHORTLIST), workers=1,
                          block_size=settings.pop("block_size", BLOCK), **settings)
    here = os.getcwd()
    os.chdir(folder)
    try:
        run = rerank_files("g.h5", checkpoint="c.pt", config=config, output=output,
                           progress=events.append)
    finally:
        os.chdir(here)
    reranking = [event for event in events if event.task == "re-ranking"]  # not "indexing"
    return SimpleNamespace(run=run, events=reranking, bytes=(folder / output).read_bytes())


def part_files(folder: Path, output: str) -> list[Path]:
    return sorted(parts_folder(folder / output).glob("part-*.npz"))


# --- the parts make the table of one run ------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_parts_make_the_table_of_a_run_in_one_piece(folder, suffix, monkeypatch):
    in_parts = rerank(folder, f"r{suffix}")
    monkeypatch.chdir(folder)  # image paths open from here
    whole = rerank_files(folder / "g.h5", checkpoint=folder / "c.pt",
                         config=RerankConfig(shortlist=SHORTLIST, workers=1))
    assert len(part_files(folder, f"r{suffix}")) == NUM_IMAGES // BLOCK
    write_results(whole.table, folder / f"whole{suffix}")
    pd.testing.assert_frame_equal(in_parts.run.table, whole.table, check_exact=True)
    assert in_parts.run.rows == len(whole.table) == NUM_IMAGES * SHORTLIST
    if suffix == ".parquet":  # a row group per block: the same rows, other bytes
        parquet = pq.ParquetFile(folder / "r.parquet")
        assert parquet.metadata.num_row_groups == NUM_IMAGES // BLOCK
        pd.testing.assert_frame_equal(parquet.read().to_pandas(), whole.table,
                                      check_exact=True)
    else:
        assert in_parts.bytes == (folder / f"whole{suffix}").read_bytes()


def test_blocks_computed_in_any_order_are_the_rows_of_the_whole_run(folder):
    with FeatureStore.open(folder / "g.h5") as store:
        globals_ = store.global_descriptors()
        shortlist = build_shortlist(globals_, globals_, 6, exclude_self=True)
        reranker = load_reranker("elvis", store, folder / "c.pt")
        rerank_block = BlockReranker(reranker, store, store, shortlist,
                                     RerankConfig(shortlist=5, workers=1))
        whole = rerank_block(0, NUM_IMAGES)
        for start, stop in [(7, 12), (0, 1), (1, 7)]:
            block = rerank_block(start, stop)
            for name in ("indices", "global_scores", "raw_scores", "scores"):
                assert (getattr(block, name).tobytes()
                        == getattr(whole, name)[start:stop].tobytes()), (start, name)
    assert not np.isnan(whole.raw_scores[:, :5]).all()  # pairs were really scored


# --- the same call resumes; another never reuses a part ---------------------------------------


def test_the_same_call_again_keeps_every_part_and_scores_nothing(folder):
    first = rerank(folder, "r.csv")
    stamps = [path.stat().st_mtime_ns for path in part_files(folder, "r.csv")]
    again = rerank(folder, "r.csv")
    assert again.bytes == first.bytes
    assert (again.run.job.kept, again.run.job.blocks) == (4, 4)
    assert again.run.job.started_over is None
    assert [path.stat().st_mtime_ns for path in part_files(folder, "r.csv")] == stamps
    assert [event.done for event in again.events] == [NUM_IMAGES]  # all done, none scored


def test_a_lost_or_damaged_part_is_done_again(folder):
    first = rerank(folder, "r.csv")
    lost, damaged = part_files(folder, "r.csv")[1:3]
    lost.unlink()
    damaged.write_bytes(damaged.read_bytes()[:-40])  # a torn file (not our rename's doing)
    again = rerank(folder, "r.csv")
    assert again.bytes == first.bytes
    assert again.run.job.kept == 2
    scored = [event for event in again.events if event.pairs_per_second is not None]
    assert [event.done for event in again.events[:1] + scored] == [6, 7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize(("change", "said"), [
    ({"shortlist": 3}, "settings: shortlist 4 -> 3"),
    ({"num_local": 5}, "settings: num_local 600 -> 5"),
    ({"block_size": 5}, "block_size 3 -> 5"),
])
def test_a_run_with_other_settings_starts_over_and_says_what_differed(folder, tmp_path,
                                                                      change, said):
    rerank(folder, "r.csv")
    other = rerank(folder, "r.csv", **change)
    assert said in other.run.job.started_over and other.run.job.kept == 0
    fresh = rerank(make_folder(tmp_path / "fresh"), "r.csv", **change)
    assert other.bytes == fresh.bytes


def test_other_features_are_never_read_from_old_parts(folder):
    before = rerank(folder, "r.csv")
    make_folder(folder, seed=1)  # the same names, other descriptors
    after = rerank(folder, "r.csv")
    assert after.run.job.kept == 0
    assert after.run.job.started_over == ("gallery: layout changed, shards changed; "
                                          "queries: layout changed, shards changed")
    assert after.bytes != before.bytes


def test_other_weights_are_never_read_from_old_parts(folder):
    before = rerank(folder, "r.csv")
    save_checkpoint(folder / "c.pt", random_model(seed=1), {"name": "test"}, Fusion(0.5, 0.1))
    after = rerank(folder, "r.csv")
    assert (after.run.job.kept, after.run.job.started_over) == (0, "model: weights changed")
    assert after.bytes != before.bytes


def test_a_part_of_another_run_is_done_again(folder, tmp_path):
    other = make_folder(tmp_path / "other")
    rerank(other, "r.csv", shortlist=3)
    first = rerank(folder, "r.csv")
    shutil.copy(part_files(other, "r.csv")[0], part_files(folder, "r.csv")[0])
    again = rerank(folder, "r.csv")
    assert again.run.job.kept == 3 and again.bytes == first.bytes


def test_a_second_writer_of_the_same_output_is_refused(folder):
    with exclusive_lock(parts_folder(folder / "r.csv") / "lock", "held"), \
            pytest.raises(InputError, match=r"r\.csv is being written by another process"):
        rerank(folder, "r.csv")


# --- progress and what the command says -------------------------------------------------------


def test_progress_has_pairs_per_second_and_the_time_left(folder):
    events = rerank(folder, "r.csv").events
    assert [event.done for event in events] == list(range(NUM_IMAGES + 1))
    assert {event.task for event in events} == {"re-ranking"}
    measured = events[1:]
    assert all(event.pairs_per_second > 0 for event in measured)
    assert all(event.eta_seconds >= 0 for event in measured) and measured[-1].eta_seconds == 0


def test_the_command_says_it_resumed_and_shows_the_rate(folder):
    first = cli_in(*ARGS, "-o", "r.csv", cwd=folder, env={"ELVIS_PROGRESS_INTERVAL": "0"})
    assert first.returncode == 0, first.stderr
    assert "pairs/s" in first.stderr and "ETA" in first.stderr
    assert "48 rows -> r.csv" in first.stdout and "resumed" not in first.stdout
    part_files(folder, "r.csv")[-1].unlink()
    again = cli_in(*ARGS, "-o", "r.csv", cwd=folder)
    assert again.returncode == 0, again.stderr
    assert "resumed: 3 of 4 blocks kept from r.csv.parts" in again.stdout
    other = cli_in(*ARGS, "--shortlist", "2", "-o", "r.csv", cwd=folder)
    assert ("r.csv.parts held the parts of another run (candidate lists changed; settings: "
            "shortlist 4 -> 2): started over") in other.stdout


# --- killed, then the same command ------------------------------------------------------------


def run_killed(point: str, nth: int, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tests.kill_runner", point, str(nth), "kill",
                           *ARGS, "-o", "r.csv"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.subprocess
@pytest.mark.parametrize(("point", "nth", "kept"), [
    ("part-renamed", 1, 1),  # just after the first block's part is in place
    ("pair", 18, 1),  # half-way through the second block's 12 pairs
], ids=["after-the-first-part", "in-the-middle-of-a-block"])
def test_killed_then_the_same_command_writes_the_same_bytes(folder, point, nth, kept):
    reference = cli_in(*ARGS, "-o", "reference.csv", cwd=folder)
    assert reference.returncode == 0, reference.stderr
    killed = run_killed(point, nth, folder)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # the kill really happened
    assert not (folder / "r.csv").exists()
    assert len(part_files(folder, "r.csv")) == kept
    resumed = cli_in(*ARGS, "-o", "r.csv", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed: {kept} of 4 blocks kept" in resumed.stdout
    assert (folder / "r.csv").read_bytes() == (folder / "reference.csv").read_bytes()
    assert not list(parts_folder(folder / "r.csv").glob(".*.tmp"))


# --- evaluate: each re-ranking run's scores in parts -------------------------------------------


QUERIES, GALLERY = 5, 10
GROUND_TRUTH = [{"ok": np.array([query + 1]), "junk": np.array([query + 2])}
                for query in range(QUERIES)]


def evaluate_toy(folder: Path, parts: Path, block_size: int = 2) -> list[dict]:
    """The rows of `evaluate_dataset` on 5 queries and 10 gallery images (ok/junk ground
    truth), an ELViS of random weights at shortlist sizes 2 and 4, parts in `parts`."""
    rng = np.random.default_rng(3)
    for name, count in (("q.h5", QUERIES), ("g.h5", GALLERY)):
        if not (folder / name).exists():
            write_store(folder / name, rng, count, 6, [6] * count, dim=16).close()
    dataset = RetrievalDataset("toy", folder, [f"g{i}" for i in range(GALLERY)],
                               [f"q{i}" for i in range(QUERIES)], GROUND_TRUTH, "ok-junk",
                               map_k=4)
    ranking = Shortlist(np.tile(np.arange(GALLERY), (QUERIES, 1)),
                        np.tile(np.linspace(0.9, 0.1, GALLERY, dtype=np.float32), (QUERIES, 1)))

    def source(dataset, config, progress):
        return DatasetFeatures(FeatureStore.open(folder / "q.h5"),
                               FeatureStore.open(folder / "g.h5"), ranking, 0.0, "test")

    torch.manual_seed(0)
    checkpoint = Checkpoint(Elvis(ElvisConfig(descriptor_dim=16)), "random", None,
                            Fusion(0.0, 2.0))
    config = EvaluateConfig(shortlists=(0, 2, 4), models=("elvis",), device="cpu",
                            block_size=block_size)
    rows = evaluate_dataset(dataset, config, checkpoint, source=source, parts=parts).rows
    return [{key: value for key, value in row.items() if key != "seconds_per_query"}
            for row in rows]


def test_an_interrupted_evaluation_resumes_from_its_parts(tmp_path, monkeypatch):
    uninterrupted = evaluate_toy(tmp_path, tmp_path / "fresh")
    score, calls = PairScorer.score, []

    def interrupted(self, candidates, progress=None, first_query=0):
        if len(calls) == 3:  # the warm-up, two blocks of shortlist 2, then Ctrl-C
            raise KeyboardInterrupt
        calls.append(first_query)
        return score(self, candidates, progress, first_query)

    monkeypatch.setattr(PairScorer, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_toy(tmp_path, tmp_path / "parts")
    folder = tmp_path / "parts" / "toy" / "elvis@2"
    assert len(list(folder.glob("part-*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(PairScorer, "score", lambda self, *args, **kwargs: (
        calls.append(kwargs.get("first_query", 0)), score(self, *args, **kwargs))[1])
    assert evaluate_toy(tmp_path, tmp_path / "parts") == uninterrupted
    assert calls == [0, 4, 0, 2, 4]  # warm-up, the last block of 2, every block of 4
    assert evaluate_toy(tmp_path, tmp_path / "parts", block_size=3) == uninterrupted
    assert len(list(folder.glob("part-*.npz"))) == 2  # another block size: started over
