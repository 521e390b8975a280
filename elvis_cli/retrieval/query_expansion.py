"""αQE, alpha query expansion (Radenović, Tolias, Chum, TPAMI 2018): a query's global
descriptor is pulled towards its nearest neighbours, so that a second search also finds the
views its first results share with it but not with the query."""

from __future__ import annotations

import numpy as np


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
