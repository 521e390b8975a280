"""A re-ranking output read back: the table `elvis rerank` writes (CSV, Parquet or JSON Lines,
retrieval/result_files.py), and each query's ranking before re-ranking and after it.

The file holds only the ranking after re-ranking; the one before is its global order, the
ranking the re-ranker was given (post-processed where the run had --post): the same rows
sorted by `global_score`, ties in their re-ranked order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from elvis_cli.retrieval.result_files import QUERY_COLUMNS, TABLE_SUFFIXES
from elvis_cli.util.errors import InputError

COLUMNS = (*QUERY_COLUMNS, "rank", "gallery_index", "gallery_path", "global_score", "raw_score",
           "score")


@dataclass(frozen=True)
class Entry:
    """One gallery image in a query's ranking, with its place in both orders (1 = best)."""

    gallery_path: str
    global_score: float
    raw_score: float  # NaN: beyond the shortlist, not scored by the re-ranker
    score: float  # the fused score; NaN beyond the shortlist
    rank_before: int
    rank_after: int

    @property
    def reranked(self) -> bool:
        return not math.isnan(self.raw_score)


@dataclass(frozen=True)
class QueryRanking:
    """The top of one query's ranking before and after re-ranking."""

    query_path: str
    before: list[Entry]
    after: list[Entry]


def read_ranking_table(path: str | Path) -> pd.DataFrame:
    """A re-ranking output with every column of `COLUMNS`; InputError, naming the file, for
    one that is missing, unreadable, of another kind or empty."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise InputError(f"results must be {', '.join(TABLE_SUFFIXES)} (as `elvis rerank -o` "
                         f"writes them), got {path.name}")
    if not path.is_file():
        raise InputError(f"results file {path} not found")
    try:
        table = _read(path)
    except (OSError, ValueError, KeyError, TypeError) as error:  # pandas', pyarrow's, json's
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot read results {path}: {reason}") from None
    missing = [column for column in COLUMNS if column not in table]
    if missing:
        raise InputError(f"{path} is not a re-ranking output: no column {', '.join(missing)}")
    if table.empty:
        raise InputError(f"{path} holds no results")
    return table


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            query = json.loads(line)
            missing = ([key for key in (*QUERY_COLUMNS, "ranking") if key not in query]
                       if isinstance(query, dict) else ["object"])
            if missing:
                raise InputError(f"{path}: line {number} is not a query of a re-ranking output "
                                 f"(no {missing[0]})")
            rows += [{**{key: query[key] for key in QUERY_COLUMNS}, **entry}
                     for entry in query["ranking"]]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(COLUMNS))


def query_rankings(table: pd.DataFrame, top_k: int) -> list[QueryRanking]:
    """Per query, in query order: its top `top_k` by global score (before) and by rank
    (after)."""
    table = table.astype({"global_score": float, "raw_score": float, "score": float})
    rankings = []
    for _, rows in table.sort_values(["query_index", "rank"], kind="stable").groupby(
            "query_index", sort=True):
        before = rows.sort_values("global_score", ascending=False, kind="stable")
        rank_before = dict(zip(before["gallery_index"], range(1, len(before) + 1), strict=True))

        def entries(ordered: pd.DataFrame, rank_before: dict = rank_before) -> list[Entry]:
            return [Entry(str(row.gallery_path), row.global_score, row.raw_score, row.score,
                          rank_before[row.gallery_index], int(row.rank))
                    for row in ordered.head(top_k).itertuples(index=False)]

        rankings.append(QueryRanking(str(rows["query_path"].iloc[0]), entries(before),
                                     entries(rows)))
    return rankings
