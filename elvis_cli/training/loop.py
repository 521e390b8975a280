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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elvis_cli.backbones import create_backbone
from elvis_cli.model.checkpoints import save_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig, uses_log_domain
from elvis_cli.model.reranker import Fusion
from elvis_cli.training.augment import render_views
from elvis_cli.training.config import TRAIN_PAIRS, TRAIN_VIEWS, VAL_VIEWS, TrainConfig
from elvis_cli.training.initialisation import calibrate_logit, init_vote_counting
from elvis_cli.training.pairs import PairSampler
from elvis_cli.training.photos import PhotoSet, training_photos
from elvis_cli.training.pool import ViewPool, extract_pool, raw_scores
from elvis_cli.training.validation import ValidationSet, choose_fusion, validate
from elvis_cli.util.atomic import writable_output
from elvis_cli.util.devices import resolve_device
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import TaskProgress, track

CHECKPOINT_SUFFIXES = (".pt",)


@dataclass(frozen=True)
class RoundFinished:
    """A round trained and validated: its entry of TrainReport.history, as soon as it exists."""

    entry: dict[str, float]


# What `train` reports while it runs: views rendered and steps taken, and each round's figures.
TrainEvent = TaskProgress | RoundFinished


@dataclass
class TrainReport:
    checkpoint: Path
    history: list[dict[str, float]]  # one entry per round
    fusion: Fusion  # chosen on the validation set with the best round's weights
    best_round: int  # 1-based
    fusion_grid: list[dict[str, float]]  # val mAP of every (lam, temperature) tried
    timings: dict[str, float]  # seconds: per view extracted, per training step, per validation
    skipped: list[str] = field(default_factory=list)  # unreadable photos, with the reason


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

    def __init__(self, config: TrainConfig, progress: Callable[[TrainEvent], None] | None
                 ) -> None:
        self.config, self.progress = config, progress
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
        advance = track(self.progress, label, len(photos.paths) * config.views_per_image)
        pool = extract_pool(self.backbone, views, photos, self.num_local, config.extract_batch,
                            self.device, advance)
        self.seconds["extract"] += time.perf_counter() - started
        self.views_extracted += len(pool)
        return pool

    def train_round(self, pool: ViewPool, round_index: int) -> dict[str, float]:
        """All steps of one round on one pool; the first round first calibrates g on it."""
        config = self.config
        sampler = PairSampler(pool, config.hard_negative_pool)
        rng = np.random.default_rng([config.seed, TRAIN_PAIRS, round_index])
        if round_index == 0:
            half = config.val_pairs // 2
            src, tgt, _ = sampler.sample(rng, half, half, config.hard_negative_fraction)
            calibrate_logit(self.model, torch.from_numpy(
                raw_scores(self.model, pool, src, tgt, self.device)))
        advance = track(self.progress, f"round {round_index + 1} steps", config.steps_per_round)
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
    output: str | Path,
    config: TrainConfig | None = None,
    val_source: str | Path | None = None,
    labels: Path | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
) -> TrainReport:
    """Train ELViS on a backbone's features and save the best round as a checkpoint.

    `train_source`: photos (folder, .txt list or glob); with `labels` (a `path,instance_id`
    CSV) the listed photos get instance ids, and `train_source` may be None to train on exactly
    the CSV's photos. Without `val_source`, a seeded share of the instances is held out.
    The round with the best re-ranked validation mAP is kept, with its best fusion.
    `progress` hears each task's views or steps and each round's figures (TrainEvent).
    `output` (.pt) is checked first: a place it cannot be written is refused before any work.
    """
    output = writable_output(output, CHECKPOINT_SUFFIXES)
    config = config or TrainConfig()
    train_photos, val_photos = training_photos(train_source, val_source, labels, config)
    history: list[dict[str, float]] = []
    best: tuple[int, dict[str, torch.Tensor], list[dict[str, float]]] | None = None
    run = _Run(config, progress)
    val = ValidationSet.build(run.pool(val_photos, VAL_VIEWS, 0, "validation views"), config)
    for round_index in range(config.rounds):
        pool = run.pool(train_photos, TRAIN_VIEWS, round_index, f"round {round_index + 1} views")
        entry = run.train_round(pool, round_index)
        metrics, grid = run.validate(val)
        entry.update(metrics)
        history.append(entry)
        if progress:
            progress(RoundFinished(entry))
        if best is None or entry["val_map"] > history[best[0] - 1]["val_map"]:
            best = (round_index + 1, copy.deepcopy(run.model.state_dict()), grid)

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
    save_checkpoint(output, run.model.cpu(), run.backbone.settings(), fusion, info)
    return TrainReport(output, history, fusion, best_round, grid, run.timings(),
                       [f"{path}: {reason}" for path, reason in run.skipped.items()])


