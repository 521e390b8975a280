"""What a re-ranking run is given: `RerankConfig`. It lives apart from the engine (rerank.py)
so that building one, which the CLI does before any input is checked, imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from elvis_cli.util.errors import InputError, unknown_name


@dataclass
class RerankConfig:
    shortlist: int = 100  # how many of each query's list are scored by ELViS
    # first local descriptors per image used; None: the re-ranker's own (Reranker.num_local:
    # the paper's 600 of the 700 stored, a bundled checkpoint's, all keypoints for sv on
    # RootSIFT); files that store fewer use all of theirs
    num_local: int | None = None
    batch_size: int = 100  # pairs scored at once on CUDA (CPU: a fixed CPU_PAIRS_PER_CALL, so
    # that CPU scores are bitwise the same for every batch size)
    cache_images: int = 2048  # gallery images of a block of queries, embedded at once (the last
    # block's stay for the next block or call, so up to twice this is held while one is built)
    read_images: int = 16  # images per HDF5 read; reads run one step ahead of compute (16 was
    # faster than 64 in benchmarks/rerank_speed.py: smaller conversions, workers start sooner)
    device: str = "auto"
    workers: int | None = None  # CPU threads scoring pairs side by side; default: torch's threads
    embedding_cache: Path | None = None  # a folder that keeps images' embeddings between runs
    # (EmbeddingCache), for galleries re-ranked again and again; used by re-rankers whose
    # embeddings are worth it (Reranker.worth_caching)
    precision: str = "auto"  # of the similarity product: float32, or float16 (CUDA only: about
    # 1e-4 off the float32 raw score, spec tolerance 1e-3); auto: float16 on CUDA, else float32
    block_size: int = 256  # queries per part of a run written to a file (job.py): a killed
    # run loses at most one block, and one block's results are held in memory

    def __post_init__(self) -> None:
        for name in ("shortlist", "batch_size", "cache_images", "read_images", "block_size"):
            value = getattr(self, name)
            if value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.precision not in ("auto", "float32", "float16"):
            raise InputError(f"precision must be auto, float32 or float16, got {self.precision!r}")
        for name in ("num_local", "workers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")


# global post-processing: before re-ranking (post.py), or αQE with each query's re-ranked top n
# as its neighbours, searched again after re-ranking (evaluate only: query_expansion.py)
AFTER_RERANKING = "rerank-aqe"
POST_METHODS = ("none", "aqe", "gss", "gss-v", AFTER_RERANKING)


def check_post_methods(methods: list[str]) -> None:
    """Refuse an unknown post-processing by name, before any work."""
    for method in methods:
        if method not in POST_METHODS:
            raise InputError(f"unknown post-processing {method!r}; use "
                             f"{', '.join(POST_METHODS)}")


@dataclass(frozen=True)
class PostConfig:
    """The parameters of global post-processing, with the papers' defaults.

    αQE (Radenović et al., TPAMI 2018): each query replaced by the L2-normalised sum of itself
    and its top `aqe_n` neighbours weighted by similarity^`aqe_alpha`. The authors' ELViS and
    AMES code has no query expansion, so these are the literature's n = 2, α = 3.
    GSS (Liu et al., NeurIPS 2019; their train.py and README): a residual GCN over the
    k-NN graph (`gss_k` gallery, `gss_query_k` query neighbours), trained on the gallery for
    `gss_epochs` full-batch Adam steps; β is the `gss_beta_percentile` percentile of the
    untrained embeddings' similarities unless `gss_beta` fixes it. The hidden size is the
    descriptor's own: each layer starts as the identity (`gss_init_std` off the diagonal).
    GSS_V (gss-v) keeps only the k-NN edges whose score by re-ranker `gss_verifier` (with the
    run's checkpoint), fused with the edge's global similarity by the re-ranker's own fusion
    (the scale its ranking uses), reaches `gss_verify_threshold`. With a learned re-ranker's
    fusion lam g + (1 - lam) sigmoid(t raw), 0.5 drops only what the verifier rejects: an
    undecided pair (sigmoid 0.5) stays where g >= 0.5 whatever lam, an accepted one (sigmoid
    near 1) at any g >= 0, and a rejected one (sigmoid near 0) needs lam g >= 0.5, never for
    lam <= 0.5 (ELViS's 0.5, the demo checkpoint's 0.25). For sv (inliers + (1 + g) / 2) it
    reads as inliers: n + 0.5 keeps edges of n inliers or more."""

    aqe_n: int = 2
    aqe_alpha: float = 3.0
    gss_k: int = 5
    gss_query_k: int = 5
    gss_beta: float | None = None
    gss_beta_percentile: float = 98.0
    gss_epochs: int = 200
    gss_lr: float = 1e-4
    gss_layers: int = 2
    gss_layer_decay: float = 0.3  # weight of a layer's output added to the previous layer's
    gss_regularizer: float = 1e-5  # L2 on the layers' weights
    gss_init_std: float = 1e-5
    gss_seed: int = 0
    gss_verifier: str = "elvis"
    gss_verify_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("aqe_n", "gss_k", "gss_query_k", "gss_epochs", "gss_layers"):
            value = getattr(self, name)
            if value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.aqe_alpha < 0:
            raise InputError(f"aqe alpha must not be negative, got {self.aqe_alpha}")
        if not 0.0 <= self.gss_beta_percentile <= 100.0:
            raise InputError("gss beta percentile must lie in [0, 100], got "
                             f"{self.gss_beta_percentile}")
        if self.gss_lr <= 0:
            raise InputError(f"gss lr must be positive, got {self.gss_lr}")
        from elvis_cli.model.registry import RERANKERS

        if self.gss_verifier not in RERANKERS:
            raise unknown_name("gss verifier", self.gss_verifier, RERANKERS)
        if not math.isfinite(self.gss_verify_threshold):
            raise InputError("gss verify threshold must be a finite number, got "
                             f"{self.gss_verify_threshold}")
