"""Reporting of evaluation results: the results table and its files, the summary table (one row
per dataset, the Medium and Hard rows of revisitop sets, the averages), the fusion grid's best
rows, the runtime-vs-shortlist curve and its plot, and the per-query APs with where re-ranking
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
    query it helped most and the one it hurt most, with the change in AP (None: no such)."""
    by_query = (per_query.groupby(["dataset", "model", "shortlist", "query_index"], sort=False)
                .agg(query=("query", "first"), ap=("ap", "mean")).reset_index())
    rows = []
    for (dataset, model), group in by_query.groupby(["dataset", "model"], sort=False):
        if model == "global":
            continue
        deepest = group[group["shortlist"] == group["shortlist"].max()].set_index("query_index")
        base = by_query[(by_query["dataset"] == dataset) & (by_query["model"] == "global")]
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
    size), without the fusion grid's; the tables and curves are made of these. A model on a
    post-processed ranking is named with it, e.g. `elvis+aqe`."""
    if "post" in table:  # named once: the result has no `post` column left
        table = table.assign(model=[model if post in ("none", None) or post != post
                                    else f"{model}+{post}"
                                    for model, post in zip(table["model"], table["post"],
                                                           strict=True)]).drop(columns="post")
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


def _column(model: str, shortlist: int) -> str:
    """`elvis@100`, `elvis@100+aqe`; `global`, `global+aqe`."""
    name, plus, post = model.partition("+")
    return model if name == "global" else f"{name}@{shortlist}{plus}{post}"


def _global_of(model: str) -> str:
    """The global ranking a model re-ranked: `global`, or `global+aqe` for `elvis+aqe` (αQE
    after re-ranking starts from the plain one)."""
    _, plus, post = model.partition("+")
    return "global" if post == AFTER_RERANKING else f"global{plus}{post}"


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset: its metric, global mAP, mAP of each model at each shortlist size,
    the paper's number where the configuration matches; then the average rows.

    "average (out-of-domain)" averages the registry's datasets outside the landmark domain of
    the paper's GLDv2 training set; custom datasets have no known domain and count only in
    "average (all)". The paper's averages appear only when every §7 dataset is in the table.
    Fusion-grid rows are left out (see `grid_best`).
    """
    table = headline_rows(table)
    table = table.assign(column=[_column(m, s) for m, s in zip(table["model"], table["shortlist"],
                                                              strict=True)])
    order = list(dict.fromkeys(table.sort_values(["model", "shortlist"], key=_model_order)
                               ["column"]))
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
        ranks = {name: rank for rank, name in enumerate(RERANKERS)}
        posts = {name: rank for rank, name in enumerate(POST_METHODS)}

        def rank_of(model: str) -> float:
            name, _, post = model.partition("+")
            return ranks.get(name, len(ranks)) * len(posts) + posts.get(post or "none", 0)

        return column.map(rank_of)
    return column


def runtime_curve(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and shortlist size, seconds per query and mAP averaged over the datasets; each
    model's curve starts at the global ranking (size 0); fusion-grid rows are left out."""
    table = headline_rows(table)
    parts = [table[table["model"] == _global_of(name)].assign(model=name)
             for name in table["model"].unique() if not name.startswith("global")]
    curves = pd.concat([table, *parts]) if parts else table
    return (curves.groupby(["model", "shortlist"], sort=False)
            .agg(seconds_per_query=("seconds_per_query", "mean"), map=("map", "mean"),
                 datasets=("dataset", "nunique"))
            .reset_index().sort_values(["model", "shortlist"], key=_model_order)
            .reset_index(drop=True))


def plot_runtime(table: pd.DataFrame, path: Path) -> None:
    """Seconds per query and mAP against shortlist size: one thin line per dataset and model,
    a thick one per model for the mean over datasets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = headline_rows(table)
    figure, (runtime_axis, map_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    curve = runtime_curve(table)
    reranked = [name for name in curve["model"].unique()
                if not name.startswith("global")] or ["global"]
    colours = dict(zip(reranked, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    for name in reranked:
        for _, rows in table[table["model"].isin([_global_of(name), name])].groupby("dataset"):
            rows = rows.sort_values("shortlist")
            for axis, value in ((runtime_axis, "seconds_per_query"), (map_axis, "map")):
                axis.plot(rows["shortlist"], rows[value], color=colours[name], alpha=0.35,
                          linewidth=1)
        mean = curve[curve["model"] == name]
        for axis, value in ((runtime_axis, "seconds_per_query"), (map_axis, "map")):
            axis.plot(mean["shortlist"], mean[value], color=colours[name], marker="o",
                      linewidth=2.5, label=f"{name} (mean of {int(mean['datasets'].max())})")
    runtime_axis.set(xlabel="shortlist size (0 = global only)", ylabel="seconds per query",
                     title="re-ranking runtime")
    map_axis.set(xlabel="shortlist size (0 = global only)", ylabel="mAP", title="accuracy")
    for axis in (runtime_axis, map_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("thin: one dataset; thick: mean over datasets", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
