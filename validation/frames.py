"""The frame handed to GX: a partition as read plus derived helper columns, and its content digest.

GX works badly with pandas object columns holding arrays and with timezone-aware dtypes, so the frame
handed to GX carries derived helper columns, named ``<column>__<what>``, and some expectations (see
:mod:`validation.suites`) are put on those:

    ``event_ts__type``          ``timestamp[UTC]`` when ``event_ts`` is a UTC timestamp, else its dtype
    ``event_ts__utc_date``      the UTC calendar date of each event (must be the partition's ds)
    ``event_ts__utc``           the UTC instant of each user row (must be ds 00:00)
    ``<list>__is_id_list``      the value is a list of integer ids
    ``<list>__len``             the list length
    ``<list>__min_id``          the smallest id of the list (null for an empty list)
    ``<list>__max_id``          the largest id of the list (null for an empty list)
    ``user_id__without_user_row`` the event's user_id when the users partition has no row for it, else null
    ``table__content_digest``   one value per partition: a hash of its rows without date-dependent columns

Partitions are read with :func:`sum_platform.partitions.read_partition`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sum_models.spec import FeatureSpec
from sum_platform.partitions import PartitionReadError, read_partition
from validation.suites import CONTENT_DIGEST, UTC_TIMESTAMP, check_kind

if TYPE_CHECKING:
    from sum_platform.config import Params


def _utc_type(col: pd.Series) -> str:
    dtype = col.dtype
    if isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) in ("UTC", "utc", "Etc/UTC", "+00:00", "Z"):
        return UTC_TIMESTAMP
    return str(dtype)


def _as_utc(col: pd.Series) -> pd.Series:
    """The column as UTC timestamps (naive values are taken as UTC; unparseable values become NaT)."""
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return col.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(col.dtype):
        return col.dt.tz_localize("UTC")
    try:
        return pd.to_datetime(col, utc=True, errors="coerce")
    except (TypeError, ValueError, OverflowError):
        return pd.Series(pd.NaT, index=col.index, dtype="datetime64[ns, UTC]")


def _list_stats(values: pd.Series) -> tuple[list[bool], list[float], list[float], list[float]]:
    is_list, lengths, mins, maxs = [], [], [], []
    for v in values:
        if isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v)
            ok = arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer))
            is_list.append(bool(ok))
            lengths.append(float(len(arr)))
            mins.append(float(arr.min()) if ok and arr.size else math.nan)
            maxs.append(float(arr.max()) if ok and arr.size else math.nan)
        else:
            is_list.append(v is None or (isinstance(v, float) and math.isnan(v)))  # nulls: not-null check
            lengths.append(math.nan)
            mins.append(math.nan)
            maxs.append(math.nan)
    return is_list, lengths, mins, maxs


def _hashable(col: pd.Series) -> pd.Series:
    """A column pandas can hash row by row (lists and arrays become their bytes' hex)."""
    if col.dtype != object:
        return col
    def one(v: Any) -> Any:
        if isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v)
            return f"{arr.dtype.str}:{arr.tobytes().hex()}"
        return v if v is None or isinstance(v, (str, bytes)) else repr(v)
    return col.map(one)


def content_digest(kind: str, df: pd.DataFrame, params: "Params") -> str:
    """A hash of a partition's rows, independent of row order and of its date-dependent columns.

    ``event_ts`` and ``impression_id`` are left out, so a stuck upstream that re-delivers yesterday's rows
    re-stamped with today's date has yesterday's digest. Never raises: an unhashable partition gets a
    digest of its error (other checks report what is wrong with it).
    """
    check_kind(kind)
    drop = {params.events.timestamp, "impression_id"}
    cols = sorted(c for c in df.columns if c not in drop and "__" not in c)
    try:
        frame = pd.DataFrame({c: _hashable(df[c]) for c in cols})
        rows = np.sort(pd.util.hash_pandas_object(frame, index=False).to_numpy()) if cols else np.array([])
        payload = json.dumps([kind, cols, len(df)]).encode() + rows.tobytes()
    except Exception as err:  # noqa: BLE001 - a malformed partition still gets a (unique-ish) digest
        payload = f"{kind}:unhashable:{type(err).__name__}:{err}:{len(df)}".encode()
    return hashlib.sha256(payload).hexdigest()[:20]


def batch_frame(
    kind: str, df: pd.DataFrame, spec: FeatureSpec, params: "Params", user_ids: np.ndarray | None = None,
) -> pd.DataFrame:
    """The frame handed to GX: the partition plus the derived ``<column>__<what>`` helper columns.

    A helper is only derived when its source column exists (a missing column is reported by the schema
    check and by every expectation on it or on its helpers).

    Args:
        kind: ``events`` or ``users``.
        df: The partition as read.
        spec: The model's input spec.
        params: Platform params.
        user_ids: The ``user_id`` values of the day's users partition, for the events' referential check;
            ``None`` leaves the helper empty (the check passes; :func:`validate_partition` reports it as
            skipped).
    """
    check_kind(kind)
    out = df.copy()
    ts, uid = params.events.timestamp, params.events.user_id
    if ts in df.columns:
        out[f"{ts}__type"] = _utc_type(df[ts])
        utc = _as_utc(df[ts])
        unparseable = utc.isna() & df[ts].notna()
        if kind == "events":
            helper = utc.dt.strftime("%Y-%m-%d")
        else:
            helper = utc.dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str.removesuffix(".000000")
        out[f"{ts}__utc_date" if kind == "events" else f"{ts}__utc"] = helper.mask(unparseable, "<unparseable>")
    if kind == "events" and uid in df.columns:
        missing = pd.Series(pd.NA, index=df.index, dtype="object")
        if user_ids is not None:
            try:
                absent = ~df[uid].isin(pd.Index(user_ids)) & df[uid].notna()
            except (TypeError, ValueError):
                absent = df[uid].notna()
            missing = df[uid].astype("object").where(absent, None)
        out[f"{uid}__without_user_row"] = missing
    if kind == "users":
        for name in spec.user_sparse:
            if name in df.columns:
                is_list, lengths, mins, maxs = _list_stats(df[name])
                out[f"{name}__is_id_list"] = is_list
                out[f"{name}__len"] = lengths
                out[f"{name}__min_id"] = mins
                out[f"{name}__max_id"] = maxs
    out[CONTENT_DIGEST] = content_digest(kind, df, params)
    return out


def partition_user_ids(users: pd.DataFrame | None, folder: Path, params: "Params") -> np.ndarray | None:
    """The users partition's ``user_id`` values, or None when they cannot be read.

    Args:
        users: The users partition as already read (None: it could not be read as a whole).
        folder: The users partition folder, read again for the one column only when ``users`` is None
            (its files may not combine as a whole while their ``user_id`` columns do).
        params: Platform params (the ``user_id`` column name).
    """
    column = params.events.user_id
    if users is not None:
        return users[column].to_numpy() if column in users.columns else None
    if not Path(folder).is_dir():
        return None
    try:
        return read_partition(folder, columns=[column])[column].to_numpy()
    except PartitionReadError:  # unreadable or without user_id: the users report says why
        return None
