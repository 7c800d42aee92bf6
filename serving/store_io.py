"""Reads and writes of SUM embeddings in the online store: one shape for every writer.

The daily batch (``materialize_embeddings``) and the SOAP compute deployment both write through
:func:`write_embeddings`, and the SOAP client reads through :func:`read_embeddings`, so the stored row is
always the same: ``embedding_0 .. embedding_{K-1}`` (fp16-rounded values stored as float32 arrays, see
``feature_repo/definitions.py``), ``snapshot_id`` and ``written_at_ms``, pushed through the
``sum_embeddings_push`` source with event time ``written_at``.

Also holds the read of a user's current input features (the user tower's inputs) used by compute.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pandas as pd

from sum_platform.feature_store import EMBEDDINGS_PUSH, EMBEDDINGS_VIEW, USER_FEATURES_VIEW

if TYPE_CHECKING:
    from feast import FeatureStore

    from sum_models.spec import FeatureSpec

__all__ = [
    "num_embeddings",
    "to_ms",
    "write_embeddings",
    "read_embeddings",
    "read_user_features",
]

_EMB_RE = re.compile(r"^embedding_(\d+)$")
#: Largest entity id accepted anywhere (the join key is a signed int64).
MAX_USER_ID = 2**63 - 1


def num_embeddings(store: "FeatureStore") -> int:
    """K, read from the registered ``sum_embeddings`` view (``embedding_0 .. embedding_{K-1}``)."""
    view = store.get_feature_view(EMBEDDINGS_VIEW)
    ks = sorted(int(m.group(1)) for f in view.features if (m := _EMB_RE.match(f.name)))
    if not ks or ks != list(range(len(ks))):
        raise ValueError(f"view {EMBEDDINGS_VIEW!r} must declare embedding_0..embedding_(K-1); got {ks}")
    return len(ks)


def to_ms(ts: datetime | pd.Timestamp | int | float | None) -> int:
    """Unix milliseconds (UTC) of a time; ``None`` is now. Naive datetimes are taken as UTC."""
    if ts is None:
        return int(datetime.now(timezone.utc).timestamp() * 1000)
    if isinstance(ts, (int, np.integer)):
        return int(ts)
    if isinstance(ts, (float, np.floating)):
        return int(round(float(ts)))
    t = pd.Timestamp(ts)
    if t.tzinfo is None:
        t = t.tz_localize("UTC")
    return int(t.value // 1_000_000)


def _as_user_ids(user_ids: Iterable[Any]) -> np.ndarray:
    ids = np.asarray(list(user_ids) if not isinstance(user_ids, np.ndarray) else user_ids)
    if ids.ndim != 1:
        raise ValueError(f"user_ids must be one-dimensional, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"user_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and int(ids.min()) < 0:
        raise ValueError("user_ids must be non-negative")
    return ids


def write_embeddings(
    store: "FeatureStore",
    user_ids: Sequence[int] | np.ndarray,
    embeddings_fp16: np.ndarray,
    snapshot_id: str,
    written_at: datetime | pd.Timestamp | int | None = None,
    *,
    to_offline: bool = False,
) -> int:
    """Writes users' SUM embeddings to the online store (last write wins per user).

    Args:
        store: An open feature store whose definitions are applied.
        user_ids: ``N`` user ids (int64, non-negative; a repeated id keeps its last row).
        embeddings_fp16: ``[N, K, D]`` embeddings. Values are rounded to fp16 (a no-op for an fp16
            array) and stored as float32, so every stored value is exactly representable in fp16.
        snapshot_id: The snapshot that computed them.
        written_at: Write time (datetime, pandas Timestamp or Unix ms; naive = UTC); default now.
            Stored as ``written_at_ms`` and as the row's event time.
        to_offline: Also append the rows to the push source's offline batch source.

    Returns:
        The number of rows written.

    Raises:
        ValueError: Shapes disagree with each other or with the view's K, values are not finite in
            fp16, or ``snapshot_id`` is empty.
    """
    from feast.data_source import PushMode

    ids = _as_user_ids(user_ids)
    emb = np.asarray(embeddings_fp16)
    if emb.ndim != 3:
        raise ValueError(f"embeddings must be [N, K, D], got shape {emb.shape}")
    if emb.shape[0] != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} user ids but {emb.shape[0]} embedding rows")
    k = num_embeddings(store)
    if emb.shape[1] != k:
        raise ValueError(f"embeddings have K={emb.shape[1]}, view {EMBEDDINGS_VIEW!r} declares K={k}")
    if not snapshot_id:
        raise ValueError("snapshot_id must be a non-empty string")
    emb16 = emb.astype(np.float16)
    if not np.isfinite(emb16).all():
        raise ValueError("embeddings have NaN/inf values (or values overflowing fp16)")
    if ids.size == 0:
        return 0
    emb32 = emb16.astype(np.float32)

    ms = to_ms(written_at)
    frame: dict[str, Any] = {"user_id": ids}
    for j in range(k):
        frame[f"embedding_{j}"] = list(emb32[:, j, :])
    frame["snapshot_id"] = np.full(ids.shape[0], str(snapshot_id), dtype=object)
    frame["written_at_ms"] = np.full(ids.shape[0], ms, dtype=np.int64)
    frame["written_at"] = pd.Timestamp(ms, unit="ms", tz="UTC")
    df = pd.DataFrame(frame)
    df = df.drop_duplicates("user_id", keep="last")
    mode = PushMode.ONLINE_AND_OFFLINE if to_offline else PushMode.ONLINE
    store.push(EMBEDDINGS_PUSH, df, to=mode)
    return int(len(df))


def read_embeddings(store: "FeatureStore", user_ids: Sequence[int] | np.ndarray) -> dict[int, dict[str, Any]]:
    """Reads users' stored SUM embeddings from the online store.

    Args:
        store: An open feature store whose definitions are applied.
        user_ids: User ids (int64, non-negative).

    Returns:
        ``{user_id: {"snapshot_id": str, "written_at_ms": int, "embeddings": float16 [K, D]}}`` for
        the users that have a stored row; users without one are absent.
    """
    ids = _as_user_ids(user_ids)
    if ids.size == 0:
        return {}
    k = num_embeddings(store)
    names = [f"embedding_{j}" for j in range(k)] + ["snapshot_id", "written_at_ms"]
    unique = list(dict.fromkeys(int(u) for u in ids))
    resp = store.get_online_features(
        features=[f"{EMBEDDINGS_VIEW}:{n}" for n in names],
        entity_rows=[{"user_id": u} for u in unique],
    ).to_dict()
    out: dict[int, dict[str, Any]] = {}
    for i, uid in enumerate(resp["user_id"]):
        vectors = [resp[f"embedding_{j}"][i] for j in range(k)]
        if any(v is None or len(v) == 0 for v in vectors):
            continue
        try:
            arr = np.asarray(vectors, dtype=np.float32).astype(np.float16)
        except ValueError:  # ragged rows (a corrupt write): treat as absent
            continue
        ms = resp["written_at_ms"][i]
        out[int(uid)] = {
            "snapshot_id": resp["snapshot_id"][i],
            "written_at_ms": int(ms) if ms is not None else None,
            "embeddings": arr,
        }
    return out


def read_user_features(
    store: "FeatureStore", user_ids: Sequence[int] | np.ndarray, spec: "FeatureSpec"
) -> tuple[pd.DataFrame, dict[int, str]]:
    """Reads users' current input features (the user tower's inputs) from the online store.

    Args:
        store: An open feature store whose definitions are applied.
        user_ids: User ids.
        spec: The model's input spec (which dense and sparse columns to read).

    Returns:
        ``(frame, skipped)``: one row per user with complete features (``user_id`` plus every spec
        column; a missing sparse list is an empty list), and ``{user_id: reason}`` for the users that
        cannot be embedded (no stored row, or a missing dense value).
    """
    ids = _as_user_ids(user_ids)
    columns = list(spec.user_dense) + list(spec.user_sparse)
    if ids.size == 0:
        return pd.DataFrame(columns=["user_id", *columns]), {}
    unique = list(dict.fromkeys(int(u) for u in ids))
    resp = store.get_online_features(
        features=[f"{USER_FEATURES_VIEW}:{c}" for c in columns],
        entity_rows=[{"user_id": u} for u in unique],
    ).to_dict()
    df = pd.DataFrame({"user_id": np.asarray(resp["user_id"], dtype=np.int64)})
    for c in columns:
        df[c] = resp[c]
    skipped: dict[int, str] = {}
    if columns:
        absent = df[columns].isna().all(axis=1).to_numpy()
    else:
        absent = np.zeros(len(df), dtype=bool)
    dense_missing = (
        df[list(spec.user_dense)].isna().any(axis=1).to_numpy() if spec.user_dense else np.zeros(len(df), bool)
    )
    for uid, a, d in zip(df["user_id"].tolist(), absent, dense_missing):
        if a:
            skipped[int(uid)] = "no_features"
        elif d:
            skipped[int(uid)] = "missing_dense_features"
    keep = ~(absent | dense_missing)
    df = df.loc[keep].reset_index(drop=True)
    for c in spec.user_sparse:
        df[c] = [v if v is not None else [] for v in df[c].tolist()]
    for c in spec.user_dense:
        df[c] = df[c].astype(np.float32)
    return df, skipped
