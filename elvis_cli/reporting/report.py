"""`elvis report` as one call: a re-ranking output (with a benchmark's ground truth when there
is one, and the evaluation's table and runtime curve when they exist) as a static results page
in one folder, its thumbnails and explain pictures beside it.

The folder is written whole or not at all (util.atomic.atomic_folder): an error, a bad input
or a kill leaves what was there before. Progress leaves only as events: "thumbnails" (images)
and "explaining" (pairs).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from elvis_cli.evaluation.datasets import RetrievalDataset, default_data_root, load_dataset
from elvis_cli.reporting.config import ReportConfig
from elvis_cli.reporting.folder import checked_report_folder, page_name
from elvis_cli.reporting.labels import ground_truth_labels
from elvis_cli.reporting.page import (
    EXPLAIN_FOLDER,
    PageContent,
    explain_picture_name,
    render_page,
    summary_html,
)
from elvis_cli.reporting.rankings import QueryRanking, query_rankings, read_ranking_table
from elvis_cli.reporting.thumbnails import write_thumbnails
from elvis_cli.util.atomic import atomic_folder
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback, track

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_REPORT_DIR = Path("elvis-report")
# (query image, gallery image, PNG to write) -> the PNG: draws why a pair scored as it did;
# one that is also a context manager is entered around all the pairs
ExplainPair = Callable[[str, str, Path], Path]
EVALUATION_TABLE, RUNTIME_PLOT = "results.csv", "runtime.png"  # as `elvis evaluate` names them


@dataclass
class ReportRun:
    """What `elvis report` wrote."""

    folder: Path
    pages: int
    queries: int
    thumbnails: int  # made (at most ReportConfig.max_thumbnails)
    explained: int  # pairs with an explain picture in the folder
    ground_truth: str | None  # the dataset and protocol that colour the results; None: none
    unreadable: list[str] = field(default_factory=list)  # images without a thumbnail


def report_results(
    results: str | Path, output_dir: str | Path = DEFAULT_REPORT_DIR, *,
    data_root: str | Path | None = None, dataset: str | None = None,
    evaluation_dir: str | Path | None = None, config: ReportConfig | None = None,
    features: str | Path | None = None, gallery_features: str | Path | None = None,
    checkpoint: str | Path | None = None, device: str = "cpu",
    explain: ExplainPair | None = None, progress: ProgressCallback | None = None,
) -> ReportRun:
    """Write the results page of `results` (a table from `elvis rerank -o`) into `output_dir`.

    With `dataset` (under `data_root`, default `$ELVIS_DATA_ROOT`) the results are coloured by
    its ground truth, which must hold every query of the results. The evaluate table and
    runtime curve are read from `evaluation_dir` (default: the results' folder) where they
    exist. The best `config.explain_top` pairs of each query are drawn by `explain`, by default
    `elvis explain` on the run's `features` (`gallery_features`) and `checkpoint`: without
    features, none (the page's images alone cannot say how they were extracted).
    """
    output = checked_report_folder(output_dir)
    if explain is None and features is not None:
        explain = pair_pictures(features, gallery_features, checkpoint, device)
    table = read_ranking_table(results)
    ground_truth = None
    if dataset is not None:
        root = Path(data_root) if data_root is not None else default_data_root()
        ground_truth = load_dataset(root, dataset)
    evaluation = Path(evaluation_dir) if evaluation_dir is not None else Path(results).parent
    evaluation_table = evaluation / EVALUATION_TABLE
    if evaluation_dir is None and not _is_evaluation_table(evaluation_table):
        evaluation_table = None  # e.g. a re-ranking output itself called results.csv
    return write_report(table, output, source=str(results), ground_truth=ground_truth,
                        evaluation_table=evaluation_table,
                        runtime_plot=evaluation / RUNTIME_PLOT, config=config,
                        explain=explain, progress=progress)


def write_report(
    table: pd.DataFrame, output_dir: str | Path, *, source: str,
    ground_truth: RetrievalDataset | None = None, evaluation_table: Path | None = None,
    runtime_plot: Path | None = None, config: ReportConfig | None = None,
    explain: ExplainPair | None = None, progress: ProgressCallback | None = None,
) -> ReportRun:
    """The results page of a ranking table (`rerank_table`'s columns) in `output_dir`; see
    `report_results`. `source` names the results on the page; `evaluation_table` (evaluate's
    results.csv) and `runtime_plot` are shown where they exist."""
    config = config or ReportConfig()
    output = checked_report_folder(output_dir)
    rankings = query_rankings(table, config.top_k)
    labels = (ground_truth_labels(ground_truth, [query.query_path for query in rankings])
              if ground_truth is not None else None)
    summary = _evaluation_table(evaluation_table)
    with atomic_folder(output) as folder:
        images = list(dict.fromkeys(
            path for query in rankings
            for path in (query.query_path, *(entry.gallery_path
                                              for entry in (*query.before, *query.after)))))
        thumbnails = write_thumbnails(images[:config.max_thumbnails], folder,
                                      config.thumbnail_size, progress)
        explained = _explain_pictures(rankings, output, folder, config.explain_top, explain,
                                      progress)
        curve = None
        if runtime_plot is not None and runtime_plot.is_file():
            curve = RUNTIME_PLOT
            shutil.copyfile(runtime_plot, folder / RUNTIME_PLOT)
        pages = max(math.ceil(len(rankings) / config.queries_per_page), 1)
        content = PageContent(
            title=f"Re-ranking results: {Path(source).name}", source=source, labels=labels,
            thumbnails=thumbnails, explained=explained, pages=pages,
            summary=summary_html(summary, curve))
        for number in range(1, pages + 1):
            block = rankings[(number - 1) * config.queries_per_page:
                             number * config.queries_per_page]
            (folder / page_name(number)).write_text(render_page(content, number, block),
                                                    encoding="utf-8")
    return ReportRun(output, pages, len(rankings), len(thumbnails), len(explained),
                     labels.description if labels is not None else None,
                     [path for path in images[:config.max_thumbnails]
                      if path not in thumbnails])


def _is_evaluation_table(path: Path) -> bool:
    """Whether `path` is a results.csv of `elvis evaluate` (by its header)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as table:
            header = table.readline().strip().split(",")
    except OSError:
        return False
    return {"dataset", "model", "shortlist", "map"} <= set(header)


def _evaluation_table(path: Path | None) -> str | None:
    """The evaluate table (summary_table) of an evaluation's results.csv, as HTML."""
    if path is None or not path.is_file():
        return None
    import pandas as pd

    from elvis_cli.evaluation.report import summary_table

    try:
        summary = summary_table(pd.read_csv(path))
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"cannot read the evaluation results {path}: {error}") from None
    return summary.to_html(index=False, na_rep="-", float_format="%.2f", border=0,
                           classes="summary")


def pair_pictures(features: str | Path, gallery_features: str | Path | None = None,
                  checkpoint: str | Path | None = None, device: str = "cpu") -> ExplainPair:
    """`elvis explain` of a results page's pairs, whose images are in these features files."""
    from elvis_cli.explanation.pair import PairExplainer

    return PairExplainer(features=features, gallery_features=gallery_features,
                         checkpoint=checkpoint, device=device)


def _explain_pictures(rankings: list[QueryRanking], output: Path, folder: Path, top: int,
                      explain: ExplainPair | None, progress: ProgressCallback | None
                      ) -> frozenset[str]:
    """The explain pictures the pages link to: those of an earlier report in `output` (made on
    demand), kept, and with `explain`, each query's best `top` re-ranked pairs drawn."""
    if (output / EXPLAIN_FOLDER).is_dir():
        shutil.copytree(output / EXPLAIN_FOLDER, folder / EXPLAIN_FOLDER)
    (folder / EXPLAIN_FOLDER).mkdir(exist_ok=True)
    if explain is not None:
        pairs = [(query.query_path, entry.gallery_path)
                 for query in rankings for entry in query.after[:top]]
        advance = track(progress, "explaining", len(pairs))
        # one that is a context manager (PairExplainer) keeps its files open over the pairs
        with explain if isinstance(explain, AbstractContextManager) else nullcontext():
            for query, gallery in pairs:
                explain(query, gallery, folder / explain_picture_name(query, gallery))
                advance()
    return frozenset(f"{EXPLAIN_FOLDER}/{picture.name}"
                     for picture in (folder / EXPLAIN_FOLDER).glob("*.png"))
