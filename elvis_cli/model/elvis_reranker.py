"""ELViS and AMES as re-rankers: a checkpoint's model, checked against the features, and its
fusion (the checkpoint's own lam and temperature unless overridden)."""

from __future__ import annotations

from pathlib import Path

import torch

from elvis_cli.features.store import FeatureStore
from elvis_cli.model.ames import Ames
from elvis_cli.model.checkpoints import Checkpoint, checkpoint_for_features
from elvis_cli.model.elvis import Elvis
from elvis_cli.model.fusion import Fusion
from elvis_cli.model.reranker import PAPER_NUM_LOCAL, Embedded, Reranker


class TrainedReranker(Reranker):
    """A re-ranker whose model comes from a checkpoint of its own architecture (`name`)."""

    tunable_fusion = True

    def __init__(self, model: Elvis | Ames, fusion: Fusion | None = None,
                 label: str | None = None, num_local: int | None = PAPER_NUM_LOCAL) -> None:
        super().__init__(fusion or Fusion(), label, num_local)
        self.model = model

    @classmethod
    def load(cls, features: FeatureStore, checkpoint: str | Path | Checkpoint | None = None,
             lam: float | None = None, temperature: float | None = None) -> TrainedReranker:
        checkpoint = checkpoint_for_features(checkpoint, features.backbone_settings,
                                             features.local_dim, features.binarised, cls.name)
        own = checkpoint.fusion
        fusion = Fusion(own.lam if lam is None else lam,
                        own.temperature if temperature is None else temperature)
        return cls(checkpoint.model, fusion, checkpoint.name, checkpoint.num_local)

    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        return self.model.embed(descriptors, mask)

    def score(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        return self.model.score(src, tgt)

    def bytes_per_descriptor(self, descriptor_dim: int, dtype: torch.dtype) -> int:
        """The projected descriptor, its float32 gain (ELViS: dustbin gain; AMES: none, kept
        as zero in the engine's layout) and a padding flag: about 0.5 KB in float32, whatever
        the input dimension."""
        return self.model.config.model_dim * dtype.itemsize + 4 + 1


class ElvisReranker(TrainedReranker):
    name = "elvis"


class AmesReranker(TrainedReranker):
    """AMES: `embed` is the per-image projection, `score` the transformer over both images
    (every decoder layer mixes them, so nothing more is per image)."""

    name = "ames"
