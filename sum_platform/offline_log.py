"""The offline log of a ``ds=``-partitioned parquet source: where its folder is and how rows are appended.

Light on purpose (no Feast): serving's write paths log every embedding they write through these functions,
and the DAG file imports serving's store helpers when it is parsed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd

from sum_platform.files import write_parquet


def partition_root(path: str) -> Path:
    """The folder of a partitioned source path: the part before its first glob component
    (``.../data/embeddings/*/*.parquet`` -> ``.../data/embeddings``)."""
    parts = Path(path).parts
    cut = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    return Path(*parts[:cut])


def append_rows(root: Path, frame: pd.DataFrame, timestamp_field: str, name: str | None = None) -> list[Path]:
    """Appends rows to a ``ds=``-partitioned parquet source: one new file per UTC date of ``timestamp_field``.

    Feast's DuckDB store appends by reading the whole source and writing it back as one file, which neither
    fits the daily partitions nor scales with a log that grows by every write-back. Here a write is one
    file per date it touches, written atomically, so a reader never sees half a file.

    Args:
        root: The source's folder (:func:`partition_root`).
        frame: The rows, with a UTC ``timestamp_field``.
        name: The file name (a rerun replaces its own file: idempotent writers pass one); default a unique
            ``part-<uuid>.parquet``.

    Returns:
        The files written.
    """
    written = []
    days = pd.to_datetime(frame[timestamp_field], utc=True).dt.strftime("%Y-%m-%d")
    for ds, rows in frame.groupby(days.to_numpy(), sort=True):
        file = root / f"ds={ds}" / (name or f"part-{uuid.uuid4().hex}.parquet")
        file.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_parquet(rows.reset_index(drop=True), file))
    return written
