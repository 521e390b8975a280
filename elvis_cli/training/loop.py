"""`elvis train`: fit ELViS on the local descriptors of a frozen backbone, on a CPU.

The backbone never changes, so each round renders a pool of views once, extracts their features
once (batched, no autograd) and keeps them in memory; every step of the round then samples pairs
from that pool, and only the 0.1M-parameter ELViS model sees gradients. A fresh pool per round
keeps the model from memorising one set of views.

Positives are two views of one instance: two random views of one photo (self-supervised) or
views of two photos that a labels CSV gives the same instance id. Negatives are views of other
instances, half of them (by default) the ones the global descriptor confuses most, because those
are exactly the shortlist entries re-ranking has to push down.
"""

from __future__ import annotations

import copy
import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from elvis_cli.backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from elvis_cli.backbones.base import META_PADDING
from elvis_cli.evaluation.metrics import map_at_k
from elvis_cli.features.images import ImageError, collect_images, load_image
from elvis_cli.model.checkpoints import Fusion, save_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig, uses_log_domain
from elvis_cli.model.reranker import fuse_and_sort
from elvis_cli.retrieval.shortlist import Shortlist, build_shortlist
from elvis_cli.training.augment import ViewConfig, inset_view, random_view
from elvis_cli.util.devices import resolve_device
from elvis_cli.util.errors import InputError

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
# never share random numbers and each is reproducible on its own.
_TRAIN_VIEWS, _VAL_VIEWS, _TRAIN_PAIRS, _VAL_PAIRS, _SPLIT = range(5)


@dataclass
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE
    backbone_options: dict[str, Any] = field(default_factory=dict)
    views_per_image: int = 6  # per photo and round; the first is the photo itself
    rounds: int = 3  # a fresh pool of views (and features) per round
    steps_per_round: int = 300
    batch_pairs: int = 32  # half positive, half negative
    hard_negative_fraction: float = 0.5  # share of negatives among the globally most similar
    hard_negative_pool: int = 10  # "most similar": this many nearest other-instance views
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0  # max gradient norm; a non-finite norm skips the step
    num_local: int | None = None  # descriptors per image for the model; None: the backbone's K
    val_fraction: float = 0.2  # of the instances, when no validation set is given
    val_pairs: int = 256  # balanced pairs for validation accuracy
    rerank_top: int = 20  # shortlist length re-ranked in validation
    extract_batch: int = 8
    # Strong views by default: with mild ones validation mAP saturates at 100 and can no longer
    # pick the best round or the fusion (measured on the held-out split of the bundled model).
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        crop_area=(0.15, 1.0), perspective_strength=0.18, max_rotation=25.0,
        occlusion_prob=0.4, inset_prob=0.3))
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        positive = ("views_per_image", "rounds", "steps_per_round", "hard_negative_pool",
                    "val_pairs", "rerank_top", "extract_batch")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1")
        if self.batch_pairs < 2:
            raise InputError("batch pairs must be at least 2 (one positive, one negative)")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise InputError("hard negative fraction must be between 0 and 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError("validation fraction must be between 0 and 1 (exclusive)")
        if self.num_local is not None and self.num_local < 1:
            raise InputError("num local must be at least 1")


@dataclass
class TrainReport:
    checkpoint: Path
    history: list[dict[str, float]]  # one entry per round
    fusion: Fusion  # chosen on the validation set with the best round's weights
    best_round: int  # 1-based
    fusion_grid: list[dict[str, float]]  # val mAP of every (lam, temperature) tried
    timings: dict[str, float]  # seconds: per view extracted, per training step, per validation
    skipped: list[str] = field(default_factory=list)  # unreadable photos, with the reason


@dataclass
class PhotoSet:
    """Photos and their instance ids: photos sharing an id show the same object or place."""

    paths: list[Path]
    instances: np.ndarray  # (P,) int

    def subset(self, rows: np.ndarray) -> PhotoSet:
        return PhotoSet([self.paths[i] for i in rows], self.instances[rows])


@dataclass
class ViewPool:
    """Features of rendered views, kept in memory for a round (local ones in float16)."""

    global_desc: torch.Tensor  # (N, Dg) float32, L2-normalised
    local_desc: torch.Tensor  # (N, K, D) float16
    padding: torch.Tensor  # (N, K) bool
    photo: np.ndarray  # (N,) index into the PhotoSet
    instance: np.ndarray  # (N,)
    backdrop: np.ndarray  # (N,) instance of the photo a view was pasted into, -1 for none

    def __len__(self) -> int:
        return len(self.photo)

    def related(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Whether two views share content of some instance (as object or as backdrop): such
        pairs are neither positives nor negatives, so they are never drawn or scored."""
        a_in = (self.instance[rows], self.backdrop[rows])
        b_in = (self.instance[others], self.backdrop[others])
        shared = np.zeros(np.broadcast_shapes(a_in[0].shape, b_in[0].shape), dtype=bool)
        for a in a_in:
            for b in b_in:
                shared |= (a == b) & (a >= 0)
        return shared

    def local(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rows)
        return (self.local_desc[index].to(device, torch.float32), self.padding[index].to(device))


def read_labels(path: Path) -> dict[Path, str]:
    """`path,instance_id` rows (an optional header) -> {resolved path: id}.

    Relative paths are taken from the CSV's folder, so the file stays valid wherever the
    command is run from.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read labels {path}: {error}") from None
    labels: dict[Path, str] = {}
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if line_number == 1 and [cell.strip() for cell in row[:2]] == ["path", "instance_id"]:
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"{path}:{line_number}: expected 'path,instance_id', got {row!r}")
        photo = (path.parent / Path(row[0].strip()).expanduser()).resolve()
        labels[photo] = row[1].strip()
    if not labels:
        raise InputError(f"{path}: no labelled photos")
    return labels


def photo_set(paths: list[Path], labels: dict[Path, str] | None) -> PhotoSet:
    """Instance ids for photos; a photo without a label is an instance of its own."""
    ids: dict[str, int] = {}
    instances = []
    for path in paths:
        key = (labels or {}).get(path.resolve())
        instances.append(ids.setdefault(f"id:{key}" if key is not None else f"photo:{path}",
                                        len(ids)))
    return PhotoSet(list(paths), np.asarray(instances, dtype=np.int64))


def split_by_instance(photos: PhotoSet, fraction: float, seed: int) -> tuple[PhotoSet, PhotoSet]:
    """Seeded (train, val) split of whole instances, so no object is on both sides."""
    instances = np.unique(photos.instances)
    if len(instances) < 4:
        raise InputError(
            f"only {len(instances)} distinct photos/instances: need at least 4 to split off a "
            "validation set, or pass one"
        )
    count = min(len(instances) - 2, max(2, round(fraction * len(instances))))
    rng = np.random.default_rng([seed, _SPLIT])
    chosen = rng.choice(instances, size=count, replace=False)
    is_val = np.isin(photos.instances, chosen)
    return photos.subset(np.flatnonzero(~is_val)), photos.subset(np.flatnonzero(is_val))


def _fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The photo itself as a view: only shrunk to the views' size, so all views cost the same."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.array(resized)


def render_views(
    photos: PhotoSet, views_per_image: int, config: ViewConfig, entropy: list[int],
    skipped: dict[Path, str],
) -> Iterator[tuple[int, np.ndarray, int]]:
    """(photo index, view, backdrop photo index or -1) for every readable photo: the photo
    itself, then random views, which may be pasted into the previous readable photo (a
    deterministic choice of another scene that costs no extra decoding).

    Each photo has its own generator, so its views do not depend on which other photos failed.
    """
    previous: tuple[int, np.ndarray] | None = None
    # with fewer than three instances an inset could share content with every other view
    inset_prob = config.inset_prob if len(np.unique(photos.instances)) >= 3 else 0.0
    for index, path in enumerate(photos.paths):
        if path in skipped:
            continue
        try:
            image = load_image(path)
        except ImageError as error:
            skipped[path] = str(error)
            continue
        rng = np.random.default_rng([*entropy, index])
        yield index, _fit(image, config.max_side), -1
        for _ in range(views_per_image - 1):
            view = random_view(image, rng, config)
            if previous is not None and inset_prob > 0 and rng.random() < inset_prob:
                yield index, inset_view(view, previous[1], rng, config.inset_area), previous[0]
            else:
                yield index, view, -1
        previous = (index, image)


@torch.inference_mode()
def extract_pool(
    backbone: Backbone,
    views: Iterator[tuple[int, np.ndarray, int]],
    photos: PhotoSet,
    num_local: int,
    batch_size: int,
    device: torch.device,
    advance: Callable[[], None] = lambda: None,
) -> ViewPool:
    """Run the backbone once over a stream of views, batching views of equal input shape."""
    buckets: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    results: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def flush(shape: tuple[int, ...]) -> None:
        items = buckets.pop(shape)
        features = backbone(torch.stack([tensor for _, tensor in items]).to(device))
        local = features.local_desc[:, :num_local].to("cpu", torch.float16)
        padding = features.metadata[:, :num_local, META_PADDING].cpu() > 0.5
        global_desc = features.global_desc.float().cpu()
        for row, (order, _) in enumerate(items):
            results[order] = (global_desc[row], local[row], padding[row])

    photo_of, backdrop_of = [], []
    for order, (photo, image, backdrop) in enumerate(views):
        photo_of.append(photo)
        backdrop_of.append(backdrop)
        tensor = backbone.preprocess(image)
        bucket = buckets.setdefault(tuple(tensor.shape), [])
        bucket.append((order, tensor))
        if len(bucket) >= batch_size:
            flush(tuple(tensor.shape))
        advance()
    for shape in list(buckets):
        flush(shape)
    if not results:
        raise InputError("none of the photos could be read")
    rows = [results[order] for order in range(len(photo_of))]
    photo = np.asarray(photo_of, dtype=np.int64)
    backdrop = np.asarray(backdrop_of, dtype=np.int64)
    return ViewPool(
        torch.stack([row[0] for row in rows]),
        torch.stack([row[1] for row in rows]),
        torch.stack([row[2] for row in rows]),
        photo,
        photos.instances[photo],
        np.where(backdrop >= 0, photos.instances[np.maximum(backdrop, 0)], -1),
    )


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
        rng = np.random.default_rng([config.seed, _VAL_PAIRS])
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


@torch.inference_mode()
def raw_scores(
    model: Elvis, pool: ViewPool, src: np.ndarray, tgt: np.ndarray, device: torch.device,
    batch_size: int = 64,
) -> np.ndarray:
    """Raw ELViS scores of pairs of pool rows."""
    model.eval()
    out = np.empty(len(src), dtype=np.float32)
    for start in range(0, len(src), batch_size):
        chunk = slice(start, start + batch_size)
        src_desc, src_mask = pool.local(src[chunk], device)
        tgt_desc, tgt_mask = pool.local(tgt[chunk], device)
        out[chunk] = model(src_desc, tgt_desc, src_mask, tgt_mask).float().cpu().numpy()
    return out


def mean_ap(ranking: np.ndarray, positives: list[np.ndarray], junk: list[np.ndarray]) -> float:
    """mAP (percent) over the whole ranking, each query's AP normalised by its positives."""
    return float(map_at_k(ranking, positives, junk, k=None)["map"])


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


class _Reporter:
    """A rich progress bar plus one printed line per round, or nothing at all."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), disable=not enabled,
        )

    def __enter__(self) -> _Reporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def task(self, description: str, total: int) -> Callable[[], None]:
        task = self.progress.add_task(description, total=total)
        return lambda: self.progress.advance(task)

    def line(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)


def _training_photos(
    train_source: str | Path | None, val_source: str | Path | None, labels: Path | None,
    config: TrainConfig,
) -> tuple[PhotoSet, PhotoSet]:
    label_map = read_labels(labels) if labels is not None else None
    if train_source is not None:
        train_paths = collect_images(train_source)[1]
    elif label_map is not None:
        train_paths = list(label_map)
    else:
        raise InputError("give training photos (a folder, list or glob) or a labels CSV")
    photos = photo_set(train_paths, label_map)
    if val_source is None:
        return split_by_instance(photos, config.val_fraction, config.seed)
    val = photo_set(collect_images(val_source)[1], label_map)
    if len(np.unique(val.instances)) < 2:
        raise InputError(f"validation set {val_source} needs photos of at least 2 instances")
    return photos, val


def init_vote_counting(
    model: Elvis, threshold: float = 0.05, width: float = 0.05, amplitude: float = 4.0
) -> None:
    """Start f as a soft step at `threshold`: f(v) = amplitude * t / sqrt(1 + t^2),
    t = (v - threshold) / width, so the raw score begins as a count of confident votes.

    Why not PyTorch's random init: votes lie in about 0.01-0.3, where a random f is nearly flat
    (matching and non-matching pairs get the same raw score, and training plateaus for hundreds
    of steps), and its direction is random. The parametrisation is symmetric under f -> -f with
    g mirrored, so a random start may learn "fewer confident votes = match", which fusion, where
    a larger raw score means more similar, would turn upside down.

    Closed form: with first-layer directions e = (+1 x h, -1 x h) and an orthogonal offset
    o = (+1, -1, ...), LayerNorm maps e*t + o to (e*t + o) / sqrt(1 + t^2), and since
    GELU(x) - GELU(-x) = x, reading out amplitude * e / h gives the formula above exactly.
    """
    first, norm, last = model.f[0], model.f[1], model.f[3]
    half = first.out_features // 2
    direction = torch.cat([torch.ones(half), -torch.ones(half)])
    offset = torch.tensor([1.0, -1.0]).repeat(half)
    with torch.no_grad():
        first.weight.copy_((direction / width)[:, None])
        first.bias.copy_(offset - direction * threshold / width)
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        last.weight.copy_(amplitude * direction[None] / half)
        last.bias.zero_()


def calibrate_logit(model: Elvis, raw: torch.Tensor) -> None:
    """Set g(raw) = (raw - mean) / std of the given raw scores: logit 0 between matches and
    non-matches from the first step, instead of many steps spent moving g's bias.

    Hidden units come in pairs (GELU(x) - GELU(-x) = x makes each pair linear); each pair gets
    its own scale so that the units receive different gradients and can bend g later.
    """
    first, last = model.g[0], model.g[2]
    pairs = first.out_features // 2
    scales = torch.linspace(0.5, 2.0, pairs)
    slopes = torch.cat([scales, -scales]) / raw.std().clamp_min(1e-3)
    with torch.no_grad():
        first.weight.copy_(slopes[:, None])
        first.bias.copy_(-slopes * raw.mean())
        last.weight.copy_((torch.cat([1.0 / scales, -1.0 / scales]) / pairs)[None])
        last.bias.zero_()


def _train_step(
    model: Elvis, optimizer: torch.optim.Optimizer, pool: ViewPool,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray], device: torch.device, grad_clip: float,
) -> float | None:
    """One AdamW step on BCE(g(raw), label); None when the gradient was not finite (skipped)."""
    src, tgt, labels = pairs
    src_desc, src_mask = pool.local(src, device)
    tgt_desc, tgt_mask = pool.local(tgt, device)
    logits = model.logit(model(src_desc, tgt_desc, src_mask, tgt_mask))
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels).to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(norm) or not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return float(loss.detach())


class _Run:
    """The state one `train` call carries from round to round."""

    def __init__(self, config: TrainConfig, reporter: _Reporter) -> None:
        self.config, self.reporter = config, reporter
        self.device = resolve_device(config.device)
        self.backbone = create_backbone(config.backbone, **config.backbone_options)
        self.backbone.to(self.device).eval()
        self.num_local = config.num_local or self.backbone.num_local
        if self.num_local > self.backbone.num_local:
            raise InputError(
                f"num local {self.num_local} exceeds the backbone's {self.backbone.num_local}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = Elvis(ElvisConfig(descriptor_dim=self.backbone.local_dim))
        init_vote_counting(self.model)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, config.rounds * config.steps_per_round
        )
        self.skipped: dict[Path, str] = {}
        self.seconds = {"extract": 0.0, "train": 0.0, "validate": 0.0}
        self.views_extracted = 0

    def pool(self, photos: PhotoSet, stream: int, round_index: int, label: str) -> ViewPool:
        started = time.perf_counter()
        config = self.config
        views = render_views(photos, config.views_per_image, config.views,
                             [config.seed, stream, round_index], self.skipped)
        advance = self.reporter.task(label, len(photos.paths) * config.views_per_image)
        pool = extract_pool(self.backbone, views, photos, self.num_local, config.extract_batch,
                            self.device, advance)
        self.seconds["extract"] += time.perf_counter() - started
        self.views_extracted += len(pool)
        return pool

    def train_round(self, pool: ViewPool, round_index: int) -> dict[str, float]:
        """All steps of one round on one pool; the first round first calibrates g on it."""
        config = self.config
        sampler = PairSampler(pool, config.hard_negative_pool)
        rng = np.random.default_rng([config.seed, _TRAIN_PAIRS, round_index])
        if round_index == 0:
            half = config.val_pairs // 2
            src, tgt, _ = sampler.sample(rng, half, half, config.hard_negative_fraction)
            calibrate_logit(self.model, torch.from_numpy(
                raw_scores(self.model, pool, src, tgt, self.device)))
        advance = self.reporter.task(f"round {round_index + 1} steps", config.steps_per_round)
        losses, log_domain_steps = [], 0
        started = time.perf_counter()
        self.model.train()
        for _ in range(config.steps_per_round):
            positives = config.batch_pairs // 2
            pairs = sampler.sample(rng, positives, config.batch_pairs - positives,
                                   config.hard_negative_fraction)
            model = self.model
            log_domain_steps += uses_log_domain(model.dust_bin, model.config.regularisation)
            loss = _train_step(self.model, self.optimizer, pool, pairs, self.device,
                               config.grad_clip)
            self.schedule.step()
            if loss is not None:
                losses.append(loss)
            advance()
        self.seconds["train"] += time.perf_counter() - started
        return {
            "round": round_index + 1,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "skipped_steps": config.steps_per_round - len(losses),
            "log_domain_steps": log_domain_steps,
        }

    def validate(self, val: ValidationSet) -> tuple[dict[str, float], list[dict[str, float]]]:
        started = time.perf_counter()
        result = validate(self.model, val, self.device)
        self.seconds["validate"] += time.perf_counter() - started
        return result

    def timings(self) -> dict[str, float]:
        return {
            "extract_s_per_view": self.seconds["extract"] / max(1, self.views_extracted),
            "train_s_per_step": self.seconds["train"]
            / (self.config.rounds * self.config.steps_per_round),
            "validate_s_per_round": self.seconds["validate"] / self.config.rounds,
        }


def train(
    train_source: str | Path | None,
    output: Path,
    config: TrainConfig | None = None,
    val_source: str | Path | None = None,
    labels: Path | None = None,
    progress: bool = True,
) -> TrainReport:
    """Train ELViS on a backbone's features and save the best round as a checkpoint.

    `train_source`: photos (folder, .txt list or glob); with `labels` (a `path,instance_id`
    CSV) the listed photos get instance ids, and `train_source` may be None to train on exactly
    the CSV's photos. Without `val_source`, a seeded share of the instances is held out.
    The round with the best re-ranked validation mAP is kept, with its best fusion.
    """
    config = config or TrainConfig()
    train_photos, val_photos = _training_photos(train_source, val_source, labels, config)
    history: list[dict[str, float]] = []
    best: tuple[int, dict[str, torch.Tensor], list[dict[str, float]]] | None = None
    with _Reporter(progress) as reporter:
        run = _Run(config, reporter)
        val = ValidationSet.build(run.pool(val_photos, _VAL_VIEWS, 0, "validation views"), config)
        for round_index in range(config.rounds):
            pool = run.pool(train_photos, _TRAIN_VIEWS, round_index,
                            f"round {round_index + 1} views")
            entry = run.train_round(pool, round_index)
            metrics, grid = run.validate(val)
            entry.update(metrics)
            history.append(entry)
            reporter.line(_round_line(entry))
            if best is None or entry["val_map"] > history[best[0] - 1]["val_map"]:
                best = (round_index + 1, copy.deepcopy(run.model.state_dict()), grid)
        for path, reason in run.skipped.items():
            reporter.line(f"[yellow]skipped[/yellow] {path}: {reason}")

    assert best is not None  # rounds >= 1
    best_round, state, grid = best
    run.model.load_state_dict(state)
    chosen = choose_fusion(grid)
    fusion = Fusion(chosen["lam"], chosen["temperature"])
    info = {
        "photos": len(train_photos.paths),
        "instances": len(np.unique(train_photos.instances)),
        "val_photos": len(val_photos.paths),
        "labelled": labels is not None,
        "views_per_image": config.views_per_image,
        "rounds": config.rounds,
        "steps_per_round": config.steps_per_round,
        "batch_pairs": config.batch_pairs,
        "hard_negative_fraction": config.hard_negative_fraction,
        "lr": config.lr,
        "num_local": run.num_local,
        "seed": config.seed,
        "best_round": best_round,
        "history": history,
        "val": history[best_round - 1],
        "fusion": {"lam": fusion.lam, "temperature": fusion.temperature},
        "fusion_grid": grid,
        "skipped_photos": len(run.skipped),
    }
    output = Path(output)
    save_checkpoint(output, run.model.cpu(), run.backbone.settings(), fusion, info)
    return TrainReport(output, history, fusion, best_round, grid, run.timings(),
                       [f"{path}: {reason}" for path, reason in run.skipped.items()])


def _round_line(entry: dict[str, float]) -> str:
    text = (
        f"round {entry['round']}: loss {entry['loss']:.4f}  val acc {entry['val_accuracy']:.3f}  "
        f"val mAP global {entry['val_map_global']:.2f} -> re-ranked {entry['val_map']:.2f} "
        f"(lam {entry['lam']}, temp {entry['temperature']}; paper's 0.5/0.5: "
        f"{entry['val_map_default']:.2f})"
    )
    if entry["skipped_steps"] or entry["log_domain_steps"]:
        text += (f"  [yellow]{entry['skipped_steps']} non-finite steps skipped, "
                 f"{entry['log_domain_steps']} in log-domain Sinkhorn[/yellow]")
    return text
