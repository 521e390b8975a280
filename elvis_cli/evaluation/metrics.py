"""Scoring rules of the retrieval benchmarks, as the authors' `compute_metrics` applies them
(ELVIS_SPEC §6, pavelsuma/ELViS `elvis/utils/revisited.py`).

One scorer per kind of ground truth, the only ones evaluation runs (run.score_rankings):
`revisitop_scores` (Medium and Hard), `ok_junk_scores` (INSTRE, Product1M, ILIAS; training's
validation too), `gldv2_scores` (private, public, all) and `class_scores` (SOP, RP2K, MET). They
share `ranked_hits`, `average_precisions` and `recall`.

Every function takes rankings as (Q, N) arrays of gallery indices, best first, -1 padding a
short list. Each query's list is first cut to its first `map_k` entries (None: the whole list)
and only then is junk taken out of the cut list, so junk inside the cut costs the slots it
holds and a positive beyond the cut never counts. AP is normalised by min(#positives, length of
the cut list), recall@k is read on the positions left after junk removal, and queries without
a positive are NaN and left out of every mean. A positive missing from a shortlist counts as
never retrieved. Each scorer fills an optional `query_aps` dict with the per-query APs of each
protocol, the very values its mAP is the mean of (evaluate's per-query results).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from elvis_cli.util.errors import InputError

# The evaluation protocols of each kind of ground truth (RetrievalDataset.ground_truth_kind):
# revisitop's Medium and Hard, and "ok" (positives `ok`, junk `junk`) for every other kind.
PROTOCOLS: dict[str, tuple[str, ...]] = {"revisitop": ("medium", "hard"), "ok-junk": ("ok",),
                                         "class": ("ok",), "gldv2": ("ok",)}
OK_JUNK_RECALLS = (1, 10, 100)  # what the authors report for INSTRE and Product1M
CLASS_TOP_K = 100  # class-labelled sets: AP over the top 100 (the authors' map_k)
CLASS_RECALLS = (1, 5)
CLASS_AP_AT = 5

_EMPTY = np.empty(0, dtype=np.int64)


def _ints(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def protocols_of(ground_truth_kind: str) -> tuple[str, ...]:
    """The protocols a ground truth of this kind is scored by (each needs its own re-ranking,
    since its junk differs)."""
    if ground_truth_kind not in PROTOCOLS:
        raise InputError(f"unknown kind of ground truth '{ground_truth_kind}'; "
                         f"use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[ground_truth_kind]


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


def rectangular_ap(ranks_of_positives: np.ndarray, normaliser: int) -> float:
    """Non-interpolated AP, a fraction: the precision at each positive, summed, / normaliser."""
    if normaliser <= 0:
        raise ValueError("average precision needs at least one positive")
    ranks = np.asarray(ranks_of_positives, dtype=np.float64).reshape(-1)
    return float(np.sum(np.arange(1, len(ranks) + 1) / (ranks + 1)) / normaliser)


@dataclass(frozen=True)
class RankedHits:
    """Where each query's positives land once its list is cut to map_k and junk is removed."""

    positions: tuple[np.ndarray, ...]  # sorted 0-based positions in the junk-free cut list
    cut_lengths: np.ndarray  # (Q,) entries in the cut list, junk included
    num_positives: np.ndarray  # (Q,) 0 for a query that is left out of every mean


def _as_ranking(ranking: Any, num_queries: int) -> np.ndarray:
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or ranking.shape[0] != num_queries:
        raise InputError(
            f"expected a ranking of shape ({num_queries}, N) for {num_queries} queries, "
            f"got {ranking.shape}"
        )
    return ranking.astype(np.int64, copy=False)


def ranked_hits(ranking: Any, positives: Sequence[Any], junk: Sequence[Any] | None = None,
                map_k: int | None = None) -> RankedHits:
    """Cut each list to its first `map_k` entries, then drop its junk (compute_metrics, then
    compute_map); an index listed as both positive and junk stays a positive."""
    ranking = _as_ranking(ranking, len(positives))
    positions, lengths, counts = [], [], []
    for q, query_positives in enumerate(positives):
        pos = _ints(query_positives)
        listed = ranking[q][ranking[q] >= 0]
        cut = listed if map_k is None else listed[:map_k]
        query_junk = _EMPTY if junk is None else _ints(junk[q])
        kept = cut[~np.isin(cut, np.setdiff1d(query_junk, pos))]
        positions.append(np.flatnonzero(np.isin(kept, pos)))
        lengths.append(len(cut))
        counts.append(pos.size)
    return RankedHits(tuple(positions), np.asarray(lengths), np.asarray(counts))


def _scored(hits: RankedHits) -> np.ndarray:
    return np.flatnonzero(hits.num_positives > 0)


def _percent_mean(values: np.ndarray, what: str) -> float:
    scored = values[~np.isnan(values)]
    if scored.size == 0:
        raise InputError(f"cannot compute {what}: no query has a positive")
    return float(scored.mean())


def average_precisions(hits: RankedHits, trapezoidal: bool = False) -> np.ndarray:
    """(Q,) AP in percent, normalised by min(#positives, cut length); NaN without positives."""
    ap = compute_ap if trapezoidal else rectangular_ap
    aps = np.full(len(hits.positions), np.nan)
    for q in _scored(hits):
        normaliser = min(hits.num_positives[q], hits.cut_lengths[q])
        aps[q] = 100.0 * ap(hits.positions[q], normaliser) if hits.positions[q].size else 0.0
    return aps


def ap_at(hits: RankedHits, k: int) -> float:
    """Mean AP@k in percent (class-labelled sets): precision at each positive in the top k,
    summed, / min(k, #positives)."""
    aps = np.full(len(hits.positions), np.nan)
    for q in _scored(hits):
        top = hits.positions[q][hits.positions[q] < k]
        aps[q] = 100.0 * rectangular_ap(top, min(k, hits.num_positives[q]))
    return _percent_mean(aps, f"AP@{k}")


def recall(hits: RankedHits, k: int) -> float:
    """Percent of queries with a positive among the first k junk-free entries of the cut list."""
    found = [hits.positions[q].size > 0 and hits.positions[q][0] < k for q in _scored(hits)]
    return _percent_mean(100.0 * np.asarray(found, dtype=np.float64), f"recall@{k}")


def revisitop_map(ranking: Any, ground_truth: Sequence[Mapping[str, Any]],
                  protocol: str = "medium", map_k: int | None = None) -> dict[str, Any]:
    """mAP (percent) under the revisitop Medium or Hard protocol, plus per-query APs.

    Trapezoidal AP; map_k None is the authors' unlimited cut for ROxford/RParis. Returns
    {"map": float, "aps": (Q,) array in percent, NaN for queries without positives}.
    """
    split = [protocol_junk(entry, protocol) for entry in ground_truth]
    positives, junk = [pos for pos, _ in split], [junk for _, junk in split]
    aps = average_precisions(ranked_hits(ranking, positives, junk, map_k), trapezoidal=True)
    return {"map": _percent_mean(aps, f"{protocol} mAP"), "aps": aps}


QueryAps = dict[str, np.ndarray]  # protocol -> (Q,) AP in percent, NaN without positives


def _keep(query_aps: QueryAps | None, **aps: np.ndarray) -> None:
    if query_aps is not None:
        query_aps.update(aps)


def revisitop_scores(ranking_medium: Any, ranking_hard: Any,
                     ground_truth: Sequence[Mapping[str, Any]],
                     query_aps: QueryAps | None = None) -> dict[str, float]:
    """Medium, Hard and their mean (the headline number); the two rankings differ when
    re-ranking was done per protocol, and may be the same array otherwise."""
    medium = revisitop_map(ranking_medium, ground_truth, "medium")
    hard = revisitop_map(ranking_hard, ground_truth, "hard")
    _keep(query_aps, medium=medium["aps"], hard=hard["aps"])
    return {"map": (medium["map"] + hard["map"]) / 2, "map_medium": medium["map"],
            "map_hard": hard["map"]}


def ok_junk_scores(ranking: Any, positives: Sequence[Any], junk: Sequence[Any],
                   map_k: int | None = 100, query_aps: QueryAps | None = None
                   ) -> dict[str, float]:
    """INSTRE / Product1M (and other ok/junk sets): mAP@map_k (map_k None: the whole list) and
    recall@1, @10, @100."""
    hits = ranked_hits(ranking, positives, junk, map_k)
    aps = average_precisions(hits)
    _keep(query_aps, ok=aps)
    return {"map": _percent_mean(aps, f"mAP@{map_k}"),
            **{f"recall@{k}": recall(hits, k) for k in OK_JUNK_RECALLS}}


def gldv2_scores(ranking: Any, positives: Sequence[Any], junk: Sequence[Any] | None,
                 splits: Mapping[str, np.ndarray], map_k: int | None = 100,
                 query_aps: QueryAps | None = None) -> dict[str, float]:
    """mAP@map_k of the private split (`map`, the headline), the public one and all queries.

    `splits` names query rows (RetrievalDataset.splits: the loaders of both GLDv2 layouts set
    them). A split with no query that has a positive is NaN rather than an error, so a small
    test set still reports the splits it has.
    """
    if "private" not in splits:
        raise InputError("GLDv2 scoring needs the query rows of its private split")
    aps = average_precisions(ranked_hits(ranking, positives, junk, map_k))
    _keep(query_aps, ok=aps)

    def mean(rows: np.ndarray | None) -> float:
        values = aps[np.asarray(rows if rows is not None else [], dtype=np.int64)]
        scored = values[~np.isnan(values)]
        return float(scored.mean()) if scored.size else float("nan")

    return {"map": mean(splits.get("private")), "map_public": mean(splits.get("public")),
            "map_all": mean(np.arange(len(aps)))}


def _without(ranking: np.ndarray, excluded: Sequence[Any]) -> np.ndarray:
    """Each row with its excluded entries taken out and the rest moved up, -1 padded."""
    out = np.full(ranking.shape, -1, dtype=np.int64)
    for q, row in enumerate(ranking):
        kept = row[~np.isin(row, _ints(excluded[q]))]
        out[q, : len(kept)] = kept
    return out


def class_scores(ranking: Any, positives: Sequence[Any], own_rows: Sequence[Any],
                 query_aps: QueryAps | None = None) -> dict[str, float]:
    """SOP, RP2K, MET (the authors' `mean_average_precision`): AP over the top 100 normalised by
    min(100, #positives), AP@5, recall@1 and recall@5.

    The query's own gallery row is taken out of its list before the cut, so it neither counts
    nor takes one of the 100 slots. The authors' nn lists for these sets hold no query (their
    #positives = class size - 1 assumes so); if one of theirs did, their mask would count the
    query as a hit, which is not reproduced here.
    """
    ranking = _as_ranking(ranking, len(positives))
    hits = ranked_hits(_without(ranking, own_rows), positives, None, CLASS_TOP_K)
    aps = average_precisions(hits)
    _keep(query_aps, ok=aps)
    return {"map": _percent_mean(aps, f"mAP@{CLASS_TOP_K}"),
            f"ap@{CLASS_AP_AT}": ap_at(hits, CLASS_AP_AT),
            **{f"recall@{k}": recall(hits, k) for k in CLASS_RECALLS}}
