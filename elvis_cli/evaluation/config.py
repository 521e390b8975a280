"""What an evaluation run is given: `EvaluateConfig` and the fusion grid swept on top of it
(`FusionGrid`). They live apart from the runs (run.py) so that building and checking them, which
the CLI does before any input is read, imports no torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elvis_cli.backbones import DEFAULT_BACKBONE, check_backbone_name
from elvis_cli.model.fusion import check_fusion
from elvis_cli.model.registry import RERANKERS, check_reranker_name, reranker_class
from elvis_cli.retrieval.config import AFTER_RERANKING, PostConfig, check_post_methods
from elvis_cli.util.errors import InputError


@dataclass
class EvaluateConfig:
    backbone: str = DEFAULT_BACKBONE
    backbone_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # None: the checkpoint that matches the backbone
    shortlists: Sequence[int] = (0, 25, 50, 100)  # 0 = global ranking only
    models: Sequence[str] = ("global", "elvis")  # re-rankers by name (model.registry)
    lam: float | None = None  # None: the checkpoint's own fusion (trained re-rankers only)
    temperature: float | None = None
    num_local: int | None = None  # None: each re-ranker's own (RerankConfig.num_local)
    # re-ranker name -> its own num_local (e.g. ELViS on fewer descriptors than sv in one run)
    num_local_of: dict[str, int] = field(default_factory=dict)
    batch_size: int = 100
    device: str = "auto"
    features_dir: Path | None = None  # None: <dataset>/features/
    descriptors: str | None = None  # released files of this name instead of extraction
    embedding_cache: Path | None = None  # keeps embeddings between runs (EmbeddingCache)
    # queries cut to their ground-truth `bbx`, scaled like the full image: the authors' `bbox`
    # switch, off by default as in their conf/extract.yaml
    query_crops: bool = False
    # queries extracted at this longer side (px), the gallery at the backbone's own: asymmetric
    # low-resolution queries (RAML), cheaper at search time; None: as the gallery
    query_image_size: int | None = None
    # global post-processings side by side (none, aqe, gss, gss-v, rerank-aqe), each a row
    # dimension: none, aqe, gss and gss-v make the global ranking every model re-ranks;
    # rerank-aqe expands each re-ranked list (of the plain ranking) with αQE and searches
    # again; parameters in post_config
    post: Sequence[str] = ("none",)
    post_config: PostConfig = field(default_factory=PostConfig)
    block_size: int = 256  # queries per part of each re-ranking run's scores (retrieval/job.py)

    def __post_init__(self) -> None:
        check_backbone_name(self.backbone)
        if self.query_image_size is not None and self.query_image_size <= 0:
            raise InputError(f"query image size must be positive, got {self.query_image_size}")
        if self.query_image_size is not None and self.descriptors:
            raise InputError("--query-image-size extracts the queries: it does not apply to "
                             "released descriptors")
        for model, count in self.num_local_of.items():
            if model not in self.models or count < 1:
                raise InputError(f"--use-local-of {model}={count}: give a positive count for "
                                 f"one of the models evaluated ({', '.join(self.models)})")
        if self.block_size <= 0:
            raise InputError(f"block size must be positive, got {self.block_size}")
        if not self.shortlists or any(size < 0 for size in self.shortlists):
            raise InputError("shortlist sizes must be zero (global only) or positive")
        check_fusion(self.lam, self.temperature)
        self.shortlists = sorted(set(self.shortlists))
        if not self.models:
            raise InputError(f"no model given; use {', '.join(RERANKERS)}")
        self.models = list(dict.fromkeys(self.models))
        for name in self.models:
            check_reranker_name(name)
        if not self.post:
            raise InputError("no post-processing given; use none, aqe, gss or gss-v")
        self.post = list(dict.fromkeys(self.post))
        check_post_methods(self.post)

    @property
    def rerankers(self) -> list[str]:
        """The models that re-rank (the global row is always there); this reads their
        classes, so it imports torch: a run's, not a check's, question."""
        return [name for name in self.models if reranker_class(name).scores_pairs]

    @property
    def global_posts(self) -> list[str]:
        """The global rankings to make and re-rank: each post-processing before re-ranking,
        and the plain one where αQE after re-ranking needs it."""
        wanted = [method for method in self.post if method != AFTER_RERANKING]
        if AFTER_RERANKING in self.post and "none" not in wanted:
            wanted.insert(0, "none")
        return wanted

    def num_stages(self) -> int:
        """Stages per dataset, for a progress display: features, each post-processing, then
        each re-ranking run of each."""
        rankings = self.global_posts
        return (1 + sum(method != "none" for method in rankings)
                + len(rankings) * len(self.rerankers) * sum(size > 0 for size in self.shortlists))


@dataclass(frozen=True)
class FusionGrid:
    """The (shortlist size, lam, temp) combinations swept on top of the default setting, as the
    authors' test config does (num_rerank 100 and 400, lists of lamb and temp; ELVIS_SPEC §5)."""

    shortlists: Sequence[int] = (100, 400)
    lams: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    temperatures: Sequence[float] = (0.1, 0.25, 0.5, 1.0, 2.0)

    def __post_init__(self) -> None:
        if not self.shortlists or min(self.shortlists) <= 0:
            raise InputError("grid shortlist sizes must be positive")
        if not self.lams or not all(0.0 <= lam <= 1.0 for lam in self.lams):
            raise InputError("grid lam values must lie in [0, 1]")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise InputError("grid temperatures must be positive")
        for name in ("shortlists", "lams", "temperatures"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name)))))

    def num_stages(self, config: EvaluateConfig) -> int:
        """Stages it adds per dataset, for a progress display: one per swept model."""
        return sum(reranker_class(name).tunable_fusion for name in config.rerankers)
