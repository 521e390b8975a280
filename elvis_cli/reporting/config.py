"""What a results page is given: `ReportConfig`. Apart from the page's code, so that the CLI
builds and checks it without importing pandas."""

from __future__ import annotations

from dataclasses import dataclass

from elvis_cli.util.errors import InputError


@dataclass(frozen=True)
class ReportConfig:
    top_k: int = 10  # results shown per query, before and after re-ranking
    queries_per_page: int = 20  # a page per block of queries, so a large run stays usable
    # thumbnails made in all (each image once); images beyond are shown by name only, so a
    # run of thousands of queries never fills a disk with JPEGs
    max_thumbnails: int = 4000
    thumbnail_size: int = 160  # longer side, pixels
    explain_top: int = 3  # pairs explained per query (the best re-ranked), when explaining

    def __post_init__(self) -> None:
        for name in ("top_k", "queries_per_page", "thumbnail_size"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name.replace('_', ' ')} must be positive, got "
                                 f"{getattr(self, name)}")
        for name in ("max_thumbnails", "explain_top"):
            if getattr(self, name) < 0:
                raise InputError(f"{name.replace('_', ' ')} must be zero or positive, got "
                                 f"{getattr(self, name)}")
