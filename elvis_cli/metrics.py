"""Scoring rules of the instance-retrieval benchmarks (revisitop mAP, mAP@k, recall@k).

Every function takes rankings as (Q, N) arrays of gallery indices, best first. A ranking may be
shorter than the gallery (only a shortlist was ranked): positives that do not appear in it
count as never retrieved, which is what the official tools do with a truncated ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from elvis_cli.errors import InputError

# Which protocol names score a dataset of each ground-truth flavour (see datasets.py).
EVAL_PROTOCOLS: dict[str, tuple[str, ...]] = {"revisitop": ("medium", "hard"), "ok-junk": ("ok",)}

_EMPTY = np.empty(0, dtype=np.int64)


def _ints(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def protocol_junk(gnd_entry: Mapping[str, Any], protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, junk) gallery indices of one query under `protocol`.

    One definition serves both scoring and re-ranking, which moves junk out of the shortlist
    before spending model calls on it (spec §5): medium = easy+hard vs junk, hard = hard vs
    junk+easy, ok = ok vs junk (INSTRE-style ground truth).
    """
    keys = {
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
        "ok": (("ok",), ("junk",)),
    }
    if protocol not in keys:
        raise InputError(f"unknown protocol '{protocol}'; use one of {', '.join(keys)}")
    positive_keys, junk_keys = keys[protocol]
    missing = [key for key in positive_keys if key not in gnd_entry]
    if missing:
        raise InputError(f"protocol '{protocol}' needs '{missing[0]}' in the ground truth")
    positives = np.concatenate([_ints(gnd_entry[key]) for key in positive_keys])
    junk = [_ints(gnd_entry[key]) for key in junk_keys if key in gnd_entry]
    return positives, np.concatenate([_EMPTY, *junk])


def compute_ap(ranks_of_positives: np.ndarray, num_positives: int) -> float:
    """Average precision by the revisitop trapezoidal rule, as a fraction in [0, 1].

    `ranks_of_positives` are the sorted 0-based positions of the retrieved positives after junk
    removal; each recall step of 1/num_positives adds the mean of the precision just before
    and just after that positive (precision before the first rank counts as 1).
    """
    if num_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    ranks = np.asarray(ranks_of_positives, dtype=np.float64).reshape(-1)
    found = np.arange(len(ranks), dtype=np.float64)
    before = np.divide(found, ranks, out=np.ones_like(ranks), where=ranks > 0)
    after = (found + 1) / (ranks + 1)
    return float(np.sum(before + after) / (2 * num_positives))


def _as_ranking(ranking: Any, num_queries: int) -> np.ndarray:
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or ranking.shape[0] != num_queries:
        raise InputError(
            f"expected a ranking of shape ({num_queries}, N) for {num_queries} queries, "
            f"got {ranking.shape}"
        )
    return ranking.astype(np.int64, copy=False)


def _positive_positions(row: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions of positives in `row` once junk is taken out of it.

    An index listed as both positive and junk stays a positive.
    """
    kept = row[~np.isin(row, np.setdiff1d(junk, positives))]
    return np.flatnonzero(np.isin(kept, positives))


def _summary(aps: np.ndarray, what: str) -> dict[str, Any]:
    scored = aps[~np.isnan(aps)]
    if scored.size == 0:
        raise InputError(f"cannot compute {what}: no query has a positive")
    return {"map": float(scored.mean()), "aps": aps}


def revisitop_map(
    ranking: Any, ground_truth: Sequence[Mapping[str, Any]], protocol: str = "medium"
) -> dict[str, Any]:
    """mAP (percent) under the revisitop Medium or Hard protocol, plus per-query APs.

    Returns {"map": float, "aps": (Q,) array in percent, NaN for queries without positives,
    which are left out of the mean}.
    """
    ranking = _as_ranking(ranking, len(ground_truth))
    aps = np.full(len(ground_truth), np.nan)
    for q, entry in enumerate(ground_truth):
        positives, junk = protocol_junk(entry, protocol)
        if positives.size:
            positions = _positive_positions(ranking[q], positives, junk)
            aps[q] = 100.0 * compute_ap(positions, positives.size)
    return _summary(aps, f"{protocol} mAP")


def revisitop_scores(
    ranking_medium: Any, ranking_hard: Any, ground_truth: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Medium, Hard and their mean (the headline number); the two rankings differ when
    re-ranking was done per protocol, and may be the same array otherwise."""
    medium = revisitop_map(ranking_medium, ground_truth, "medium")["map"]
    hard = revisitop_map(ranking_hard, ground_truth, "hard")["map"]
    return {"map_medium": medium, "map_hard": hard, "map": (medium + hard) / 2}


def map_at_k(
    ranking: Any,
    positives: Sequence[Any],
    junk: Sequence[Any] | None = None,
    k: int | None = 100,
) -> dict[str, Any]:
    """Non-interpolated AP over the top k after junk removal, normalised by min(#positives, k).

    The INSTRE / GLDv2 / Product1M rule; k=None ranks the whole list (class-labelled sets).
    Returns {"map": percent, "aps": (Q,) percent, NaN for queries without positives}.
    """
    ranking = _as_ranking(ranking, len(positives))
    aps = np.full(len(positives), np.nan)
    for q, query_positives in enumerate(positives):
        pos = _ints(query_positives)
        if pos.size == 0:
            continue
        query_junk = _EMPTY if junk is None else _ints(junk[q])
        positions = _positive_positions(ranking[q], pos, query_junk)
        if k is not None:
            positions = positions[positions < k]
        precision_at_hits = np.arange(1, positions.size + 1) / (positions + 1)
        normaliser = pos.size if k is None else min(pos.size, k)
        aps[q] = 100.0 * precision_at_hits.sum() / normaliser
    return _summary(aps, "mAP@k")


def recall_at_k(
    ranking: Any, positives: Sequence[Any], k: int, junk: Sequence[Any] | None = None
) -> float:
    """Percent of queries (with at least one positive) that find a positive in their top k."""
    ranking = _as_ranking(ranking, len(positives))
    hits = []
    for q, query_positives in enumerate(positives):
        pos = _ints(query_positives)
        if pos.size:
            query_junk = _EMPTY if junk is None else _ints(junk[q])
            positions = _positive_positions(ranking[q], pos, query_junk)
            hits.append(bool(positions.size) and positions[0] < k)
    if not hits:
        raise InputError("cannot compute recall@k: no query has a positive")
    return 100.0 * float(np.mean(hits))


GLDV2_PRIVATE_QUERIES = 750  # GLDv2-test: the last 750 queries are the private split


def gldv2_scores(ranking: Any, positives: Sequence[Any], k: int = 100) -> dict[str, float]:
    """mAP@k of GLDv2-test's private split (the headline), public split and all queries.

    A split without any query that has a positive is NaN rather than an error, so a small
    test set still reports the splits it has.
    """
    aps = map_at_k(ranking, positives, None, k)["aps"]
    split = max(len(aps) - GLDV2_PRIVATE_QUERIES, 0)

    def mean(values: np.ndarray) -> float:
        scored = values[~np.isnan(values)]
        return float(scored.mean()) if scored.size else float("nan")

    return {f"map@{k}_private": mean(aps[split:]), f"map@{k}_public": mean(aps[:split]),
            f"map@{k}": mean(aps)}


def class_ground_truth(
    query_labels: Sequence[Any], gallery_labels: Sequence[Any], queries_in_gallery: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(positives, junk) per query for class-labelled sets (SOP, RP2K, MET).

    With `queries_in_gallery` (SOP, RP2K) query q is gallery row q: it is junk to itself, and
    its positives are the other images of its class. Otherwise (MET) the positives are the
    gallery images of its class, so AP is normalised by the class size.
    """
    gallery = np.asarray(gallery_labels)
    positives, junk = [], []
    for q, label in enumerate(query_labels):
        same = np.flatnonzero(gallery == label)
        own = np.array([q] if queries_in_gallery else [], dtype=np.int64)
        positives.append(np.setdiff1d(same, own))
        junk.append(own)
    return positives, junk


def class_scores(ranking: Any, positives: Sequence[Any], junk: Sequence[Any]) -> dict[str, float]:
    """AP over the whole ranked gallery, recall@1 and recall@5 (ELVIS_SPEC §6, class labels)."""
    return {"map": map_at_k(ranking, positives, junk, None)["map"],
            "recall@1": recall_at_k(ranking, positives, 1, junk),
            "recall@5": recall_at_k(ranking, positives, 5, junk)}
