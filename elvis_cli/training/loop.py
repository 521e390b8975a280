"""`elvis train`: fit ELViS (or AMES) on the local descriptors of a frozen backbone, on a CPU.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from elvis_cli.model.fusion import Fusion
from elvis_cli.training.config import TRAIN_VIEWS, VAL_VIEWS, TrainConfig
from elvis_cli.training.photos import training_photos
from elvis_cli.util.atomic import writable_output
from elvis_cli.util.progress import TaskProgress

if TYPE_CHECKING:
    import torch

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


def train(
    train_source: str | Path | None,
    output: str | Path,
    config: TrainConfig | None = None,
    val_source: str | Path | None = None,
    labels: Path | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
) -> TrainReport:
    """Train ELViS (`config.model`: or AMES) on a backbone's features and save the best round
    as a checkpoint.

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
    # only now torch and the model: the photos and the output are known good
    from elvis_cli.model.checkpoints import save_checkpoint
    from elvis_cli.training.run import TrainingRun
    from elvis_cli.training.validation import ValidationSet, choose_fusion

    history: list[dict[str, float]] = []
    best: tuple[int, dict[str, torch.Tensor], list[dict[str, float]]] | None = None
    run = TrainingRun(config, progress)
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
        "sampling": config.sampling,
        **({"ranked_candidates": config.ranked_candidates} if config.sampling == "ranked"
           else {"hard_negative_fraction": config.hard_negative_fraction}),
        "descriptors_per_side": config.descriptors_per_side,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "warmup_fraction": config.warmup_fraction,
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


