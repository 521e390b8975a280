"""What a training run is given: `TrainConfig`, and the random streams its seed feeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elvis_cli.backbones import DEFAULT_BACKBONE, check_backbone_name
from elvis_cli.training.augment import ViewConfig
from elvis_cli.util.errors import InputError

# Streams of the seeded generators, so that training views, validation views and pair draws
# never share random numbers and each is reproducible on its own.
TRAIN_VIEWS, VAL_VIEWS, TRAIN_PAIRS, VAL_PAIRS, SPLIT = range(5)


# the re-rankers `train` can fit (registry names)
TRAINABLE_MODELS = ("elvis", "ames")
# how pairs are drawn: "mixed" (ours: random positives, a share of the negatives among the
# globally most similar) or "ranked" (the authors': both from the anchor's global ranking)
SAMPLINGS = ("mixed", "ranked")
# named sets of TrainConfig values; "authors": pavelsuma/ELViS conf/train_setup/gldv2.yaml,
# conf/model/elvis.yaml and elvis/utils/dataset_loader.py, at our batch size
RECIPES: dict[str, dict[str, Any]] = {
    "ours": {},
    "authors": {"sampling": "ranked", "descriptors_per_side": (100, 400), "lr": 5e-4,
                "weight_decay": 5e-4, "warmup_fraction": 0.1},
}


@dataclass
class TrainConfig:
    model: str = "elvis"  # which of TRAINABLE_MODELS to train
    backbone: str = DEFAULT_BACKBONE
    backbone_options: dict[str, Any] = field(default_factory=dict)
    views_per_image: int = 6  # per photo and round; the first is the photo itself
    rounds: int = 3  # a fresh pool of views (and features) per round
    steps_per_round: int = 300
    batch_pairs: int = 32  # half positive, half negative
    hard_negative_fraction: float = 0.5  # share of negatives among the globally most similar
    hard_negative_pool: int = 10  # "most similar": this many nearest other-instance views
    sampling: str = "mixed"  # one of SAMPLINGS
    # "ranked": pairs come from the anchor's this many nearest views, drawn with weight sim^3
    ranked_candidates: int = 300
    # (low, high): each step keeps a random low..high-1 strongest descriptors per side, so the
    # model sees images with few and many; None: all num_local
    descriptors_per_side: tuple[int, int] | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.0  # share of all steps with a linear warm-up before the cosine
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
        check_backbone_name(self.backbone)
        if self.model not in TRAINABLE_MODELS:
            raise InputError(f"train fits {' or '.join(TRAINABLE_MODELS)}, not {self.model!r}")
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
        if self.sampling not in SAMPLINGS:
            raise InputError(f"sampling must be {' or '.join(SAMPLINGS)}, not {self.sampling!r}")
        if self.ranked_candidates < 2:
            raise InputError("ranked candidates must be at least 2")
        if self.descriptors_per_side is not None:
            low, high = self.descriptors_per_side
            if not 1 <= low < high:
                raise InputError("descriptors per side must be a range LOW < HIGH, LOW >= 1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise InputError("warm-up fraction must be at least 0 and below 1")

    @classmethod
    def for_recipe(cls, recipe: str, **values: Any) -> TrainConfig:
        """A config from a named recipe (RECIPES), `values` set on top."""
        if recipe not in RECIPES:
            raise InputError(f"recipe must be {' or '.join(RECIPES)}, not {recipe!r}")
        return cls(**{**RECIPES[recipe], **values})
