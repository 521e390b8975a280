"""Re-ranking runs that resume: results written in parts, one per block of queries, with a
manifest of what the run is. `elvis rerank -o OUTPUT` keeps its parts beside the output
(`OUTPUT.parts/`: each block's fused ranking, RerankJob); `elvis evaluate` keeps each
re-ranking run's raw scores in its out dir (evaluation/run.py).

A part (`part-NNNNN.npz`: the block's arrays, and the digest of the run it belongs to) is
written atomically once its block is done, so a killed run loses at most the block it was in.
The manifest, replaced atomically, records everything the results depend on (for rerank
`BlockReranker.identity`: the features files, the candidate lists' contents, the model's
weights and fusion, the settings that change scores) and the block size: the same command
finds its parts and skips their blocks; a run with other inputs or settings deletes them,
starts over and says what differed. rerank's output is assembled from the parts in query
order, one block in memory at a time. A block is a pure function of the features, its rows
of the candidate lists and the config, and its part is named by its block alone, so any
process can compute any block (`run_blocks` does them in turn, here; ray_runner.py as Ray
tasks).
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from elvis_cli.model.reranker import RerankResult
from elvis_cli.util.atomic import atomic_path, write_text_atomic
from elvis_cli.util.errors import InputError
from elvis_cli.util.lock import exclusive_lock
from elvis_cli.util.progress import ProgressCallback, TaskProgress

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")
FORMAT = "elvis-cli-rerank-parts/1"
MANIFEST = "manifest.json"
RANKING = tuple(field.name for field in fields(RerankResult))  # its arrays, as parts hold them


def parts_folder(output: Path) -> Path:
    """Where the parts of a run writing `output` go: `OUTPUT.parts/` beside it."""
    return output.with_name(output.name + ".parts")


@dataclass(frozen=True)
class Block:
    """Queries start..stop-1 of a run, the `number`-th block."""

    number: int
    start: int
    stop: int


@dataclass
class JobReport:
    """What a run found of an earlier one: blocks kept from it, of all, and why it started
    over (None: nothing to start over from, or the same run)."""

    folder: Path
    blocks: int
    kept: int
    started_over: str | None = None

    def summary(self) -> str:
        """One line for the user, empty when there was nothing to say."""
        if self.started_over is not None:
            return (f"{self.folder} held the parts of another run ({self.started_over}): "
                    "started over")
        if self.kept:
            return f"resumed: {self.kept} of {self.blocks} blocks kept from {self.folder}"
        return ""


class Job:
    """The parts folder of one run: which blocks are done, writing and reading their parts,
    each holding `arrays` (named arrays of one row per query of its block)."""

    def __init__(self, folder: Path, identity: dict[str, Any], num_queries: int,
                 block_size: int, arrays: Sequence[str]) -> None:
        self.folder, self.arrays = folder, tuple(arrays)
        # normalised as JSON stores it (tuples become lists), to compare with a manifest
        self.record = json.loads(json.dumps({"format": FORMAT, "queries": num_queries,
                                             "block_size": block_size, **identity},
                                            sort_keys=True))
        self.digest = hashlib.sha256(json.dumps(self.record, sort_keys=True).encode()
                                     ).hexdigest()
        self.blocks = [Block(number, start, min(start + block_size, num_queries))
                       for number, start in enumerate(range(0, num_queries, block_size))]
        self._done: set[int] = set()

    def prepare(self) -> JobReport:
        """Keep the parts of this same run, delete those of another (the manifest goes first,
        so a kill in between leaves parts no manifest vouches for, deleted next time), and
        record this run in the manifest."""
        manifest = self.folder / MANIFEST
        before = _read_manifest(manifest)
        started_over = None
        if before != self.record:
            if before is not None or any(self.folder.glob("part-*.npz")):
                started_over = _differences(before, self.record)
            manifest.unlink(missing_ok=True)
            for stale in [*self.folder.glob("part-*.npz"), *self.folder.glob(".part-*.tmp")]:
                stale.unlink()
            write_text_atomic(manifest, json.dumps(self.record, indent=1, sort_keys=True))
        self._done = {block.number for block in self.blocks if self._read(block) is not None}
        return JobReport(self.folder, len(self.blocks), len(self._done), started_over)

    def todo(self) -> list[Block]:
        """Blocks without an intact part of this run (a damaged part is done again)."""
        return [block for block in self.blocks if block.number not in self._done]

    def write(self, block: Block, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(self._path(block)) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, job=np.array(self.digest),
                     **{name: arrays[name] for name in self.arrays})
        self._done.add(block.number)

    def read(self, block: Block) -> dict[str, np.ndarray]:
        arrays = self._read(block)
        if arrays is None:
            raise InputError(f"{self._path(block)} went missing or was damaged while the "
                             "run was using it: run the same command again")
        return arrays

    def _path(self, block: Block) -> Path:
        return self.folder / f"part-{block.number:05d}.npz"

    def _read(self, block: Block) -> dict[str, np.ndarray] | None:
        """A block's part, if it is intact and of this run (zip checksums, names, rows)."""
        try:
            with np.load(self._path(block), allow_pickle=False) as part:
                if str(part["job"]) != self.digest:
                    return None
                arrays = {name: part[name] for name in self.arrays}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, torn
            return None
        rows = block.stop - block.start
        return arrays if all(len(array) == rows for array in arrays.values()) else None


class RerankJob(Job):
    """The parts of an `elvis rerank` run: each block's fused ranking (RerankResult)."""

    def __init__(self, output: Path, identity: dict[str, Any], num_queries: int,
                 block_size: int) -> None:
        super().__init__(parts_folder(output), identity, num_queries, block_size, RANKING)

    def write_result(self, block: Block, result: RerankResult) -> None:
        self.write(block, {name: getattr(result, name) for name in RANKING})

    def tables(self, query_paths: Sequence[str], gallery_paths: Sequence[str]
               ) -> Iterator[pd.DataFrame]:
        """The output table block by block, from the parts, in query order."""
        from elvis_cli.retrieval.rerank import rerank_table

        queries, gallery = (np.asarray(paths, dtype=object)
                            for paths in (query_paths, gallery_paths))
        for block in self.blocks:
            yield rerank_table(RerankResult(**self.read(block)), queries, gallery, block.start)


@contextmanager
def held(job: Job, output: Path) -> Iterator[JobReport]:
    """`job` prepared (Job.prepare) and held by this process for the block: a second run
    writing the same `output` is refused."""
    with exclusive_lock(job.folder / "lock", str(output)):
        yield job.prepare()


def run_blocks(work: Callable[[int, int, Callable[[], None]], T], pairs: np.ndarray,
               blocks: Sequence[Block], write: Callable[[Block, T], None],
               progress: ProgressCallback | None = None, detail: str = "") -> None:
    """Do `blocks` of a run in turn (`work(start, stop, progress)`: queries start..stop-1,
    `progress` called as each is scored), each result written by `write` as soon as it is
    done. `pairs`: how many pairs each query of the run scores; `progress` hears the queries
    ("re-ranking"), those of other blocks (kept from an earlier run) as done already."""
    meter = block_meter(pairs, blocks, progress, detail)
    for block in blocks:
        write(block, work(block.start, block.stop, meter.counter(pairs, block.start)))


def block_meter(pairs: np.ndarray, blocks: Sequence[Block],
                progress: ProgressCallback | None = None, detail: str = "") -> Throughput:
    """The progress of a run doing `blocks` ("re-ranking", in queries), wherever they run:
    the queries of other blocks count as done already, the pairs of these as work left."""
    left = np.zeros(len(pairs), dtype=bool)
    for block in blocks:
        left[block.start:block.stop] = True
    return Throughput(progress, "re-ranking", len(pairs), int((~left).sum()),
                      int(pairs[left].sum()), detail)


class Throughput:
    """Progress of a task whose units cost unequal work: `done` of `total` units, with the
    rate and time left measured in pairs scored by this run (units done before it, e.g.
    blocks kept from a killed run, count as done but not as speed)."""

    def __init__(self, progress: ProgressCallback | None, task: str, total: int, done: int,
                 pairs_left: int, detail: str = "") -> None:
        self.progress, self.task, self.total, self.done = progress, task, total, done
        self.pairs_left, self.detail = pairs_left, detail
        self.pairs_done = 0
        self.started = time.perf_counter()
        self._report()

    def counter(self, pairs: np.ndarray, first: int) -> Callable[[], None]:
        """The call that reports one more unit done, the units being `first`, `first` + 1,
        ... in turn, each of `pairs[unit]` pairs."""
        unit = first

        def advance() -> None:
            nonlocal unit
            self.done += 1
            self.pairs_done += int(pairs[unit])
            unit += 1
            self._report()

        return advance

    def _report(self) -> None:
        if not self.progress:
            return
        elapsed = time.perf_counter() - self.started
        rate = self.pairs_done / elapsed if self.pairs_done and elapsed > 0 else None
        eta = None if rate is None else max(self.pairs_left - self.pairs_done, 0) / rate
        self.progress(TaskProgress(self.task, self.done, self.total, self.detail, rate, eta))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The record of the run whose parts are there; None when absent or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _differences(before: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """What differs between two runs' records, e.g. `settings: shortlist 3 -> 4; model:
    weights changed`: a changed value is shown where it is short, else only named."""
    if before is None:
        return "no readable manifest"
    changes = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            inner = [_change(name, old.get(name), new.get(name))
                     for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
            changes.append(f"{key}: {', '.join(inner)}")
        else:
            changes.append(_change(key, old, new))
    return "; ".join(changes)


def _change(name: str, old: object, new: object) -> str:
    short = all(isinstance(value, (int, float, str, type(None))) and len(str(value)) <= 24
                for value in (old, new))
    return f"{name} {old} -> {new}" if short else f"{name} changed"
