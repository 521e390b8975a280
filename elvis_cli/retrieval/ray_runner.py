"""`elvis rerank --ray`: the blocks of a re-ranking job (job.py) as Ray tasks
(util/ray_cluster.py), one per GPU when the cluster has GPUs, else a set number of CPU workers.

A block is a pure function of the features, its rows of the candidate lists and the config
(BlockReranker), so a worker makes the driver's BlockReranker again from names (`BlockRecipe`:
open files and loaded models do not travel) and writes the block's part with the same atomic
writer as a single process (`RerankJob.write_result`): the parts, and the table assembled from
them, are the same bits. A worker that dies is replaced and its block done again (Ray's
`max_retries`); a killed driver leaves the parts done, which the same command keeps.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from elvis_cli.util.errors import InputError
from elvis_cli.util.ray_cluster import RayExecutor, ray_cluster, run_tasks

if TYPE_CHECKING:  # job.py imports torch: RayExecutor, which the CLI checks, must not
    import numpy as np

    from elvis_cli.retrieval.config import RerankConfig
    from elvis_cli.retrieval.job import Block, RerankJob
    from elvis_cli.retrieval.rerank import BlockReranker
    from elvis_cli.retrieval.shortlist import Shortlist
    from elvis_cli.util.progress import ProgressCallback


@dataclass(frozen=True)
class BlockRecipe:
    """What a worker needs to make the driver's BlockReranker itself: the features files (as
    absolute paths: every node must see them there), the model and the config."""

    features: str | Path | None
    queries: str | Path | None
    gallery: str | Path | None
    allow_external_sources: bool
    asymmetric: bool
    released: bool  # the candidates were given as a file: the gallery is seen through them
    model: str
    checkpoint: str | Path | None
    lam: float | None
    temperature: float | None
    config: RerankConfig
    output: Path
    num_queries: int

    def __post_init__(self) -> None:
        """Every path as each worker sees it, whatever its working folder (a checkpoint may
        also be a bundled checkpoint's name)."""
        for name in ("features", "queries", "gallery", "output"):
            object.__setattr__(self, name, _absolute(getattr(self, name)))
        if self.checkpoint is not None and Path(self.checkpoint).exists():
            object.__setattr__(self, "checkpoint", _absolute(self.checkpoint))
        object.__setattr__(self, "config", replace(
            self.config, embedding_cache=_absolute(self.config.embedding_cache)))


def _absolute(path: str | Path | None) -> Path | None:
    return None if path is None else Path(path).absolute()


def run_blocks_on_ray(executor: RayExecutor, recipe: BlockRecipe, shortlist: Shortlist,
                      job: RerankJob, pairs: np.ndarray, blocks: Sequence[Block],
                      progress: ProgressCallback | None = None, detail: str = "") -> None:
    """Do `blocks` as Ray tasks, each writing its part; `progress` hears the queries of each
    block as it finishes (pairs/s and time left, as `run_blocks`)."""
    from elvis_cli.retrieval.job import block_meter

    with ray_cluster(executor) as ray:
        meter = block_meter(pairs, blocks, progress, detail)  # after the start-up

        def done(block: Block, _: None) -> None:
            advance = meter.counter(pairs, block.start)
            for _ in range(block.start, block.stop):
                advance()

        run_tasks(ray, executor, _rerank_block, (recipe, shortlist, job.digest), blocks, done)


@dataclass
class _WorkerRun:
    """A worker's side of a run, kept for its next block: files opened, model loaded."""

    stack: ExitStack
    block_reranker: BlockReranker
    job: RerankJob


_held: dict[str, _WorkerRun] = {}  # by the run's digest; at most one


def _rerank_block(recipe: BlockRecipe, shortlist: Shortlist, digest: str, block: Block
                  ) -> None:
    """A Ray task: re-rank `block` of the run `digest` names and write its part."""
    run = _worker_run(recipe, shortlist, digest)
    run.job.write_result(block, run.block_reranker(block.start, block.stop))


def _worker_run(recipe: BlockRecipe, shortlist: Shortlist, digest: str) -> _WorkerRun:
    """This worker's side of run `digest`, made once per run and checked to be the driver's
    run: a node that sees other files or weights is refused."""
    from elvis_cli.retrieval.job import RerankJob

    if digest in _held:
        return _held[digest]
    for other in _held.values():
        other.stack.close()
    _held.clear()
    stack = ExitStack()
    block_reranker = _open(stack, recipe, shortlist)
    job = RerankJob(recipe.output, block_reranker.identity(), recipe.num_queries,
                    recipe.config.block_size)
    if job.digest != digest:
        stack.close()
        raise InputError("a Ray worker sees other features, checkpoint or settings than the "
                         "command, or scores on another kind of device: every node needs the "
                         "same files at the same paths and the same elvis-cli, and the command "
                         "must run on a node with the workers' kind of device (CPU or GPU)")
    _held[digest] = _WorkerRun(stack, block_reranker, job)
    return _held[digest]


def _open(stack: ExitStack, recipe: BlockRecipe, shortlist: Shortlist) -> BlockReranker:
    from elvis_cli.features.released import released_gallery
    from elvis_cli.model.registry import load_reranker
    from elvis_cli.retrieval.files import open_pair
    from elvis_cli.retrieval.rerank import BlockReranker

    query_store, gallery_store, _ = stack.enter_context(
        open_pair(recipe.features, recipe.queries, recipe.gallery,
                  recipe.allow_external_sources, recipe.asymmetric))
    reranker = load_reranker(recipe.model, gallery_store, recipe.checkpoint, recipe.lam,
                             recipe.temperature)
    if recipe.released:
        gallery_store = released_gallery(query_store, gallery_store, shortlist)
    return BlockReranker(reranker, query_store, gallery_store, shortlist, recipe.config)
