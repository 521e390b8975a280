"""Ranked-result tables on disk: the formats `rerank -o` and `search -o` write, the image paths
they hold, and the check of an output path made before any work, so that a bad path never
costs a finished run.

Image paths are written as they can be opened from the folder the command ran in: relative to
it for images under it, else absolute (the features file's root joined with the stored name).
Files without a root, the authors' released descriptors, keep their image names.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

from elvis_cli.util.atomic import atomic_path, writable_output

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from elvis_cli.features.store import DescriptorStore

TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl")
# a query's own columns; in JSON Lines every other column belongs to an entry of its ranking
QUERY_COLUMNS = ("query_index", "query_path")


def checked_output(output: str | Path) -> Path:
    """`output` as a Path, refused now if no table can be written there."""
    return writable_output(output, TABLE_SUFFIXES)


def write_results(table: pd.DataFrame, path: Path) -> None:
    """A table in the format of the suffix of `path`, written atomically."""
    write_results_streamed(iter([table]), path)


def write_results_streamed(tables: Iterator[pd.DataFrame], path: Path) -> int:
    """The rows of `tables` (consecutive pieces of one table, each holding whole queries)
    written as one table in the format of the suffix of `path`, atomically, one piece in
    memory at a time; returns the rows written. A Parquet file gets a row group per piece."""
    rows = 0
    with atomic_path(path) as temporary:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer = None
            for table in tables:
                if writer is None:
                    schema = pa.Schema.from_pandas(table, preserve_index=False)
                    writer = pq.ParquetWriter(temporary, _typed(schema))
                writer.write_table(pa.Table.from_pandas(table, writer.schema,
                                                        preserve_index=False))
                rows += len(table)
            if writer is not None:
                writer.close()
            return rows
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            for number, table in enumerate(tables):
                if path.suffix == ".csv":
                    table.to_csv(handle, index=False, header=number == 0)
                else:
                    handle.writelines(line + "\n" for line in _json_lines(table))
                rows += len(table)
    return rows


def _typed(schema: pa.Schema) -> pa.Schema:
    """`schema` with text for the columns of no type (text columns of a piece without rows)."""
    import pyarrow as pa

    return pa.schema([field.with_type(pa.string()) if pa.types.is_null(field.type) else field
                      for field in schema], metadata=schema.metadata)


def _json_lines(table: pd.DataFrame) -> Iterator[str]:
    """One JSON object per query, in query order: its `query_index`, `query_path` and
    `ranking`, the list of its rows' other columns by rank. A query per line is what `jq`,
    `head` and `grep` want (`jq '.ranking[0].gallery_path'`: each query's best match); a
    score that was not computed (NaN) is null. Single-precision scores are written with the
    digits that read back as the same number, as in the CSV, not float64's seventeen."""
    table = table.sort_values("query_index", kind="stable")
    single = [column for column, dtype in table.dtypes.items() if dtype == "float32"]
    table = table.astype({column: str for column in single}).astype({column: float
                                                                     for column in single})
    rows = table.to_dict("records")
    for _, group in itertools.groupby(rows, key=itemgetter("query_index")):
        group = list(group)
        query = {column: group[0][column] for column in QUERY_COLUMNS}
        ranking = [{key: _json_value(value) for key, value in row.items()
                    if key not in QUERY_COLUMNS} for row in group]
        yield json.dumps({**query, "ranking": ranking}, allow_nan=False)


def _json_value(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


def openable_paths(store: DescriptorStore) -> list[str]:
    """The image paths of `store` as a result table gives them: openable from the current
    folder (relative to it when under it, else absolute); released files keep their names."""
    if store.root is None:
        return list(store.paths)
    here = Path.cwd()  # once, not once per image of a large gallery
    return [openable_path(store.root, name, here) for name in store.paths]


def openable_path(root: Path, name: str, here: Path | None = None) -> str:
    """An image stored as `name` under `root`, as a path that opens from `here` (default: the
    current folder)."""
    image, here = root / name, here or Path.cwd()
    return str(image.relative_to(here) if image.is_relative_to(here) else image)
