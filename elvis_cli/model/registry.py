"""Re-rankers by name: what `--model`, the evaluation table and `load_reranker` take."""

from __future__ import annotations

from pathlib import Path

from elvis_cli.features.store import FeatureStore
from elvis_cli.model.chamfer import Chamfer
from elvis_cli.model.checkpoints import Checkpoint
from elvis_cli.model.elvis_reranker import ElvisReranker
from elvis_cli.model.fusion import check_fusion
from elvis_cli.model.global_ranking import GlobalRanking
from elvis_cli.model.reranker import Reranker
from elvis_cli.util.errors import unknown_name

# in the order of the tables' columns
RERANKERS: dict[str, type[Reranker]] = {
    cls.name: cls for cls in (GlobalRanking, ElvisReranker, Chamfer)}


def reranker_class(name: str) -> type[Reranker]:
    if name not in RERANKERS:
        raise unknown_name("model", name, RERANKERS)
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
