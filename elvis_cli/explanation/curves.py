"""What a checkpoint learned (the ELViS paper's Fig. 3): f, which turns a vote into what it
adds to the raw score, and g, which turns a raw score into the training logit, as curves; on a
labelled set, the votes and raw scores of matching and non-matching pairs beneath them.

Both functions are one-dimensional, so sampling them says all there is to say about them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from elvis_cli.explanation.figures import checked_picture, pyplot, save_figure
from elvis_cli.model.fusion import Fusion
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from elvis_cli.model.elvis import Elvis

# votes lie in (0, 1] (a row of P' sums to at most 1); f changes most near 0: a log scale
SMALLEST_VOTE = 1e-3
SAMPLES = 400
PAIRS_PER_QUERY = 10


@dataclass
class LabelledVotes:
    """Votes of real descriptors and raw scores of a labelled set's pairs."""

    dataset: str
    features: str  # the gallery features file
    matching_votes: np.ndarray
    other_votes: np.ndarray
    matching_scores: np.ndarray  # one raw score per pair
    other_scores: np.ndarray


@dataclass
class CheckpointCurves:
    """f and g of a checkpoint, sampled, and optionally a labelled set's votes."""

    checkpoint: str
    fusion: Fusion
    votes: np.ndarray  # where f is sampled
    f: np.ndarray  # sigmoid(f(vote)): what one vote adds to the raw score
    raw_scores: np.ndarray  # where g is sampled
    g: np.ndarray  # sigmoid(g(raw)): the probability of a match training aimed at
    labelled: LabelledVotes | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "checkpoint": self.checkpoint, "lam": self.fusion.lam,
            "temp": self.fusion.temperature,
            "f": {"vote": self.votes.tolist(), "sigmoid_f": self.f.tolist()},
            "g": {"raw_score": self.raw_scores.tolist(), "sigmoid_g": self.g.tolist()}}
        if self.labelled is not None:
            data["labelled"] = {key: (value.tolist() if isinstance(value, np.ndarray)
                                      else value) for key, value in vars(self.labelled).items()}
        return data


def explain_checkpoint(checkpoint: str | Path | None = None, *,
                       features: str | Path | None = None, device: str = "cpu",
                       num_local: int | None = RerankConfig.num_local,
                       pairs_per_query: int = PAIRS_PER_QUERY) -> CheckpointCurves:
    """The learned f and g of `checkpoint` (default: the offline preset's; with `features`, the one
    matching them), and with `features` (a benchmark's features file, labelled.py) the votes
    and raw scores of its matching and non-matching pairs, as `elvis rerank` computes them."""
    import torch

    from elvis_cli.model.checkpoints import load_checkpoint
    from elvis_cli.model.presets import PRESETS
    from elvis_cli.util.devices import resolve_device

    if pairs_per_query <= 0:
        raise InputError(f"pairs per query must be positive, got {pairs_per_query}")
    if features is None:
        loaded = load_checkpoint(checkpoint or PRESETS["offline"].checkpoint)
        if loaded.architecture != "elvis":
            raise InputError(f"checkpoint {loaded.name!r} holds AMES weights, which have no f "
                             "and g (those are ELViS's)")
        model, name, fusion, labelled = loaded.model, loaded.name, loaded.fusion, None
        # scores reach twice the descriptors per image: those it was trained with, if known
        descriptors = ((loaded.backbone or {}).get("num_local") or num_local
                       or loaded.num_local)
    else:
        labelled, model, name, fusion, descriptors = _labelled_votes(
            checkpoint, features, device, num_local, pairs_per_query)
    votes = np.geomspace(SMALLEST_VOTE, 1.0, SAMPLES)
    raw_scores = np.geomspace(1.0, 2 * descriptors, SAMPLES)
    model = model.to(resolve_device(device))
    with torch.inference_mode():
        f = torch.sigmoid(model.f(_column(votes, model))).squeeze(-1).cpu().numpy()
        g = torch.sigmoid(model.logit(_column(raw_scores, model)[:, 0])).cpu().numpy()
    return CheckpointCurves(name, fusion, votes, f.astype(np.float64), raw_scores,
                            g.astype(np.float64), labelled)


def _column(values: np.ndarray, model: Elvis):
    import torch

    return torch.tensor(values, dtype=torch.float32, device=model.dust_bin.device)[:, None]


def _labelled_votes(checkpoint: str | Path | None, features: str | Path, device: str,
                    num_local: int | None, per_query: int
                    ) -> tuple[LabelledVotes, Elvis, str, Fusion, int]:
    """The labelled set's votes and scores, the model that made them, its name and fusion,
    and the descriptors used per image."""
    import torch

    from elvis_cli.explanation.embedding import embed_row
    from elvis_cli.explanation.labelled import labelled_pairs
    from elvis_cli.features.store import FeatureStore
    from elvis_cli.model.registry import load_reranker
    from elvis_cli.util.devices import resolve_device

    pairs = labelled_pairs(features, per_query)
    with FeatureStore.open(pairs.queries) as queries, FeatureStore.open(pairs.gallery) as gallery:
        reranker = load_reranker("elvis", gallery, checkpoint)
        num_local = reranker.local_count(num_local)
        model = reranker.model.to(resolve_device(device)).eval()
        where = model.dust_bin.device
        embedded = {("q", row): embed_row(model, queries, row, num_local, where)
                    for row in np.unique(np.concatenate([pairs.matching[:, 0],
                                                         pairs.other[:, 0]]))}
        embedded.update({("g", row): embed_row(model, gallery, row, num_local, where)
                         for row in np.unique(np.concatenate([pairs.matching[:, 1],
                                                              pairs.other[:, 1]]))})
        used = min(num_local or gallery.num_local, gallery.num_local)
    sides = []
    for chosen in (pairs.matching, pairs.other):
        votes, scores = [], []
        for query, row in chosen:
            src, tgt = embedded["q", query], embedded["g", row]
            with torch.inference_mode():
                transport = model.transport(src.embedded, tgt.embedded)
            real = ~np.concatenate([src.padding, tgt.padding])
            votes.append(transport.votes.float().cpu().numpy()[real])
            scores.append(float(transport.confidences.sum()))
        sides.append((np.concatenate(votes) if votes else np.zeros(0), np.array(scores)))
    (matching_votes, matching_scores), (other_votes, other_scores) = sides
    return (LabelledVotes(pairs.dataset, str(pairs.gallery), matching_votes, other_votes,
                          matching_scores, other_scores),
            model, reranker.label, reranker.fusion, used)


def draw_checkpoint_curves(curves: CheckpointCurves, output: Path, *,
                           svg: bool = False) -> Path:
    """f and g as curves, the labelled set's distributions beneath them, as a PNG (and an SVG
    beside it), written atomically."""
    output = checked_picture(output)
    return save_figure(curves_figure(curves), output, svg, dpi=100)


def curves_figure(curves: CheckpointCurves) -> Figure:
    plt = pyplot()
    labelled = curves.labelled
    rows = 1 if labelled is None else 2
    figure, axes = plt.subplots(rows, 2, figsize=(10, 3.6 * rows), squeeze=False,
                                sharex="col")
    for axis, x, y, label, xlabel in (
            (axes[0, 0], curves.votes, curves.f, "f: sigmoid(f(vote)), what one vote adds",
             "vote (a descriptor's best value in P')"),
            (axes[0, 1], curves.raw_scores, curves.g, "g: sigmoid(g(raw)), the match "
             "probability training aimed at", "raw score")):
        axis.plot(x, y, linewidth=2)
        axis.set_xscale("log")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3, which="both")
        if labelled is None:
            axis.set_xlabel(xlabel)
    if labelled is not None:
        for axis, (matching, other), xlabel, edges in (
                (axes[1, 0], (labelled.matching_votes, labelled.other_votes),
                 "vote (a descriptor's best value in P')", curves.votes),
                (axes[1, 1], (labelled.matching_scores, labelled.other_scores), "raw score",
                 curves.raw_scores)):
            bins = np.geomspace(edges[0], edges[-1], 50)
            for values, name in ((matching, "matching pairs"), (other, "non-matching pairs")):
                axis.hist(np.clip(values, edges[0], edges[-1]), bins=bins, density=False,
                          weights=np.full(len(values), 1 / max(len(values), 1)), alpha=0.55,
                          label=f"{name} ({len(values)})")
            axis.set_xscale("log")
            axis.set_xlabel(xlabel)
            axis.set_ylabel("share")
            axis.legend(fontsize=8)
            axis.grid(alpha=0.3, which="both")
        axes[1, 0].set_title(f"{labelled.dataset}: votes of real descriptors", fontsize=10)
        axes[1, 1].set_title(f"{labelled.dataset}: raw score per pair", fontsize=10)
    figure.suptitle(f"checkpoint {curves.checkpoint} (lam {curves.fusion.lam:g}, temp "
                    f"{curves.fusion.temperature:g})", fontsize=11)
    figure.tight_layout()
    return figure
