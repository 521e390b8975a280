"""GSS_V (Liu et al., NeurIPS 2019): GSS on a k-NN graph whose edges a local re-ranker has
verified. Each proposed edge, an image and one of its top-k gallery neighbours by global
similarity, is scored by the re-ranker through the re-ranking engine, and stays only where
the re-ranker's fused score (Reranker.fuse: the scale its own ranking uses, so one threshold
reads the same for every re-ranker's fusion) reaches PostConfig.gss_verify_threshold."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from elvis_cli.retrieval.config import PostConfig, RerankConfig
from elvis_cli.retrieval.gss import EdgeFilter
from elvis_cli.retrieval.shortlist import Shortlist
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback, track

if TYPE_CHECKING:
    from elvis_cli.retrieval.post import LocalFeatures


def reranker_edge_filter(local: LocalFeatures, config: PostConfig | None = None,
                         progress: ProgressCallback | None = None) -> EdgeFilter:
    """The edges of GSS's k-NN graph that re-ranker `config.gss_verifier` verifies, for rows of
    `local.queries` or of `local.gallery` against `local.gallery`. `progress` hears each row
    verified ("verifying GSS edges")."""
    from elvis_cli.model.registry import load_reranker, reranker_class
    from elvis_cli.retrieval.rerank import rerank

    config = config or PostConfig()
    if not reranker_class(config.gss_verifier).scores_pairs:
        raise InputError(f"--gss-verifier {config.gss_verifier} scores no pairs; name a local "
                         "re-ranker (elvis, ames, chamfer, sv)")
    queries, gallery = local.queries, local.gallery
    reranker = load_reranker(config.gss_verifier, gallery, local.checkpoint)

    def verified(neighbours: np.ndarray, similarities: np.ndarray, of_queries: bool
                 ) -> np.ndarray:
        candidates = neighbours.astype(np.int64)
        if not of_queries:  # an image is no edge of its own: not scored, dropped
            candidates[candidates == np.arange(len(candidates))[:, None]] = -1
        shortlist = Shortlist(candidates, similarities.astype(np.float32))
        scoring = replace(local.scoring or RerankConfig(), shortlist=candidates.shape[1])
        result = rerank(reranker, queries if of_queries else gallery, gallery, shortlist,
                        scoring, track(progress, "verifying GSS edges", len(candidates)))
        with np.errstate(invalid="ignore"):
            passed = result.scores >= config.gss_verify_threshold  # NaN (not scored): dropped
        # the result is re-sorted by score: find each proposed edge in it
        return ((neighbours[:, :, None] == result.indices[:, None, :])
                & passed[:, None, :]).any(axis=2)

    return verified
