"""αQE, alpha query expansion (Radenović, Tolias, Chum, TPAMI 2018): a query's global
descriptor is pulled towards its nearest neighbours, so that a second search also finds the
views its first results share with it but not with the query."""

from __future__ import annotations

import numpy as np

from elvis_cli.retrieval.shortlist import build_shortlist


def alpha_query_expansion(queries: np.ndarray, gallery: np.ndarray, neighbours: np.ndarray,
                          similarities: np.ndarray, alpha: float) -> np.ndarray:
    """Each query replaced by the L2-normalised sum of itself (weight 1) and its
    `neighbours` (gallery rows, -1 for none) weighted by similarity^`alpha`; a negative
    similarity weighs nothing."""
    valid = neighbours >= 0
    weights = np.clip(similarities.astype(np.float64), 0.0, None) ** alpha
    weights = np.where(valid, weights, 0.0)
    rows = gallery[np.where(valid, neighbours, 0)].astype(np.float64)
    expanded = queries.astype(np.float64) + np.einsum("qn,qnd->qd", weights, rows)
    norms = np.linalg.norm(expanded, axis=1, keepdims=True)
    return (expanded / np.maximum(norms, 1e-12)).astype(np.float32)


def expand_reranked(queries: np.ndarray, gallery: np.ndarray, ranking: np.ndarray, n: int,
                    alpha: float) -> np.ndarray:
    """αQE after re-ranking: each query expanded with its top `n` of `ranking` (gallery rows,
    best first; the re-ranker's choice, weighted by their global similarity^`alpha`), then
    the whole gallery searched again; those `n` stay first, in their re-ranked order, the
    rest follow in the expanded query's order."""
    head = ranking[:, :n]
    similarities = np.einsum("qd,qnd->qn", queries, gallery[np.where(head >= 0, head, 0)])
    expanded = alpha_query_expansion(queries, gallery, head, similarities, alpha)
    again = build_shortlist(expanded, gallery, gallery.shape[0]).indices
    return np.stack([np.concatenate([top, row[~np.isin(row, top)]])
                     for top, row in zip(head, again, strict=True)])
