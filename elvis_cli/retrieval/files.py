"""The `elvis` commands on features files, each one call: `extract_images` (extraction, then
optionally the embedding cache), `shortlist_files` and `rerank_files` (one features file
all-vs-all, or a query/gallery pair; ours or the authors' released files).

What a command prints is what these return; progress leaves only as events (util/progress.py).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from elvis_cli.features.extraction import ExtractConfig, ExtractReport, extract_features
from elvis_cli.model.fusion import check_fusion
from elvis_cli.retrieval.config import PostConfig, RerankConfig
from elvis_cli.retrieval.index_choice import IndexConfig, check_index, plan_index
from elvis_cli.retrieval.post import (
    LocalFeatures,
    PostReport,
    check_global_post,
    post_processed_shortlist,
)
from elvis_cli.retrieval.ray_runner import BlockRecipe, run_blocks_on_ray
from elvis_cli.retrieval.result_files import (
    checked_output,
    openable_paths,
    write_results_streamed,
)
from elvis_cli.retrieval.shortlist import (
    SHORTLIST_SUFFIXES,
    Shortlist,
    load_shortlist,
    save_shortlist,
    store_shortlist,
)
from elvis_cli.util.atomic import writable_output
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback
from elvis_cli.util.ray_cluster import RayExecutor, check_cluster

if TYPE_CHECKING:
    import pandas as pd

    from elvis_cli.features.store import DescriptorStore, FeatureStore
    from elvis_cli.model.fusion import Fusion
    from elvis_cli.model.reranker import RerankResult
    from elvis_cli.retrieval.job import JobReport
    from elvis_cli.retrieval.saved_index import GalleryIndex


@dataclass
class CachedEmbeddings:
    """What filling an embedding cache did: images embedded now, their bytes, by whom, where."""

    count: int
    size_bytes: int
    label: str  # the re-ranker's checkpoint
    folder: Path


@dataclass
class ExtractRun:
    """`elvis extract`: the extraction's report, and the embedding cache filled after it."""

    report: ExtractReport
    embedded: CachedEmbeddings | None = None


@dataclass
class RerankRun:
    """`elvis rerank`: the fused ranking (one row per query and rank) and what made it. The
    ranking is read a block of queries at a time (`tables`: from the parts of a run written
    to a file, so that it never needs to fit in memory); `table` holds it whole."""

    tables: Callable[[], Iterator[pd.DataFrame]]  # the ranking's pieces, in query order
    rows: int
    model: str
    label: str  # the checkpoint (ELViS) or the model's name
    fusion: Fusion
    output: Path | None
    post: PostReport | None = None  # the global post-processing before re-ranking, if any
    job: JobReport | None = None  # what a run written to a file kept of an earlier one
    index: GalleryIndex | None = None  # the index the shortlists came from (None: given)

    @property
    def table(self) -> pd.DataFrame:
        """The whole ranking in one table, in memory."""
        import pandas as pd

        pieces = list(self.tables())
        pieces = [piece for piece in pieces if len(piece)] or pieces[:1]
        return pieces[0] if len(pieces) == 1 else pd.concat(pieces, ignore_index=True)


@dataclass
class ShortlistRun(Shortlist):
    """`elvis shortlist`: the shortlist, and the global post-processing and index that made
    it."""

    post: PostReport | None = None
    index: GalleryIndex | None = None


def extract_images(
    source: str | Path | Sequence[str | Path], output: str | Path,
    config: ExtractConfig | None = None, *, force: bool = False,
    embedding_cache: Path | None = None, checkpoint: str | Path | None = None,
    progress: ProgressCallback | None = None, executor: RayExecutor | None = None,
) -> ExtractRun:
    """Extract `source` into `output`, or bring it up to date: only new, changed and damaged
    images are extracted, removed ones are left out (see `extract_features`; `force` starts
    over). `source` is a folder, .txt list, glob or image, or several of them (what a shell
    makes of an unquoted glob); a single path that does not exist is an error. With
    `embedding_cache`, then keep the ELViS embeddings of every image there (`checkpoint`, by
    default the one matching the backbone), so that re-ranking does not compute them.
    `executor` extracts the shards as tasks on a Ray cluster, into the same files."""
    config = config or ExtractConfig()
    if not isinstance(source, (str, Path)) and len(source) == 1:
        source = source[0]
    report = extract_features(source, output, config, progress=progress, force=force,
                              executor=executor)
    embedded = None
    if embedding_cache is not None:
        embedded = fill_embedding_cache(report.output, embedding_cache, checkpoint,
                                        config.device)
    return ExtractRun(report, embedded)


def fill_embedding_cache(features: str | Path, folder: Path, checkpoint: str | Path | None = None,
                         device: str = "auto") -> CachedEmbeddings:
    """Embed (ELViS) every image of a features file that the cache `folder` lacks."""
    from elvis_cli.features.store import FeatureStore
    from elvis_cli.model.registry import load_reranker
    from elvis_cli.retrieval.rerank import cache_embeddings

    with FeatureStore.open(features) as store:
        reranker = load_reranker("elvis", store, checkpoint)
        count, size = cache_embeddings(reranker, store,
                                       RerankConfig(device=device, embedding_cache=folder))
    return CachedEmbeddings(count, size, reranker.label, Path(folder))


@contextmanager
def open_pair(features: str | Path | None = None, queries: str | Path | None = None,
              gallery: str | Path | None = None, allow_external_sources: bool = False,
              asymmetric: bool = False
              ) -> Iterator[tuple[FeatureStore, FeatureStore, bool]]:
    """(queries, gallery, same file): one features file all-vs-all, or a query/gallery pair
    (ours or released local files) whose descriptors can be compared, closed afterwards;
    `asymmetric` lets the queries be extracted at a smaller image size than the gallery."""
    from elvis_cli.features.released import open_local

    if (queries is None) != (gallery is None):
        raise InputError("--queries and --gallery go together")
    if queries is None:
        if features is None:
            raise InputError("name a features file, or --queries and --gallery")
        if asymmetric:
            raise InputError("--asymmetric needs --queries and --gallery: one features file "
                             "has one image size")
        queries = gallery = features
    with ExitStack() as stack:
        query_store = stack.enter_context(open_local(queries, allow_external_sources))
        same = Path(gallery) == Path(queries)
        if same:
            gallery_store = query_store
        else:
            gallery_store = stack.enter_context(open_local(gallery, allow_external_sources))
            _check_alike(query_store, gallery_store, asymmetric)
        yield query_store, gallery_store, same


ASYMMETRIC_SETTING = "image_size"  # the one backbone setting asymmetric queries may change


def _check_alike(queries: DescriptorStore, gallery: DescriptorStore,
                 asymmetric: bool = False) -> None:
    """Refuse queries and a gallery extracted differently: descriptors of other backbone
    settings are not comparable, and those of other dimensions not even multipliable. Files
    without settings (the authors' releases) are compared by their dimensions.

    `asymmetric` (asked for, never guessed) accepts exactly one difference, queries extracted
    at a smaller image size (RAML's low-resolution queries); any other difference, or queries
    larger than the gallery (files swapped?), is still refused."""
    mine, wanted = queries.backbone_settings, gallery.backbone_settings
    if asymmetric and (mine is None or wanted is None):
        raise InputError(f"--asymmetric: {queries.path if mine is None else gallery.path} "
                         "records no backbone settings, so its image size is unknown")
    if mine is not None and wanted is not None and mine != wanted:
        differing = sorted(key for key in {*mine, *wanted} if mine.get(key) != wanted.get(key))
        differences = ", ".join(f"{key} {mine.get(key, '-')} vs {wanted.get(key, '-')}"
                                for key in differing)
        only_size = differing == [ASYMMETRIC_SETTING]
        smaller = only_size and _smaller(mine.get(ASYMMETRIC_SETTING),
                                         wanted.get(ASYMMETRIC_SETTING))
        if not (asymmetric and smaller):
            remedy = "extract the queries as the gallery was"
            if asymmetric and only_size:
                remedy = "--asymmetric takes queries extracted smaller than the gallery"
            elif asymmetric:
                remedy += " (--asymmetric allows only the image size to differ)"
            elif smaller:
                remedy += ", or pass --asymmetric for queries made smaller on purpose"
            raise InputError(f"{queries.path} and {gallery.path} were extracted with different "
                             f"backbone settings ({differences}): {remedy}")
    if queries.binarised == gallery.binarised and queries.local_dim != gallery.local_dim:
        raise InputError(f"{queries.path} holds {queries.local_dim}-d local descriptors and "
                         f"{gallery.path} {gallery.local_dim}-d: they come from different "
                         "backbones")


def _smaller(query_size: object, gallery_size: object) -> bool:
    return (isinstance(query_size, int) and isinstance(gallery_size, int)
            and query_size < gallery_size)


def _check_features_exist(features: str | Path | None, queries: str | Path | None) -> None:
    """A missing all-vs-all features file (`feats.h5` by default, in the current folder) is
    most often features not extracted yet: say how to make them, or how to name another."""
    if queries is None and features is not None and not Path(features).exists():
        extract = f"elvis extract IMAGES -o {shlex.quote(str(features))}"
        if Path(features).parent == Path("."):
            raise InputError(f"no {features} here: extract features first ({extract}) or name "
                             "a file with --features")
        raise InputError(f"{features}: features file not found; extract features first "
                         f"({extract})")


def global_shortlist(queries: DescriptorStore, gallery: DescriptorStore, same: bool, k: int,
                     global_type: str = "cls", post: str = "none",
                     post_config: PostConfig | None = None,
                     progress: ProgressCallback | None = None,
                     rerank_config: RerankConfig | None = None,
                     checkpoint: str | Path | None = None,
                     index: IndexConfig | None = None) -> ShortlistRun:
    """Global k-NN of the queries in the gallery by the faiss index `index` names (exact for
    small galleries by default, index_choice.py), or exact after global post-processing `post`
    (retrieval/post.py) if not none, `progress` hearing its epochs (GSS), an index's build and
    gss-v's edges scored as `rerank_config` places them, with `checkpoint`; the same file
    excludes each image from its own list."""
    index = index or IndexConfig()
    if post == "none":
        shortlist, found = store_shortlist(queries, gallery, same, k, global_type, index,
                                           progress)
        return ShortlistRun(**vars(shortlist), index=found)
    plan = plan_index(index, gallery.num_images, gallery.global_dim or 0)
    if not plan.exact:
        raise InputError(f"--post {post} searches the gallery exactly, and index {plan.name} "
                         f"is approximate ({plan.reason}): pass --index flat")
    query_descriptors = queries.global_descriptors(global_type)
    gallery_descriptors = gallery.global_descriptors(global_type)
    shortlist, report = post_processed_shortlist(query_descriptors, gallery_descriptors, k,
                                                 same, post, post_config, progress,
                                                 LocalFeatures(queries, gallery, rerank_config,
                                                               checkpoint))
    return ShortlistRun(**vars(shortlist), post=report)


def shortlist_files(
    features: str | Path | None = None, *, queries: str | Path | None = None,
    gallery: str | Path | None = None, k: int = 100, output: str | Path | None = None,
    global_type: str = "cls", allow_external_sources: bool = False, asymmetric: bool = False,
    post: str = "none", post_config: PostConfig | None = None,
    progress: ProgressCallback | None = None, index: IndexConfig | None = None,
) -> ShortlistRun:
    """`elvis shortlist`: the global top `k` of every query by the faiss index `index` names
    (global_shortlist), or after global post-processing `post` (none, aqe, gss, gss-v;
    parameters in `post_config`; `progress` hears GSS's training epochs and an index's
    build), written to `output` (.npz) when given; `asymmetric`: queries extracted smaller
    than the gallery (open_pair)."""
    check_global_post(post)
    index = index or IndexConfig()
    check_index(index)
    _check_features_exist(features, queries)
    if output is not None:
        output = writable_output(output, SHORTLIST_SUFFIXES)  # checked before any work
    with open_pair(features, queries, gallery, allow_external_sources, asymmetric) as (
            query_store, gallery_store, same):
        result = global_shortlist(query_store, gallery_store, same, k, global_type, post,
                                  post_config, progress, index=index)
    if output is not None:
        save_shortlist(output, result)
    return result


def rerank_files(
    features: str | Path | None = None, *, queries: str | Path | None = None,
    gallery: str | Path | None = None, candidates: str | Path | None = None,
    model: str = "elvis", checkpoint: str | Path | None = None, lam: float | None = None,
    temperature: float | None = None, config: RerankConfig | None = None,
    output: str | Path | None = None, allow_external_sources: bool = False,
    asymmetric: bool = False, progress: ProgressCallback | None = None, post: str = "none",
    post_config: PostConfig | None = None, index: IndexConfig | None = None,
    executor: RayExecutor | None = None,
) -> RerankRun:
    """`elvis rerank`: re-rank each query's shortlist (`candidates`: a .npz of ours or an
    official nn_*.pkl; built on the fly when None) with re-ranker `model`, and write the table
    to `output` (.csv, .parquet or .jsonl, see result_files) when given, its image paths
    openable from the current folder. A run with an `output` resumes: it is done in parts of
    `config.block_size` queries kept in `OUTPUT.parts/` (job.py), and the same call again
    skips the blocks done (another run's parts are deleted: `RerankRun.job` says which).
    Released files get their image names from the ground truth beside them. `asymmetric`
    accepts queries extracted smaller than the gallery (open_pair). `progress` hears the
    queries re-ranked ("re-ranking", with pairs per second and the time left). `post` (none, aqe,
    gss, gss-v) post-processes the global search first: the post-processed ranking and its
    similarities are what is re-ranked and fused. Shortlists built here come from the faiss
    index `index` names (global_shortlist). `executor` runs the blocks as tasks on a Ray
    cluster (ray_runner.py; needs `output`), with the same result to the bit."""
    config = config or RerankConfig()
    check_fusion(lam, temperature)
    check_global_post(post)
    index = index or IndexConfig()
    check_index(index)
    if post != "none" and candidates is not None:
        raise InputError(f"--post {post} searches again, so it needs the shortlist built here: "
                         "leave out --candidates, or make them with `elvis shortlist --post`")
    if candidates is not None and index != IndexConfig():
        raise InputError("--index, --nprobe and --ef-search make the shortlist built here: "
                         "leave out --candidates, or make them with `elvis shortlist --index`")
    _check_features_exist(features, queries)
    output = None if output is None else checked_output(output)  # checked before any work
    if executor is not None:
        if output is None:
            raise InputError("--ray: the workers write their parts beside the output, so it "
                             "needs one (-o)")
        check_cluster(executor)
    with open_pair(features, queries, gallery, allow_external_sources, asymmetric) as (
            query_store, gallery_store, same):
        from elvis_cli.features.released import released_gallery
        from elvis_cli.model.registry import load_reranker
        from elvis_cli.retrieval.job import Block, RerankJob, held, run_blocks
        from elvis_cli.retrieval.rerank import BlockReranker, rerank_table

        reranker = load_reranker(model, gallery_store, checkpoint, lam, temperature)
        post_report = found_index = None
        if candidates is not None:
            candidate_list = load_shortlist(Path(candidates))
            gallery_store = released_gallery(query_store, gallery_store, candidate_list)
        else:
            candidate_list = global_shortlist(query_store, gallery_store, same, config.shortlist,
                                              post=post, post_config=post_config,
                                              progress=progress, rerank_config=config,
                                              checkpoint=checkpoint, index=index)
            post_report, found_index = candidate_list.post, candidate_list.index
        rerank_block = BlockReranker(reranker, query_store, gallery_store, candidate_list,
                                     config)
        paths = openable_paths(query_store), openable_paths(gallery_store)
        num_queries, job = query_store.num_images, None
        if output is None:
            results: list[RerankResult] = []
            run_blocks(rerank_block, rerank_block.pairs_per_query(), [Block(0, 0, num_queries)],
                       lambda _, result: results.append(result), progress)
            table = rerank_table(results[0], *paths)
            tables, rows = (lambda: iter([table])), len(table)
        else:
            parts = RerankJob(output, rerank_block.identity(), num_queries, config.block_size)
            with held(parts, output) as job:
                if executor is None:
                    run_blocks(rerank_block, rerank_block.pairs_per_query(), parts.todo(),
                               parts.write_result, progress, job.summary())
                else:
                    recipe = BlockRecipe(
                        features, queries, gallery, allow_external_sources, asymmetric,
                        candidates is not None, model, checkpoint, lam, temperature, config,
                        output, num_queries)
                    run_blocks_on_ray(executor, recipe, candidate_list, parts,
                                      rerank_block.pairs_per_query(), parts.todo(), progress,
                                      job.summary())
                rows = write_results_streamed(parts.tables(*paths), output)
            tables = partial(parts.tables, *paths)
    return RerankRun(tables, rows, model, reranker.label, reranker.fusion, output, post_report,
                     job, found_index)
