"""elvis-cli: batch ELViS re-ranking for instance-level image retrieval.

The public API, one name per stage, importable from here: `from elvis_cli import rerank`.
Names load their module on first use, so importing the package (and starting the `elvis`
command) does not pull in torch, faiss or h5py.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    # the commands, one call each (`elvis X` prints what these return)
    "extract_images": "elvis_cli.retrieval.files",  # elvis extract
    "ExtractRun": "elvis_cli.retrieval.files",
    "CachedEmbeddings": "elvis_cli.retrieval.files",
    "fill_embedding_cache": "elvis_cli.retrieval.files",
    "extract_shortlisted": "elvis_cli.features.shortlisted",  # elvis extract --only-shortlisted
    "ShortlistedReport": "elvis_cli.features.shortlisted",
    "join_features": "elvis_cli.features.joined",  # elvis join
    "JoinReport": "elvis_cli.features.joined",
    "verify_features": "elvis_cli.features.verification",  # elvis verify
    "VerificationReport": "elvis_cli.features.verification",
    "ShardCheck": "elvis_cli.features.verification",
    "shortlist_files": "elvis_cli.retrieval.files",  # elvis shortlist
    "rerank_files": "elvis_cli.retrieval.files",  # elvis rerank
    "RerankRun": "elvis_cli.retrieval.files",
    "RayExecutor": "elvis_cli.util.ray_cluster",  # elvis rerank --ray, elvis extract --ray
    "search_images": "elvis_cli.retrieval.search",  # elvis search
    "SearchRun": "elvis_cli.retrieval.search",
    "evaluate_datasets": "elvis_cli.evaluation.benchmarks",  # elvis evaluate
    "EvaluationRun": "elvis_cli.evaluation.benchmarks",
    "report_results": "elvis_cli.reporting.report",  # elvis report
    "ReportRun": "elvis_cli.reporting.report",
    "ReportConfig": "elvis_cli.reporting.config",
    "list_datasets": "elvis_cli.evaluation.prepare",  # elvis datasets list
    "DatasetStatus": "elvis_cli.evaluation.prepare",
    "prepare_dataset": "elvis_cli.evaluation.prepare",  # elvis datasets prepare
    "train": "elvis_cli.training.loop",  # elvis train
    "TrainConfig": "elvis_cli.training.config",
    "TrainReport": "elvis_cli.training.loop",
    "RoundFinished": "elvis_cli.training.loop",
    "explain_files": "elvis_cli.explanation.files",  # elvis explain
    "ExplainRun": "elvis_cli.explanation.files",
    "explain_pair": "elvis_cli.explanation.pair",
    "PairExplanation": "elvis_cli.explanation.pair",
    "draw_pair_explanation": "elvis_cli.explanation.pair",
    "explain_checkpoint": "elvis_cli.explanation.curves",
    "CheckpointCurves": "elvis_cli.explanation.curves",
    "draw_checkpoint_curves": "elvis_cli.explanation.curves",
    # (elvis export: export_official)
    # named settings
    "Preset": "elvis_cli.model.presets",
    "PRESETS": "elvis_cli.model.presets",
    "get_preset": "elvis_cli.model.presets",
    # progress events and errors
    "TaskProgress": "elvis_cli.util.progress",
    "ElvisError": "elvis_cli.util.errors",
    "ElvisWarning": "elvis_cli.util.errors",
    "InputError": "elvis_cli.util.errors",
    "EXIT_PARTIAL": "elvis_cli.util.errors",
    # features
    "ExtractConfig": "elvis_cli.features.extraction",
    "ExtractReport": "elvis_cli.features.extraction",
    "extract_features": "elvis_cli.features.extraction",
    "FeatureStore": "elvis_cli.features.store",
    "open_local": "elvis_cli.features.released",
    "open_released": "elvis_cli.features.released",
    "export_official": "elvis_cli.features.official_export",
    "collect_images": "elvis_cli.features.images",
    "load_image": "elvis_cli.features.images",
    # backbones
    "create_backbone": "elvis_cli.backbones",
    "backbone_options": "elvis_cli.backbones",  # --backbone-option KEY=VALUE items
    # model
    "Elvis": "elvis_cli.model.elvis",
    "ElvisConfig": "elvis_cli.model.elvis",
    "Chamfer": "elvis_cli.model.chamfer",
    "ElvisReranker": "elvis_cli.model.elvis_reranker",
    "Ames": "elvis_cli.model.ames",
    "AmesConfig": "elvis_cli.model.ames",
    "AmesReranker": "elvis_cli.model.elvis_reranker",
    "GlobalRanking": "elvis_cli.model.global_ranking",
    "Reranker": "elvis_cli.model.reranker",
    "Fusion": "elvis_cli.model.fusion",
    "RerankResult": "elvis_cli.model.reranker",
    "RERANKERS": "elvis_cli.model.registry",
    "load_reranker": "elvis_cli.model.registry",
    "Checkpoint": "elvis_cli.model.checkpoints",
    "load_checkpoint": "elvis_cli.model.checkpoints",
    "save_checkpoint": "elvis_cli.model.checkpoints",
    # retrieval
    "Shortlist": "elvis_cli.retrieval.shortlist",
    "build_shortlist": "elvis_cli.retrieval.shortlist",
    "load_shortlist": "elvis_cli.retrieval.shortlist",
    "save_shortlist": "elvis_cli.retrieval.shortlist",
    "search_shortlist": "elvis_cli.retrieval.shortlist",
    "store_shortlist": "elvis_cli.retrieval.shortlist",
    "IndexConfig": "elvis_cli.retrieval.index_choice",
    "IndexPlan": "elvis_cli.retrieval.index_choice",
    "plan_index": "elvis_cli.retrieval.index_choice",
    "build_index": "elvis_cli.retrieval.faiss_index",
    "GalleryIndex": "elvis_cli.retrieval.saved_index",
    "gallery_index": "elvis_cli.retrieval.saved_index",
    "RerankConfig": "elvis_cli.retrieval.config",
    "ShortlistRun": "elvis_cli.retrieval.files",
    "PostConfig": "elvis_cli.retrieval.config",
    "PostReport": "elvis_cli.retrieval.post",
    "post_processed_shortlist": "elvis_cli.retrieval.post",
    "alpha_query_expansion": "elvis_cli.retrieval.query_expansion",
    "guided_similarity_separation": "elvis_cli.retrieval.gss",
    "GssResult": "elvis_cli.retrieval.gss",
    "rerank": "elvis_cli.retrieval.rerank",
    "cache_embeddings": "elvis_cli.retrieval.rerank",
    "rerank_table": "elvis_cli.retrieval.rerank",
    # evaluation
    "load_dataset": "elvis_cli.evaluation.datasets",
    "default_data_root": "elvis_cli.evaluation.datasets",
    "EvaluateConfig": "elvis_cli.evaluation.config",
    "FusionGrid": "elvis_cli.evaluation.config",
    "evaluate_dataset": "elvis_cli.evaluation.run",
    "results_table": "elvis_cli.evaluation.report",
    "write_results": "elvis_cli.evaluation.report",
    "summary_table": "elvis_cli.evaluation.report",
    "grid_best": "elvis_cli.evaluation.report",
    "runtime_curve": "elvis_cli.evaluation.report",
    "plot_runtime": "elvis_cli.evaluation.report",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'elvis_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
