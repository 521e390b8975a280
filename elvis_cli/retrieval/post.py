"""Global post-processing of a shortlist, before any local re-ranking: the global search done
again on descriptors that αQE (query_expansion.py) or GSS (gss.py; GSS_V on a graph verified
by a local re-ranker, gss_verification.py) have improved. The re-rankers then see the
post-processed ranking, and its similarities as the global score."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from elvis_cli.retrieval.config import (
    AFTER_RERANKING,
    PostConfig,
    RerankConfig,
    check_post_methods,
)
from elvis_cli.retrieval.shortlist import Shortlist, build_shortlist
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback

if TYPE_CHECKING:
    from pathlib import Path

    from elvis_cli.features.store import DescriptorStore
    from elvis_cli.model.checkpoints import Checkpoint


@dataclass
class PostReport:
    """What a post-processing did: its name, its time, and GSS's training loss per epoch."""

    method: str
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


@dataclass
class LocalFeatures:
    """What gss-v's verifier reads and how it scores, as the run's own re-ranking would: the
    queries' and gallery's stores, the engine's placement (device, batch, local rows) and the
    run's checkpoint (None: the one matching the features; re-rankers without one ignore it)."""

    queries: DescriptorStore
    gallery: DescriptorStore
    scoring: RerankConfig | None = None
    checkpoint: str | Path | Checkpoint | None = None


def check_global_post(method: str) -> None:
    """A known post-processing of the global search: αQE after re-ranking is evaluate's."""
    check_post_methods([method])
    if method == AFTER_RERANKING:
        raise InputError(f"--post {method} is offered by `elvis evaluate` only; here use none, "
                         "aqe, gss or gss-v")


def post_processed_shortlist(queries: np.ndarray, gallery: np.ndarray, k: int,
                             exclude_self: bool, method: str = "none",
                             config: PostConfig | None = None,
                             progress: ProgressCallback | None = None,
                             local: LocalFeatures | None = None
                             ) -> tuple[Shortlist, PostReport]:
    """The global top `k` of every query after post-processing `method` (none, aqe, gss,
    gss-v); `exclude_self` (queries are the gallery) keeps each image out of its own list.
    `progress` hears GSS's training epochs. gss-v verifies GSS's edges with `local`."""
    check_global_post(method)
    config = config or PostConfig()
    started = time.perf_counter()
    losses: list[float] = []
    if method == "aqe":
        first = build_shortlist(queries, gallery, config.aqe_n, exclude_self)
        from elvis_cli.retrieval.query_expansion import alpha_query_expansion

        queries = alpha_query_expansion(queries, gallery, first.indices, first.similarities,
                                        config.aqe_alpha)
    elif method in ("gss", "gss-v"):
        from elvis_cli.retrieval.gss import guided_similarity_separation

        edge_filter = None
        if method == "gss-v":
            if local is None:
                raise InputError("--post gss-v verifies edges with local features, and none "
                                 "were given")
            from elvis_cli.retrieval.gss_verification import reranker_edge_filter

            edge_filter = reranker_edge_filter(local, config, progress)
        result = guided_similarity_separation(None if exclude_self else queries, gallery, config,
                                              progress, edge_filter)
        queries, gallery, losses = result.queries, result.gallery, result.losses
    shortlist = build_shortlist(queries, gallery, k, exclude_self)
    return shortlist, PostReport(method, time.perf_counter() - started, losses)
