"""`elvis search`: new photos against an extracted gallery, in one call.

The photos are extracted as the gallery was (the backbone settings its file records), into a
features file that lives for this call only, then shortlisted and re-ranked by the engine of
`elvis rerank`. A photo searched here therefore scores exactly as it would once extracted with
`elvis extract` and re-ranked against the same gallery.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elvis_cli.features.images import collect_images
from elvis_cli.model.fusion import check_fusion
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.retrieval.result_files import (
    checked_output,
    openable_path,
    openable_paths,
    write_results,
)
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback, track

if TYPE_CHECKING:
    import pandas as pd

    from elvis_cli.features.store import FeatureStore
    from elvis_cli.model.fusion import Fusion
    from elvis_cli.model.reranker import RerankResult


@dataclass
class SearchRun:
    """`elvis search`: each query's ranking in the gallery, and what made it. Paths open as
    they are from the current directory (relative under it, else absolute)."""

    queries: list[str]  # the photos that were read, in the order given: the rows of `result`
    gallery_paths: list[str]  # every gallery image
    result: RerankResult  # each query's shortlist, re-ranked head first
    model: str
    label: str  # the checkpoint (ELViS) or the model's name
    fusion: Fusion
    output: Path | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (photo, why not read)

    @property
    def table(self) -> pd.DataFrame:
        """One row per (query, rank), as `elvis rerank` writes them."""
        from elvis_cli.retrieval.rerank import rerank_table

        return rerank_table(self.result, self.queries, self.gallery_paths)


def search_images(
    queries: str | Path | Sequence[str | Path], gallery: str | Path, *, model: str = "elvis",
    checkpoint: str | Path | None = None, lam: float | None = None,
    temperature: float | None = None, config: RerankConfig | None = None,
    output: str | Path | None = None, allow_external_sources: bool = False,
    query_image_size: int | None = None, progress: ProgressCallback | None = None,
) -> SearchRun:
    """Search photos (`queries`: image paths, folders or glob patterns) in `gallery`, a
    features file of `elvis extract`: extract them with its backbone settings, shortlist the
    top `config.shortlist` (exact global k-NN) and re-rank them with `model`, as `rerank_files`
    does; write the table to `output` (.csv or .parquet) when given. Photos that cannot be
    read are skipped and listed in `SearchRun.skipped`; none readable is an error.
    `query_image_size` extracts the photos at that longer side (px) instead of the gallery's,
    its other settings kept: asymmetric low-resolution queries, cheaper to extract and to
    re-rank (BENCHMARKS.md). `progress` hears the photos extracted ("extracting") and the
    queries re-ranked ("re-ranking")."""
    from elvis_cli.features.released import open_local

    config = config or RerankConfig()
    check_fusion(lam, temperature)
    if query_image_size is not None and query_image_size <= 0:
        raise InputError(f"query image size must be positive, got {query_image_size}")
    output = None if output is None else checked_output(output)  # checked before any work
    photos = _query_photos(queries)
    with open_local(gallery, allow_external_sources) as gallery_store:
        settings = gallery_store.backbone_settings
        if settings is None:
            raise InputError(f"{gallery}: records no backbone settings (not written by `elvis "
                             "extract`, e.g. released descriptors), so photos cannot be "
                             "extracted to match it; extract them yourself and run `elvis "
                             f"rerank --queries Q --gallery {gallery}`")
        if query_image_size is not None:
            settings = {**settings, "image_size": query_image_size}
        # the heavy modules only now that the inputs passed their checks
        from elvis_cli.model.registry import load_reranker
        from elvis_cli.retrieval.files import global_shortlist
        from elvis_cli.retrieval.rerank import rerank

        reranker = load_reranker(model, gallery_store, checkpoint, lam, temperature)
        with extracted_photos(photos, settings, config.device, progress) as (query_store,
                                                                             skipped):
            shortlist = global_shortlist(query_store, gallery_store, False, config.shortlist)
            result = rerank(reranker, query_store, gallery_store, shortlist, config,
                            progress=track(progress, "re-ranking", query_store.num_images))
            found = openable_paths(query_store)
        run = SearchRun(found, openable_paths(gallery_store), result, model, reranker.label,
                        reranker.fusion, output, skipped)
    if output is not None:
        write_results(run.table, output)
    return run


@contextmanager
def extracted_photos(photos: list[Path], settings: dict[str, Any] | None, device: str,
                     progress: ProgressCallback | None
                     ) -> Iterator[tuple[FeatureStore, list[tuple[str, str]]]]:
    """The photos extracted by `elvis extract`'s code with backbone `settings` (None: the
    default backbone), into a features file that lives for this call only, and those that
    could not be read (also `elvis explain`'s photos)."""
    from elvis_cli.backbones import backbone_from_settings, create_backbone
    from elvis_cli.features.extraction import ExtractConfig, extract_features
    from elvis_cli.features.store import FeatureStore

    with tempfile.TemporaryDirectory(prefix="elvis-search-") as folder:
        report = extract_features(photos, Path(folder) / "queries.h5",
                                  ExtractConfig(device=device),
                                  backbone=create_backbone() if settings is None
                                  else backbone_from_settings(settings), progress=progress)
        with FeatureStore.open(report.output) as store:
            store.temporary = True  # no embedding cache keeps these
            skipped = [(openable_path(store.root, name), reason)
                       for name, reason in report.failures]
            if not store.num_images:
                raise InputError("no photo could be read: " + "; ".join(
                    f"{photo} ({reason})" for photo, reason in skipped))
            yield store, skipped


def _query_photos(queries: str | Path | Sequence[str | Path]) -> list[Path]:
    """The photos named (paths, folders, `.txt` lists, glob patterns: collect_images), each
    once; a named path that is no image is skipped by extraction, which says why."""
    items = [queries] if isinstance(queries, (str, Path)) else list(queries)
    if not items:
        raise InputError("no photo to search for")
    photos = list(dict.fromkeys(collect_images(items)[1]))
    if not photos:
        raise InputError("no photo to search for")
    return photos
