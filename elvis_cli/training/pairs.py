"""Training pairs from a pool of views: positives share an instance, negatives do not. Either a
share of the negatives are the views the global descriptor confuses most (ours), or both are
drawn from the anchor's global ranking (the authors')."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from elvis_cli.training.pool import ViewPool
from elvis_cli.util.errors import InputError


@dataclass(frozen=True)
class RankedNeighbours:
    """Each view's globally nearest other views, what each is to it, and the views that can
    anchor a ranked pair."""

    candidates: int
    neighbours: np.ndarray  # (N, c) view rows, nearest first
    similarities: np.ndarray  # (N, c) float64
    kinds: np.ndarray  # (N, c) 1 positive, 0 negative, -1 neither (backdrop-related or sim <= 0)
    anchors: np.ndarray  # views with at least one positive and one negative neighbour

    @classmethod
    def of(cls, pool: ViewPool, candidates: int) -> RankedNeighbours:
        similarity = pool.global_desc @ pool.global_desc.T
        similarity.fill_diagonal_(-torch.inf)
        top = similarity.topk(min(candidates, len(pool) - 1), dim=1)
        neighbours, similarities = top.indices.numpy(), top.values.double().numpy()
        rows = np.arange(len(pool))[:, None]
        same = pool.instance[neighbours] == pool.instance[rows]
        kinds = np.where(same, 1, np.where(pool.related(rows, neighbours), -1, 0))
        kinds = np.where(similarities > 0, kinds, -1)
        anchors = np.flatnonzero((kinds == 1).any(axis=1) & (kinds == 0).any(axis=1))
        if len(anchors) == 0:
            raise InputError("no view has both a positive and a negative among its nearest "
                             "views: use more views per image or more photos")
        return cls(candidates, neighbours, similarities, kinds, anchors)


class PairSampler:
    """Balanced pairs from a pool: positives share an instance, negatives do not."""

    def __init__(self, pool: ViewPool, hard_pool: int) -> None:
        self.pool = pool
        self.instance = pool.instance
        self.partners = _positive_partners(pool)
        self.anchors = np.flatnonzero([len(partners) > 0 for partners in self.partners])
        if len(self.anchors) == 0:
            raise InputError(
                "no positive pairs: every instance has a single view (use views per image >= 2 "
                "or label several photos with the same instance id)"
            )
        if len(np.unique(self.instance)) < 2:
            raise InputError("no negative pairs: all readable photos are one instance")
        self.hard = _hardest_negatives(pool, hard_pool)
        self.ranked: RankedNeighbours | None = None  # made on first use

    def sample(
        self, rng: np.random.Generator, positives: int, negatives: int, hard_fraction: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source rows, target rows, labels) with `positives` matching pairs first."""
        pos_src = rng.choice(self.anchors, size=positives)
        pos_tgt = np.array([rng.choice(self.partners[row]) for row in pos_src], dtype=np.int64)
        neg_src = rng.integers(0, len(self.instance), size=negatives)
        hard = round(negatives * hard_fraction)
        neg_tgt = np.empty(negatives, dtype=np.int64)
        neg_tgt[:hard] = self.hard[neg_src[:hard], rng.integers(0, self.hard.shape[1], size=hard)]
        neg_tgt[hard:] = self._other_instance(rng, neg_src[hard:])
        labels = np.concatenate([np.ones(positives), np.zeros(negatives)]).astype(np.float32)
        return np.concatenate([pos_src, neg_src]), np.concatenate([pos_tgt, neg_tgt]), labels

    def sample_ranked(
        self, rng: np.random.Generator, anchors: int, candidates: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The authors' mining: per anchor, one positive and one negative among its
        `candidates` globally nearest views with positive similarity, each drawn with weight
        similarity^3, so the pairs the shortlist holds high are seen most. `anchors` pairs of
        each kind, positives first."""
        if self.ranked is None or self.ranked.candidates != candidates:
            self.ranked = RankedNeighbours.of(self.pool, candidates)
        ranked = self.ranked
        src = rng.choice(ranked.anchors, size=anchors)
        positive, negative = np.empty(anchors, np.int64), np.empty(anchors, np.int64)
        for pair, anchor in enumerate(src):
            for chosen, kind in ((positive, ranked.kinds[anchor] == 1),
                                 (negative, ranked.kinds[anchor] == 0)):
                weights = ranked.similarities[anchor][kind] ** 3
                chosen[pair] = rng.choice(ranked.neighbours[anchor][kind],
                                          p=weights / weights.sum())
        labels = np.concatenate([np.ones(anchors), np.zeros(anchors)]).astype(np.float32)
        return np.concatenate([src, src]), np.concatenate([positive, negative]), labels

    def _other_instance(self, rng: np.random.Generator, sources: np.ndarray) -> np.ndarray:
        targets = rng.integers(0, len(self.instance), size=len(sources))
        clash = self.pool.related(sources, targets)
        while clash.any():
            targets[clash] = rng.integers(0, len(self.instance), size=int(clash.sum()))
            clash = self.pool.related(sources, targets)
        return targets


def _positive_partners(pool: ViewPool) -> list[np.ndarray]:
    """Other views of each view's instance, preferring views of other photos when there are."""
    partners = []
    for row in range(len(pool)):
        same = (pool.instance == pool.instance[row]) & (np.arange(len(pool)) != row)
        other_photo = same & (pool.photo != pool.photo[row])
        partners.append(np.flatnonzero(other_photo if other_photo.any() else same))
    return partners


def _hardest_negatives(pool: ViewPool, count: int) -> np.ndarray:
    """(N, count) the globally most similar unrelated views, per view."""
    rows = np.arange(len(pool))
    hardest, unrelated = [], len(pool)
    for start in range(0, len(pool), 1024):
        block = rows[start : start + 1024]
        related = pool.related(block[:, None], rows[None, :])
        unrelated = min(unrelated, int((~related).sum(axis=1).min()))
        similarity = pool.global_desc[block] @ pool.global_desc.T
        similarity.masked_fill_(torch.from_numpy(related), -torch.inf)
        hardest.append(similarity.topk(min(count, len(pool)), dim=1).indices)
    if unrelated < 1:
        raise InputError("no negative pairs: every view shares an instance with every other")
    return torch.cat(hardest)[:, : min(count, unrelated)].numpy()
