"""One training run's work, on inputs `loop.train` has checked: the frozen backbone and the
model it trains, each round's pool of views and optimiser steps, validation, and the time each
took. It imports torch; loop.py imports it only once the photos and the output are known good.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from elvis_cli.backbones import create_backbone
from elvis_cli.model.ames import Ames, AmesConfig
from elvis_cli.model.elvis import Elvis, ElvisConfig, uses_log_domain
from elvis_cli.training.augment import render_views
from elvis_cli.training.config import TRAIN_PAIRS, TrainConfig
from elvis_cli.training.initialisation import calibrate_logit, init_vote_counting
from elvis_cli.training.pairs import PairSampler
from elvis_cli.training.photos import PhotoSet
from elvis_cli.training.pool import ViewPool, extract_pool, raw_scores
from elvis_cli.training.validation import ValidationSet, validate
from elvis_cli.util.devices import resolve_device
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import track

if TYPE_CHECKING:
    from elvis_cli.training.loop import TrainEvent


def _train_step(
    model: Elvis | Ames, optimizer: torch.optim.Optimizer, pool: ViewPool,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray], device: torch.device, grad_clip: float,
    kept: tuple[int, int] | None = None,
) -> float | None:
    """One AdamW step on BCE(g(raw), label); None when the gradient was not finite (skipped).
    `kept`: how many of their strongest descriptors the sources and the targets keep."""
    src, tgt, labels = pairs
    src_desc, src_mask = pool.local(src, device)
    tgt_desc, tgt_mask = pool.local(tgt, device)
    if kept is not None:
        src_desc, src_mask = src_desc[:, : kept[0]], src_mask[:, : kept[0]]
        tgt_desc, tgt_mask = tgt_desc[:, : kept[1]], tgt_mask[:, : kept[1]]
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


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float
              ) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay over all steps, after a linear warm-up over the first `warmup_fraction`
    (torch's LinearLR from a third of the rate, as the authors' "warmcos")."""
    warmup = int(warmup_fraction * steps)
    if warmup == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=warmup),
         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps - warmup)],
        milestones=[warmup])


class TrainingRun:
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
            dim = self.backbone.local_dim
            self.model = (Elvis(ElvisConfig(descriptor_dim=dim)) if config.model == "elvis"
                          else Ames(AmesConfig(descriptor_dim=dim)))
        if isinstance(self.model, Elvis):
            init_vote_counting(self.model)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.schedule = _schedule(self.optimizer, config.rounds * config.steps_per_round,
                                  config.warmup_fraction)
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
        if round_index == 0 and isinstance(self.model, Elvis):
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
            if config.sampling == "ranked":
                pairs = sampler.sample_ranked(rng, positives, config.ranked_candidates)
            else:
                pairs = sampler.sample(rng, positives, config.batch_pairs - positives,
                                       config.hard_negative_fraction)
            kept = None if config.descriptors_per_side is None else (
                tuple(int(count) for count in rng.integers(*config.descriptors_per_side, size=2)))
            model = self.model
            log_domain_steps += isinstance(model, Elvis) and uses_log_domain(
                model.dust_bin, model.config.regularisation)
            loss = _train_step(self.model, self.optimizer, pool, pairs, self.device,
                               config.grad_clip, kept)
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
