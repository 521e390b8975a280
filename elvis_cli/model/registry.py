"""Re-rankers by name: what `--model`, the evaluation table and `load_reranker` take.

The names are known without their classes, which are torch modules: a class is imported when
first looked up, so that a misspelt `--model` is refused before torch is.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from elvis_cli.model.fusion import check_fusion
from elvis_cli.util.errors import unknown_name

if TYPE_CHECKING:
    from pathlib import Path

    from elvis_cli.features.store import FeatureStore
    from elvis_cli.model.checkpoints import Checkpoint
    from elvis_cli.model.reranker import Reranker


class _ClassesByName(Mapping[str, "type[Reranker]"]):
    """name -> re-ranker class, from "module:Class" paths; each module imported on lookup."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths

    def __getitem__(self, name: str) -> type[Reranker]:
        module, class_name = self._paths[name].split(":")
        return getattr(importlib.import_module(module), class_name)

    def __contains__(self, name: object) -> bool:
        return name in self._paths  # without importing (Mapping's would look the class up)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


# in the order of the tables' columns; each key is its class's `name`
RERANKERS: Mapping[str, type[Reranker]] = _ClassesByName({
    "global": "elvis_cli.model.global_ranking:GlobalRanking",
    "elvis": "elvis_cli.model.elvis_reranker:ElvisReranker",
    "ames": "elvis_cli.model.elvis_reranker:AmesReranker",
    "chamfer": "elvis_cli.model.chamfer:Chamfer",
    "sv": "elvis_cli.model.spatial_verification:SpatialVerification",
})


def check_reranker_name(name: str) -> None:
    """Refuse a name no re-ranker has, with the closest known one as a suggestion."""
    if name not in RERANKERS:
        raise unknown_name("model", name, RERANKERS)


def reranker_class(name: str) -> type[Reranker]:
    check_reranker_name(name)
    return RERANKERS[name]


def load_reranker(name: str, features: FeatureStore,
                  checkpoint: str | Path | Checkpoint | None = None, lam: float | None = None,
                  temperature: float | None = None) -> Reranker:
    """Re-ranker `name` for these (gallery) features. A trained one loads `checkpoint` (None:
    the one matching the features' backbone), refuses features it does not fit, and takes
    `lam`/`temperature` over its own fusion; the others ignore them, but out-of-range values
    are refused for every re-ranker, before the checkpoint is loaded."""
    reranker = reranker_class(name)
    check_fusion(lam, temperature)
    return reranker.load(features, checkpoint, lam, temperature)
