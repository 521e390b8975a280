"""Ranked-result tables on disk: the formats `rerank -o` and `search -o` write, and the check
of an output path made before any work, so that a bad path never costs a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from elvis_cli.util.atomic import atomic_path
from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

TABLE_SUFFIXES = (".csv", ".parquet")


def checked_output(output: str | Path) -> Path:
    """`output` as a Path, refused now if no table can be written there."""
    path = Path(output)
    if path.suffix not in TABLE_SUFFIXES:
        raise InputError(f"output must end in .csv or .parquet, got {path.name}")
    return path


def write_results(table: pd.DataFrame, path: Path) -> None:
    """A table in the format of the suffix of `path`, written atomically."""
    with atomic_path(path) as temporary:
        if path.suffix == ".csv":
            table.to_csv(temporary, index=False)
        else:
            table.to_parquet(temporary, index=False)
