"""Reading a daily partition (``data/events/ds=…/`` or ``data/users/ds=…/``): the one route to its files.

A partition folder holds one or more ``*.parquet`` files (see :class:`sum_platform.workspace.Workspace`).
:func:`read_partition` reads all of them into one pandas frame, list columns as object columns of numpy
arrays (pyarrow's ``to_pandas``, as ``pd.read_parquet`` gives them). pyarrow is imported on first read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import pandas as pd


class PartitionReadError(Exception):
    """The partition folder is missing, empty or unreadable."""


def read_partition(folder: str | Path, columns: Sequence[str] | None = None) -> "pd.DataFrame":
    """Reads every ``*.parquet`` file of a partition folder (or a single parquet file) into one frame.

    Files are read one by one and concatenated in file-name order (pyarrow's default promotion: a column
    that a file lacks is null in its rows; a column's type must be the same in every file).

    Args:
        folder: The partition folder, or one parquet file.
        columns: Read only these columns (None: all).

    Raises:
        PartitionReadError: The folder does not exist, holds no parquet file, a file is unreadable (or
            lacks a requested column), or the files' schemas do not combine.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(folder)
    if not path.exists():
        raise PartitionReadError(f"partition folder {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.parquet") if p.is_file())
    if not files:
        raise PartitionReadError(f"no parquet files in partition folder {path}")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=None if columns is None else list(columns)))
        except Exception as err:  # noqa: BLE001 - any reader error means the file is unusable
            raise PartitionReadError(f"unreadable parquet file {f}: {type(err).__name__}: {err}") from err
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        return table.to_pandas()
    except Exception as err:  # noqa: BLE001
        raise PartitionReadError(f"parquet files of {path} do not combine: {type(err).__name__}: {err}") from err
