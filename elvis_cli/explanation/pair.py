"""Why one pair scored as it did (the ELViS paper's Fig. 4): its strongest correspondences
before optimal transport (the similarity S) and after it (the votes of the plan P'), every
descriptor's dustbin gain, and the raw score taken apart vote by vote.

ELViS's raw score is a sum over single descriptors: each one's best value in P' (its vote,
whose maximum lies at one descriptor of the other image) adds sigmoid(f(vote)). So the score
splits exactly into contributions of single correspondences, which is what is drawn.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from elvis_cli.explanation.figures import (
    checked_picture,
    descriptor_grid,
    display_pixels,
    pyplot,
    save_figure,
    side_by_side,
)
from elvis_cli.model.fusion import Fusion, check_fusion
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from elvis_cli.features.store import FeatureStore
    from elvis_cli.model.elvis_reranker import ElvisReranker

TOP_CORRESPONDENCES = 25  # lines drawn per panel, as in the paper's figure
# lower edges of the contribution ranges the raw score is broken down by
CONTRIBUTION_EDGES = (0.0, 0.1, 0.5, 0.9)


@dataclass(frozen=True)
class Correspondence:
    """A query and a gallery descriptor (slots of their images) and what links them: the
    similarity S, or a vote's contribution sigmoid(f(vote))."""

    query: int
    gallery: int
    value: float


@dataclass
class ExplainedImage:
    """One side of a pair: its photo and its descriptors as ELViS used them."""

    path: str  # the photo, as it opens from the current folder
    features: str | None  # the features file it was read from; None: extracted for this call
    index: int | None  # its row in `features`
    positions: np.ndarray  # (k, 2) row, column of each descriptor slot, fractions of the photo
    gains: np.ndarray  # (k,) dustbin gain h: high sends the descriptor's mass to the dustbin
    padding: np.ndarray  # (k,) True for padding slots, which take no part

    def to_json(self) -> dict[str, Any]:
        real = ~self.padding
        return {"path": self.path, "features": self.features, "index": self.index,
                "descriptors": int(real.sum()),
                "positions": np.round(self.positions[real], 5).tolist(),
                "gains": np.round(self.gains[real], 6).tolist()}


@dataclass(frozen=True)
class ContributionRange:
    """The votes whose contribution lies in [low, high) (the last range includes 1)."""

    low: float
    high: float
    votes: int
    total: float  # their summed contribution to the raw score


@dataclass
class PairExplanation:
    """Why `gallery` scored as it did for `query` (explain_pair)."""

    query: ExplainedImage
    gallery: ExplainedImage
    checkpoint: str
    fusion: Fusion
    global_score: float  # inner product of the global descriptors
    raw_score: float  # as `elvis rerank` computes it for this pair
    votes: np.ndarray  # (m + n,) each query slot's best value in P', then each gallery slot's
    targets: np.ndarray  # (m + n,) the slot of the other image where that best value lies
    contributions: np.ndarray  # (m + n,) sigmoid(f(vote)), 0 for padding: sums to raw_score
    similarity_matches: list[Correspondence]  # strongest S entries, strongest first
    vote_matches: list[Correspondence]  # strongest votes (contribution), strongest first

    @property
    def score(self) -> float:
        """The fused score: lam * global + (1 - lam) * sigmoid(temp * raw)."""
        import torch

        return float(self.fusion(torch.tensor(self.global_score, dtype=torch.float64),
                                 torch.tensor(self.raw_score, dtype=torch.float64)))

    @property
    def counted_votes(self) -> int:
        """Votes of real (non-padding) descriptors: those the raw score sums."""
        return int((~self.query.padding).sum() + (~self.gallery.padding).sum())

    def ranges(self) -> list[ContributionRange]:
        """How many votes contribute how much, by CONTRIBUTION_EDGES."""
        real = ~np.concatenate([self.query.padding, self.gallery.padding])
        values = self.contributions[real].astype(np.float64)
        bins = np.digitize(values, CONTRIBUTION_EDGES[1:])
        edges = [*CONTRIBUTION_EDGES, 1.0]
        return [ContributionRange(edges[b], edges[b + 1], int((bins == b).sum()),
                                  float(values[bins == b].sum()))
                for b in range(len(CONTRIBUTION_EDGES))]

    @property
    def drawn_total(self) -> float:
        """What the votes for the drawn correspondences (vote_matches; a mutual one has two)
        add to the raw score."""
        query_slot, gallery_slot = vote_ends(self.targets, len(self.query.padding))
        drawn = {(match.query, match.gallery) for match in self.vote_matches}
        chosen = [(int(q), int(g)) in drawn for q, g in zip(query_slot, gallery_slot,
                                                             strict=True)]
        return float(np.sum(self.contributions[np.array(chosen, dtype=bool)], dtype=np.float64))

    @property
    def top_share(self) -> float:
        """The share of the raw score that the votes for the drawn correspondences make."""
        total = float(np.sum(self.contributions, dtype=np.float64))
        return self.drawn_total / total if total else 0.0

    def breakdown(self) -> list[str]:
        """What the raw score is made of, and the fused score: the picture's text panel and
        what `elvis explain` prints."""
        fusion = self.fusion
        where = [image.path + (f" (row {image.index} of {image.features})" if image.features
                               else " (extracted for this run)")
                 for image in (self.query, self.gallery)]
        lines = [f"query   {where[0]}", f"gallery {where[1]}",
                 f"checkpoint {self.checkpoint}: raw score {self.raw_score:.2f} = the sum of "
                 f"{self.counted_votes} votes' contributions sigmoid(f(vote))"]
        for part in self.ranges():
            share = part.total / self.raw_score if self.raw_score else 0.0
            lines.append(f"  contributing {part.low:.1f}-{part.high:.1f}: {part.votes:5d} votes, "
                         f"{part.total:8.2f} ({share:6.1%})")
        lines.append(f"  votes for the {len(self.vote_matches)} correspondences drawn: "
                     f"{self.drawn_total:.2f} ({self.top_share:.1%} of the raw score)")
        lines.append(f"fused score {self.score:.4f} = lam {fusion.lam:g} x global "
                     f"{self.global_score:.4f} + {1 - fusion.lam:g} x sigmoid(temp "
                     f"{fusion.temperature:g} x raw {self.raw_score:.2f})")
        return lines

    def to_json(self) -> dict[str, Any]:
        def matches(items: list[Correspondence]) -> list[dict[str, Any]]:
            return [{"query": m.query, "gallery": m.gallery, "value": round(m.value, 6),
                     "query_position": np.round(self.query.positions[m.query], 5).tolist(),
                     "gallery_position": np.round(self.gallery.positions[m.gallery],
                                                  5).tolist()}
                    for m in items]

        return {
            "query": self.query.to_json(), "gallery": self.gallery.to_json(),
            "checkpoint": self.checkpoint, "lam": self.fusion.lam,
            "temp": self.fusion.temperature, "global_score": self.global_score,
            "raw_score": self.raw_score, "score": self.score, "votes": self.counted_votes,
            "contributions_sum": float(np.sum(self.contributions, dtype=np.float64)),
            "ranges": [vars(r) for r in self.ranges()],
            "drawn_votes_total": self.drawn_total, "drawn_votes_share": self.top_share,
            "correspondences_before_transport": matches(self.similarity_matches),
            "correspondences_after_transport": matches(self.vote_matches),
        }


class PairExplainer:
    """Explains pairs of the same features files with the files opened and the checkpoint
    loaded once (a results page explains dozens of pairs); closed on leaving its `with`.

    Each image is one of its features file (`features` for the query, `gallery_features`,
    default `features`, for the gallery image) given by row index, stored name or path, or a
    photo file, which is then extracted with that file's backbone settings (with no features
    file: the default backbone). The checkpoint, fusion and `num_local` descriptors used are
    those of `elvis rerank` with the same options, so `raw_score` is the score it gives."""

    def __init__(self, *, features: str | Path | None = None,
                 gallery_features: str | Path | None = None,
                 checkpoint: str | Path | None = None, device: str = "cpu",
                 lam: float | None = None, temperature: float | None = None,
                 num_local: int | None = RerankConfig.num_local,
                 top: int = TOP_CORRESPONDENCES, allow_external_sources: bool = False) -> None:
        check_fusion(lam, temperature)
        if top <= 0:
            raise InputError(f"correspondences drawn must be positive, got {top}")
        self.files = [features, gallery_features if gallery_features is not None else features]
        self.checkpoint, self.device, self.lam, self.temperature = (checkpoint, device, lam,
                                                                    temperature)
        self.num_local, self.top = num_local, top
        self.allow_external_sources = allow_external_sources
        self._stack = ExitStack()
        self._stores: list[FeatureStore | None] | None = None
        self._reranker: ElvisReranker | None = None

    def __enter__(self) -> PairExplainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()
        self._stores, self._reranker = None, None

    def __call__(self, query: str | int | Path, gallery: str | int | Path, output: Path
                 ) -> Path:
        """The pair's picture drawn into `output` (what a results page links to)."""
        return draw_pair_explanation(self.explain(query, gallery), output)

    def explain(self, query: str | int | Path, gallery: str | int | Path) -> PairExplanation:
        """Why `gallery` scored as it did for `query`."""
        import torch

        from elvis_cli.explanation.embedding import embed_row
        from elvis_cli.features.released import open_local
        from elvis_cli.model.registry import load_reranker
        from elvis_cli.util.devices import resolve_device

        if self._stores is None:
            self._stores = [None if path is None else self._stack.enter_context(
                open_local(path, self.allow_external_sources)) for path in self.files]
        with ExitStack() as photos:  # photos extracted for this pair only
            sides = [_located(item, store, self.device, photos)
                     for item, store in zip((query, gallery), self._stores, strict=True)]
            if self._reranker is None:  # every gallery side has one descriptor space
                self._reranker = load_reranker("elvis", sides[1].store, self.checkpoint,
                                               self.lam, self.temperature)
                self._reranker.model.to(resolve_device(self.device)).eval()
            model, count = self._reranker.model, self._reranker.local_count(self.num_local)
            src, tgt = (embed_row(model, side.store, side.row, count, model.dust_bin.device)
                        for side in sides)
            with torch.inference_mode():
                raw_score = float(model.score(src.embedded, tgt.embedded)[0])
                transport = model.transport(src.embedded, tgt.embedded)
            global_score = float(sides[0].store.global_row(sides[0].row)
                                 @ sides[1].store.global_row(sides[1].row))
        query_image, gallery_image = (
            ExplainedImage(side.path, side.features, None if side.features is None else side.row,
                           image.positions, image.gains, image.padding)
            for side, image in zip(sides, (src, tgt), strict=True))
        plan = transport.plan.float().cpu().numpy()
        targets = np.concatenate([plan.argmax(axis=1), plan.argmax(axis=0)])
        votes = transport.votes.float().cpu().numpy()
        contributions = transport.confidences.float().cpu().numpy()
        return PairExplanation(
            query_image, gallery_image, self._reranker.label, self._reranker.fusion,
            global_score, raw_score, votes, targets, contributions,
            strongest_similarities(transport.similarity.float().cpu().numpy(), self.top),
            strongest_votes(votes, contributions, targets, query_image.padding,
                            gallery_image.padding, self.top))


def explain_pair(query: str | int | Path, gallery: str | int | Path, **options: Any
                 ) -> PairExplanation:
    """Explain the ELViS score of `gallery` for `query`; `options` are PairExplainer's (which
    says how images are named), for one pair."""
    with PairExplainer(**options) as explainer:
        return explainer.explain(query, gallery)


@dataclass
class _Side:
    """Where one image of the pair is read from."""

    store: FeatureStore
    row: int
    path: str  # the photo, as it opens from the current folder
    features: str | None  # the features file named; None: extracted for this call


def _located(item: str | int | Path, store: FeatureStore | None, device: str,
             stack: ExitStack) -> _Side:
    """`item` in `store`, or extracted (for as long as `stack` lasts) to be compared with it."""
    from elvis_cli.retrieval.result_files import openable_path
    from elvis_cli.retrieval.search import extracted_photos

    row = None if store is None else _row_of(store, item)
    if row is None:
        settings = _extraction_settings(store, item)
        store, _ = stack.enter_context(extracted_photos([Path(str(item))], settings, device,
                                                        None))
        row = 0
    name = store.paths[row]
    return _Side(store, row, name if store.root is None else openable_path(store.root, name),
                 None if store.temporary else str(store.path))


def strongest_similarities(similarity: np.ndarray, top: int) -> list[Correspondence]:
    """The `top` largest finite entries of S (m, n), largest first (ties: first slot first)."""
    flat = similarity.ravel()
    finite = np.flatnonzero(np.isfinite(flat))
    order = finite[np.lexsort((finite, -flat[finite]))][:top]
    columns = similarity.shape[1]
    return [Correspondence(int(i // columns), int(i % columns), float(flat[i])) for i in order]


def strongest_votes(votes: np.ndarray, contributions: np.ndarray, targets: np.ndarray,
                    query_padding: np.ndarray, gallery_padding: np.ndarray,
                    top: int) -> list[Correspondence]:
    """The `top` correspondences that the strongest votes of real descriptors link, each once
    with its strongest vote's contribution. A query slot's vote lies at a gallery slot and a
    gallery slot's at a query slot; a correspondence both ends vote for (a mutual one) is
    drawn once. Votes rank by contribution, then by the vote itself, then query votes first.
    A vote whose maximum lies on padding (an image without a real descriptor) links nothing."""
    query_slot, gallery_slot = vote_ends(targets, len(query_padding))
    linked = ~query_padding[query_slot] & ~gallery_padding[gallery_slot]
    candidates = np.flatnonzero(linked)
    order = candidates[np.lexsort((candidates, -votes[candidates],
                                   -contributions[candidates]))]
    matches: dict[tuple[int, int], Correspondence] = {}
    for vote in order:
        ends = int(query_slot[vote]), int(gallery_slot[vote])
        if ends not in matches:
            matches[ends] = Correspondence(*ends, float(contributions[vote]))
            if len(matches) == top:
                break
    return list(matches.values())


def vote_ends(targets: np.ndarray, query_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """The query and gallery slot each of the m + n votes links: a query slot's vote lies at
    its target gallery slot, a gallery slot's at its target query slot."""
    own = np.concatenate([np.arange(query_slots), np.arange(len(targets) - query_slots)])
    is_query = np.arange(len(targets)) < query_slots
    return np.where(is_query, own, targets), np.where(is_query, targets, own)


def _row_of(store: FeatureStore, item: str | int | Path) -> int | None:
    """The row of `store` that `item` names (an index, a stored name, or the path of a stored
    image); None for a photo file that it does not hold; an error for anything else."""
    text = str(item)
    if isinstance(item, int) or text.isdigit():
        row = int(text)
        if not 0 <= row < store.num_images:
            raise InputError(f"image index {row} out of range: {store.path} holds "
                             f"{store.num_images} images (0..{store.num_images - 1})")
        return row
    names = {name: row for row, name in enumerate(store.paths)}
    if text in names:
        return names[text]
    if store.root is not None and Path(text).is_file():
        resolved = Path(text).resolve()
        for name, row in names.items():
            if (store.root / name).resolve() == resolved:
                return row
        return None
    if Path(text).is_file():
        return None
    raise InputError(f"{text}: not an image of {store.path} (neither a row index, a stored "
                     f"name such as {store.paths[0]!r}, nor a photo file)")


def _extraction_settings(store: FeatureStore | None, photo: str | int | Path
                         ) -> dict[str, Any] | None:
    """The backbone settings a photo is extracted with to be compared with `store`'s images
    (None: the default backbone's)."""
    if store is None:
        if not Path(str(photo)).is_file():
            raise InputError(f"{photo}: no such photo (give a features file with --features to "
                             "name images by row or stored name)")
        return None
    if store.backbone_settings is None:
        raise InputError(f"{photo}: not an image of {store.path}, which records no backbone "
                         "settings to extract it with (released descriptors): name one of its "
                         "images")
    return store.backbone_settings


def draw_pair_explanation(explanation: PairExplanation, output: Path, *,
                          svg: bool = False) -> Path:
    """The picture of an explanation as a PNG (and an SVG beside it), written atomically."""
    output = checked_picture(output)
    return save_figure(pair_figure(explanation), output, svg)


def pair_figure(explanation: PairExplanation) -> Figure:
    """The picture: correspondences before and after optimal transport over the two photos
    side by side, each coloured by its value; the dustbin gains painted over the photos; the
    raw and fused scores taken apart."""
    plt = pyplot()
    photos = [display_pixels(image.path) for image in (explanation.query, explanation.gallery)]
    figure, axes = plt.subplots(4, 1, figsize=(9.5, 12.8),
                                gridspec_kw={"height_ratios": [1, 1, 1, 0.45]})
    before, after = explanation.similarity_matches, explanation.vote_matches
    for axis, matches, label, colours in (
            (axes[0], before, "similarity S (before optimal transport)", "viridis"),
            (axes[1], after, "contribution sigmoid(f(vote)) (after optimal transport)",
             "plasma")):
        places = side_by_side(axis, photos)
        lines = correspondence_lines(explanation, matches, places)
        values = [match.value for match in matches]
        collection = _line_collection(lines, values, colours)
        axis.add_collection(collection)
        axis.set_title(f"the {len(matches)} strongest correspondences: {label}", fontsize=10)
        figure.colorbar(collection, ax=axis, fraction=0.03, pad=0.01)
    _draw_gains(figure, axes[2], explanation, side_by_side(axes[2], photos))
    axes[3].set_axis_off()
    axes[3].text(0.0, 1.0, "\n".join(explanation.breakdown()), va="top", ha="left",
                 family="monospace", fontsize=8.5, transform=axes[3].transAxes)
    figure.tight_layout()
    return figure


def _draw_gains(figure: Figure, axis, explanation: PairExplanation, places: list) -> None:
    """Each photo's descriptor grid painted with the dustbin gains (keypoints: a dot at each),
    on one colour scale from the pair's smallest to its largest gain."""
    images = (explanation.query, explanation.gallery)
    gains = np.concatenate([image.gains[~image.padding] for image in images])
    axis.set_title("dustbin gain h of every descriptor (high: mass sent to the dustbin, "
                   "uninformative)", fontsize=10)
    if not gains.size:
        return
    for image, place in zip(images, places, strict=True):
        real = ~image.padding
        if not real.any():
            continue
        colours = {"cmap": "coolwarm", "vmin": gains.min(), "vmax": gains.max()}
        grid = descriptor_grid(image.positions[real], image.gains[real])
        if grid is None:
            heat = axis.scatter(*place.points(image.positions[real]).T, c=image.gains[real],
                                s=14, edgecolors="none", alpha=0.85, **colours)
        else:
            heat = axis.imshow(grid, extent=(place.left, place.left + place.width,
                                             place.height, 0),
                               alpha=0.55, interpolation="nearest", **colours)
    axis.set_xlim(0, places[-1].left + places[-1].width)
    figure.colorbar(heat, ax=axis, fraction=0.03, pad=0.01)


def correspondence_lines(explanation: PairExplanation, matches: list[Correspondence],
                         places: list) -> np.ndarray:
    """(len(matches), 2, 2) canvas segments from each query descriptor to its gallery one."""
    query = places[0].points(explanation.query.positions[[m.query for m in matches]])
    gallery = places[1].points(explanation.gallery.positions[[m.gallery for m in matches]])
    return np.stack([query, gallery], axis=1).reshape(len(matches), 2, 2)


def _line_collection(lines: np.ndarray, values: list[float], colours: str):
    from matplotlib.collections import LineCollection

    collection = LineCollection(lines, cmap=colours, linewidths=1.6, alpha=0.9)
    collection.set_array(np.asarray(values, dtype=np.float64))
    return collection
