"""Validation after each round: pair accuracy, global vs re-ranked mAP on held-out views, and
the search for the fusion of model and global scores that re-ranks them best."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from elvis_cli.evaluation.metrics import ok_junk_scores
from elvis_cli.model.elvis import Elvis
from elvis_cli.model.reranker import Fusion, fuse_and_sort
from elvis_cli.retrieval.shortlist import Shortlist, build_shortlist
from elvis_cli.training.config import VAL_PAIRS, TrainConfig
from elvis_cli.training.pairs import PairSampler
from elvis_cli.training.pool import ViewPool, raw_scores

# Fusion grid searched on the validation set; the paper's (0.5, 0.5) comes first so that it wins
# ties. See `choose_fusion` for why the temperature has to be searched at all.
FUSION_GRID = tuple(
    sorted(
        ((lam, temperature) for lam in (0.25, 0.5, 0.75)
         for temperature in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)),
        key=lambda point: point != (0.5, 0.5),
    )
)

# Streams of the seeded generators, so that training views, validation views and pair draws

@dataclass
class ValidationSet:
    """A fixed pool of validation views with everything the per-round evaluation reuses."""

    pool: ViewPool
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # balanced (src, tgt, label)
    ranking: Shortlist  # every view against all other views, by global similarity
    positives: list[np.ndarray]  # other views of each view's instance
    junk: list[np.ndarray]  # views sharing only a backdrop's content: left out of the ranking
    top: int  # re-ranked shortlist length

    @classmethod
    def build(cls, pool: ViewPool, config: TrainConfig) -> ValidationSet:
        sampler = PairSampler(pool, config.hard_negative_pool)
        half = config.val_pairs // 2
        rng = np.random.default_rng([config.seed, VAL_PAIRS])
        pairs = sampler.sample(rng, half, half, config.hard_negative_fraction)
        ranking = build_shortlist(pool.global_desc.numpy(), pool.global_desc.numpy(),
                                  len(pool) - 1, exclude_self=True)
        rows = np.arange(len(pool))
        positives, junk = [], []
        for row in rows:
            same = (pool.instance == pool.instance[row]) & (rows != row)
            positives.append(np.flatnonzero(same))
            junk.append(np.flatnonzero(pool.related(row, rows) & ~same & (rows != row)))
        return cls(pool, pairs, ranking, positives, junk, min(config.rerank_top, len(pool) - 1))


def validate(
    model: Elvis, val: ValidationSet, device: torch.device
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Round metrics (pair accuracy and loss, global vs re-ranked mAP) and the fusion grid."""
    src, tgt, labels = val.pairs
    pair_raw = torch.from_numpy(raw_scores(model, val.pool, src, tgt, device))
    with torch.inference_mode():
        logits = model.logit(pair_raw.to(device)).cpu()
    targets = torch.from_numpy(labels)
    metrics = {
        "val_loss": float(F.binary_cross_entropy_with_logits(logits, targets)),
        "val_accuracy": float(((logits > 0).float() == targets).float().mean()),
        "val_raw_positive": float(pair_raw[targets > 0].mean()),
        "val_raw_negative": float(pair_raw[targets == 0].mean()),
        "val_map_global": mean_ap(val.ranking.indices, val.positives, val.junk),
    }
    head = val.ranking.indices[:, : val.top]
    queries = np.repeat(np.arange(len(val.pool)), val.top)
    raw = np.full(val.ranking.indices.shape, np.nan, dtype=np.float32)
    raw[:, : val.top] = raw_scores(model, val.pool, queries, head.reshape(-1), device).reshape(
        head.shape
    )
    grid = fusion_grid(val, raw)
    best = choose_fusion(grid)
    metrics.update(val_map=best["val_map"], lam=best["lam"], temperature=best["temperature"],
                   val_map_default=grid[0]["val_map"])
    return metrics, grid


def mean_ap(ranking: np.ndarray, positives: list[np.ndarray], junk: list[np.ndarray]) -> float:
    """mAP (percent) over the whole ranking, each query's AP normalised by its positives: the
    ok/junk benchmarks' scoring without their cut."""
    return float(ok_junk_scores(ranking, positives, junk, map_k=None)["map"])


def fusion_grid(val: ValidationSet, raw: np.ndarray) -> list[dict[str, float]]:
    """Re-ranked val mAP for every point of FUSION_GRID."""
    grid = []
    for lam, temperature in FUSION_GRID:
        fused = fuse_and_sort(val.ranking.indices, val.ranking.similarities, raw, val.top,
                              Fusion(lam, temperature))
        grid.append({"lam": lam, "temperature": temperature,
                     "val_map": mean_ap(fused.indices, val.positives, val.junk)})
    return grid


def choose_fusion(grid: list[dict[str, float]]) -> dict[str, float]:
    """The grid point with the best val mAP (the first, i.e. the paper's, on ties).

    The fusion is searched rather than fixed at the paper's (0.5, 0.5) because the raw score is
    a count of confident votes that ranges up to m + n: once a model casts a few dozen confident
    votes for every shortlisted image, sigmoid(0.5 * raw) is 1.0 for all of them, the model term
    no longer separates anything and the re-ranked order falls back to the global one. The right
    temperature depends on the scale of raw scores a given model produces on given features.
    """
    return max(grid, key=lambda point: point["val_map"])
