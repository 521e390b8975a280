"""Reporting of evaluation results: the results table and its files, the summary table (one row
per dataset, the Medium and Hard rows of revisitop sets, the averages), the fusion grid's best
rows, the runtime curve per method and shortlist size (with the bytes each method stores per
gallery image) and its performance-against-time plot, and the per-query APs with where re-ranking
helped and hurt.

Everything here reads the rows `evaluate_dataset` (run.py) produces; nothing runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from elvis_cli.evaluation.registry import PAPER_AVERAGES, REGISTRY
from elvis_cli.model.registry import RERANKERS
from elvis_cli.retrieval.config import AFTER_RERANKING, POST_METHODS
from elvis_cli.util.atomic import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from elvis_cli.evaluation.run import DatasetResult


def results_table(results: Sequence[DatasetResult]) -> pd.DataFrame:
    return pd.DataFrame([row for result in results for row in result.rows])


def write_results(table: pd.DataFrame, json_path: Path | None, csv_path: Path | None) -> None:
    """JSON (a list of rows) and CSV with every metric by name, each written atomically."""
    if json_path is not None:
        write_text_atomic(json_path, table.to_json(orient="records", indent=2))
    if csv_path is not None:
        write_text_atomic(csv_path, table.to_csv(index=False))


PER_QUERY_COLUMNS = ["dataset", "model", "shortlist", "protocol", "query_index", "query", "ap"]


def per_query_table(results: Sequence[DatasetResult]) -> pd.DataFrame:
    """Each query's AP (percent; NaN: no positive, left out of the mean) per dataset, model,
    shortlist size and protocol, for the rows of the default settings: the mean of a group's
    `ap` is that row's mAP of the protocol (GLDv2: `split` names the private queries of `map`)."""
    rows = [row for result in results for row in result.per_query]
    split = ["split"] if any("split" in row for row in rows) else []
    return pd.DataFrame(rows, columns=[*PER_QUERY_COLUMNS[:-1], *split, "ap"])


def reranking_changes(per_query: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and re-ranker, at its largest shortlist size: how many queries it ranks
    better, worse or the same as the global ranking (AP averaged over the protocols), and the
    query it helped most and the one it hurt most, with the change in AP (None: no such); none
    where the plain global ranking was not evaluated."""
    by_query = (per_query.groupby(["dataset", "model", "shortlist", "query_index"], sort=False)
                .agg(query=("query", "first"), ap=("ap", "mean")).reset_index())
    rows = []
    for (dataset, model), group in by_query.groupby(["dataset", "model"], sort=False):
        if model == "global":
            continue
        deepest = group[group["shortlist"] == group["shortlist"].max()].set_index("query_index")
        base = by_query[(by_query["dataset"] == dataset) & (by_query["model"] == "global")]
        if base.empty:  # no plain global ranking evaluated (e.g. only --post gss): no baseline
            continue
        change = (deepest["ap"] - base.set_index("query_index")["ap"]).dropna()
        helped, hurt = change[change > 0], change[change < 0]
        rows.append({
            "dataset": dataset, "model": model, "shortlist": int(deepest["shortlist"].iloc[0]),
            "better": len(helped), "worse": len(hurt), "same": int((change == 0).sum()),
            "most_helped": deepest.at[helped.idxmax(), "query"] if len(helped) else None,
            "gain": float(helped.max()) if len(helped) else None,
            "most_hurt": deepest.at[hurt.idxmin(), "query"] if len(hurt) else None,
            "loss": float(hurt.min()) if len(hurt) else None})
    return pd.DataFrame(rows, columns=["dataset", "model", "shortlist", "better", "worse", "same",
                                       "most_helped", "gain", "most_hurt", "loss"])


def headline_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the default settings (the global ranking and each model at each shortlist
    size), without the fusion grid's; the tables and curves are made of these."""
    if "grid" not in table:
        return table
    return table[~table["grid"].astype(bool)]


def grid_best(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and model, the grid's best combination and its mAP (empty without a grid)."""
    best = table[table["best"].astype(bool)] if "best" in table else table.iloc[0:0]
    if best.empty:  # no grid, or only the global ranking (which has no fusion columns)
        return best
    return best[["dataset", "model", "shortlist", "lam", "temperature", "map"]].reset_index(
        drop=True)


def _column(model: str, shortlist: int, post: object = None) -> str:
    """`elvis@100`, `elvis@100+aqe`; `global`, `global+aqe` (see `method_label`)."""
    name = model if model == "global" else f"{model}@{shortlist}"
    return method_label(name, post)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset: its metric, global mAP, mAP of each model at each shortlist size,
    the paper's number where the configuration matches; then the average rows.

    "average (out-of-domain)" averages the registry's datasets outside the landmark domain of
    the paper's GLDv2 training set; custom datasets have no known domain and count only in
    "average (all)". The paper's averages appear only when every §7 dataset is in the table.
    Fusion-grid rows are left out (see `grid_best`).
    """
    table = headline_rows(table)
    posts = table["post"] if "post" in table else pd.Series("none", index=table.index)
    table = table.assign(
        column=[_column(m, s, p) for m, s, p in zip(table["model"], table["shortlist"], posts,
                                                    strict=True)],
        post_rank=[POST_METHODS.index(p) if p in POST_METHODS else 0 for p in posts])
    order = list(dict.fromkeys(table.sort_values(["model", "post_rank", "shortlist"],
                                                 key=_model_order)["column"]))
    wide = table.pivot_table(index="dataset", columns="column", values="map", aggfunc="first",
                             sort=False)[order]
    first = table.groupby("dataset", sort=False).first()
    paper = table.groupby("dataset", sort=False)["paper_map"].max() if "paper_map" in table \
        else pd.Series(np.nan, index=wide.index)
    summary = pd.concat([first[["metric"]], wide, paper.rename("paper")], axis=1)
    ood = [name for name in summary.index
           if REGISTRY.get(name) is not None and REGISTRY[name].in_domain is False]
    complete = {entry.name for entry in REGISTRY.values()
                if entry.paper_map is not None or entry.distractors} <= set(summary.index)
    averages = {"average (all)": (list(summary.index), "avg"),
                "average (out-of-domain)": (ood, "ood avg")}
    for label, (names, paper_key) in averages.items():
        row = summary.loc[names, order].mean() if names else pd.Series(np.nan, index=order)
        summary.loc[label, order] = row
        summary.loc[label, "metric"] = f"mean of {len(names)}"
        summary.loc[label, "paper"] = PAPER_AVERAGES[paper_key] if complete and paper.notna(
        ).any() else np.nan
    return _with_protocol_rows(summary, table, order).reset_index(names="dataset")


def _with_protocol_rows(summary: pd.DataFrame, table: pd.DataFrame,
                        order: list[str]) -> pd.DataFrame:
    """Revisitop datasets get their Medium and Hard mAP on rows of their own under the headline
    (not counted in the averages): Hard is where re-ranking shows."""
    rows = []
    for name in summary.index:
        rows.append(summary.loc[[name]])
        for protocol in ("medium", "hard"):
            metric = f"map_{protocol}"
            if metric not in table or table.loc[table["dataset"] == name, metric].isna().all():
                continue
            values = table[table["dataset"] == name].set_index("column")[metric]
            row = pd.DataFrame([values.reindex(order)], index=[f"  {name} {protocol}"])
            rows.append(row.assign(metric=f"mAP {protocol.capitalize()}"))
    return pd.concat(rows)[summary.columns]


def _model_order(column: pd.Series) -> pd.Series:
    if column.name == "model":
        return column.map({name: rank for rank, name in enumerate(RERANKERS)})
    return column


def method_label(model: str, post: object = None) -> str:
    """What a line of the runtime curve and plot (and a column of the summary) is keyed by:
    the model, and the global post-processing applied with it where there was one (a `post`
    column other than none)."""
    if not isinstance(post, str) or post in ("", "none"):
        return model
    return f"{model}+{post}"


def runtime_curve(table: pd.DataFrame) -> pd.DataFrame:
    """Per method (`method_label`) and shortlist size: seconds per query, mAP and bytes stored
    per gallery image, averaged over the datasets. Each re-ranking method's curve starts at
    the global ranking of the same post-processing (size 0); fusion-grid rows are left out."""
    table = headline_rows(table)
    posts = table["post"] if "post" in table else pd.Series(None, index=table.index)
    table = table.assign(
        method=[method_label(model, post) for model, post in zip(table["model"], posts,
                                                                 strict=True)],
        # αQE after re-ranking starts from the plain global ranking
        start=[method_label("global", None if post == AFTER_RERANKING else post)
               for post in posts])
    methods = table[table["model"] != "global"][["method", "model", "start"]].drop_duplicates()
    parts = [table[(table["model"] == "global") & (table["method"] == start)].assign(
        method=method, model=model) for method, model, start in methods.itertuples(index=False)]
    curves = pd.concat([table, *parts]) if parts else table
    return (curves.groupby(["method", "shortlist"], sort=False)
            .agg(model=("model", "first"), seconds_per_query=("seconds_per_query", "mean"),
                 map=("map", "mean"), bytes_per_image=("bytes_per_image", "mean"),
                 datasets=("dataset", "nunique"))
            .reset_index().sort_values(["model", "method", "shortlist"], key=_model_order)
            .reset_index(drop=True)[["method", "model", "shortlist", "seconds_per_query", "map",
                                     "bytes_per_image", "datasets"]])


def plot_runtime(table: pd.DataFrame, path: Path) -> None:
    """Performance against time (the ELViS paper's Fig. 1): mAP averaged over the datasets
    against re-ranking seconds per query, one line per method, each point labelled with its
    shortlist size; the global ranking, which re-ranks nothing, is a dashed level line. The
    time axis is logarithmic where the times span more than a factor of ten."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = runtime_curve(table)
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    reranked = curve[curve["shortlist"] > 0]
    for position, (method, rows) in enumerate(reranked.groupby("method", sort=False)):
        colour = colours[position % len(colours)]
        axis.plot(rows["seconds_per_query"], rows["map"], color=colour, marker="o",
                  linewidth=2, label=method)
        for row in rows.itertuples(index=False):
            axis.annotate(str(row.shortlist), (row.seconds_per_query, row.map), fontsize=8,
                          textcoords="offset points", xytext=(4, 4), color=colour)
    for row in curve[curve["model"] == "global"].itertuples(index=False):
        axis.axhline(row.map, color="grey", linestyle="--", linewidth=1)
        axis.annotate(f"{row.method} (no re-ranking)", (0.01, row.map), fontsize=8,
                      xycoords=("axes fraction", "data"), textcoords="offset points",
                      xytext=(0, 3), color="grey")
    times = reranked["seconds_per_query"][reranked["seconds_per_query"] > 0]
    if len(times) and times.max() > 10 * times.min():
        axis.set_xscale("log")
    datasets = int(curve["datasets"].max()) if len(curve) else 0
    axis.set(xlabel="re-ranking time per query (s)", ylabel="mAP",
             title=f"mAP against re-ranking time (mean over {datasets} dataset"
                   f"{'s' if datasets != 1 else ''}; labels: shortlist size)")
    axis.grid(alpha=0.3, which="both")
    if len(reranked):
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
