"""What a re-ranking run is given: `RerankConfig`. It lives apart from the engine (rerank.py)
so that building one, which the CLI does before any input is checked, imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elvis_cli.util.errors import InputError


@dataclass
class RerankConfig:
    shortlist: int = 100  # how many of each query's list are scored by ELViS
    num_local: int | None = 600  # first descriptors per image used (ELViS: 600 of the 700 stored);
    # files that store fewer use all of theirs
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

    def __post_init__(self) -> None:
        for name in ("shortlist", "batch_size", "cache_images", "read_images"):
            value = getattr(self, name)
            if value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.precision not in ("auto", "float32", "float16"):
            raise InputError(f"precision must be auto, float32 or float16, got {self.precision!r}")
        for name in ("num_local", "workers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got {value}")
