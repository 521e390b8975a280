"""`elvis evaluate` as one call: the datasets of a data root (named, or every ready one)
evaluated, their results written (JSON, CSV, per-query APs, runtime plot) and summarised in
tables.

Progress reaches the caller only as events: one "evaluating" task over every dataset and
stage, whose `detail` names the stage, beside the tasks inside a stage, each with its total
known in advance: "extracting" (images of a dataset's queries or gallery) and "re-ranking"
(queries, per model and shortlist size), whose `detail` names the dataset and what they do.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from elvis_cli.evaluation.config import EvaluateConfig, FusionGrid
from elvis_cli.evaluation.datasets import default_data_root, find_datasets, load_dataset
from elvis_cli.evaluation.prepare import DatasetStatus, list_datasets
from elvis_cli.util.atomic import writable_output
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback, TaskProgress

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_OUT_DIR = Path("elvis-results")
# in the out dir: each re-ranking run's raw scores in parts, which a killed evaluation resumes
PARTS_FOLDER = "parts"


@dataclass
class EvaluationRun:
    """What `elvis evaluate` prints and writes."""

    table: pd.DataFrame  # every row: dataset, model, shortlist size (and grid setting), metrics
    summary: pd.DataFrame  # one row per dataset, then the averages (summary_table)
    curve: pd.DataFrame  # seconds per query and mAP against shortlist size (runtime_curve)
    grid_best: pd.DataFrame  # the grid's best setting per dataset and model (empty: no grid)
    per_query: pd.DataFrame  # each query's AP per dataset, model, shortlist, protocol
    changes: pd.DataFrame  # where re-ranking helped and hurt (report.reranking_changes)
    outputs: dict[str, Path]  # json, csv, per_query, plot; "report NAME": a dataset's page
    not_ready: list[DatasetStatus] = field(default_factory=list)  # left out by all datasets


def evaluate_datasets(
    data_root: str | Path | None = None, datasets: Sequence[str] | None = None,
    config: EvaluateConfig | None = None, grid: FusionGrid | None = None, *,
    out_dir: str | Path = DEFAULT_OUT_DIR, json_path: str | Path | None = None,
    csv_path: str | Path | None = None, plot_path: str | Path | None = None,
    per_query_path: str | Path | None = None, results_page: bool = False,
    progress: ProgressCallback | None = None,
) -> EvaluationRun:
    """Evaluate `datasets` under `data_root` (None: `$ELVIS_DATA_ROOT`, else the default
    cache), or every ready one when `datasets` is None; write results.json, results.csv,
    per_query.csv and runtime.png into `out_dir` (or the paths given) and return the tables;
    with `results_page`, a results page per dataset in `out_dir/report/<dataset>` (elvis report);
    each re-ranking run's scores are kept in `out_dir`/parts/ until everything is written, so
    that the same call after a kill skips what was scored (evaluate_dataset).
    Every dataset is read and checked before the first is evaluated: a missing one costs no
    work, and answers before torch is imported; so does an output that cannot be written."""
    config = config or EvaluateConfig()
    root = Path(data_root) if data_root is not None else default_data_root()
    not_ready: list[DatasetStatus] = []
    if datasets is None:
        statuses = {status.name: status for status in list_datasets(root)}
        names = [name for name in find_datasets(root) if statuses[name].state == "ready"]
        not_ready = [status for status in statuses.values() if status.state != "ready"]
    else:
        names = list(datasets)
    if not names:
        raise InputError(f"no ready dataset under {root}; see `elvis datasets list --data-root "
                         f"{root}` and prepare one with `elvis datasets prepare NAME`")
    loaded = [load_dataset(root, name) for name in names]
    out_dir = Path(out_dir)
    outputs = {  # each checked now, so that a bad place never costs the evaluation
        "json": writable_output(json_path or out_dir / "results.json", (".json",)),
        "csv": writable_output(csv_path or out_dir / "results.csv", (".csv",)),
        "per_query": writable_output(per_query_path or out_dir / "per_query.csv", (".csv",)),
        "plot": writable_output(plot_path or out_dir / "runtime.png", (".png",))}
    if results_page:
        from elvis_cli.reporting.folder import checked_report_folder

        for dataset in loaded:
            dataset.gallery_paths()  # a page shows the images: refused now if not located
            outputs[f"report {dataset.name}"] = checked_report_folder(
                out_dir / "report" / dataset.name)
    # only now the heavy part: torch (run.py), pandas and matplotlib (report.py)
    from elvis_cli.evaluation import report
    from elvis_cli.evaluation.run import evaluate_dataset

    total = len(loaded) * (config.num_stages() + (grid.num_stages(config) if grid else 0))
    stages = _Stages(progress, total)
    results = [evaluate_dataset(dataset, config, progress=progress, on_stage=stages, grid=grid,
                                keep_ranking=results_page, parts=out_dir / PARTS_FOLDER)
               for dataset in loaded]
    stages("finished")
    table, per_query = report.results_table(results), report.per_query_table(results)
    report.write_results(table, outputs["json"], outputs["csv"])
    report.write_results(per_query, None, outputs["per_query"])
    report.plot_runtime(table, outputs["plot"])
    if results_page:
        from elvis_cli.reporting.report import pair_pictures, write_report

        for dataset, result in zip(loaded, results, strict=True):
            # explain pictures show ELViS's view: only of a ranking ELViS made
            explain = (pair_pictures(*result.features_files, config.checkpoint, config.device)
                       if result.ranking_label.startswith("elvis") else None)
            write_report(result.ranking, outputs[f"report {dataset.name}"],
                         source=f"elvis evaluate: {dataset.name}, {result.ranking_label}",
                         ground_truth=dataset, evaluation_table=outputs["csv"],
                         runtime_plot=outputs["plot"], explain=explain, progress=progress)
    shutil.rmtree(out_dir / PARTS_FOLDER, ignore_errors=True)  # done: nothing left to resume
    return EvaluationRun(table, report.summary_table(table), report.runtime_curve(table),
                         report.grid_best(table), per_query, report.reranking_changes(per_query),
                         outputs, not_ready)


class _Stages:
    """The stages of every dataset as one task: each stage that starts finishes the one
    before it, and a last call finishes the last."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, -1

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(TaskProgress("evaluating", self.done, self.total, label))
