"""Reading a daily partition (placeholder until the validation split lands)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def read_partition(folder: Path, columns: Sequence[str] | None = None):
    import pandas as pd

    return pd.read_parquet(folder, columns=list(columns) if columns else None)
