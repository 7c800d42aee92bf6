"""Reads and writes of SUM embeddings in the online store: one shape for every writer.

The daily batch (``materialize_embeddings``) and the SOAP compute deployment both write through
:func:`write_embeddings`, so every stored row is pooled the same way: by the row's owner,
:mod:`sum_platform.embedding_row` (its fields, its packing and the pooling rule, paper §5.2: the served value is
the mean of the current computed embedding and the latest versions of the two previous snapshots, or of the two
previous writes under ``serving.pool_unit: write``). One row per user holds (``feature_repo/definitions.py``, view
``sum_embeddings``):

* ``embedding_0 .. embedding_{K-1}`` - the served value: fp16 mean of the non-empty raw versions below;
* ``raw_embedding_k`` (latest version), ``prev1_embedding_k``, ``prev2_embedding_k`` - raw versions, fp16, with
  the snapshot that computed each: ``snapshot_id`` (raw's), ``prev1_snapshot_id``, ``prev2_snapshot_id``;
* ``written_at_ms`` - write time of the latest version; ``pooled_versions`` (1-3);
* ``batch_embedding_k``, ``batch_snapshot_id``, ``batch_written_at_ms`` - the last daily batch value
  (what ``offline`` mode serves);
* ``served_packed``, ``batch_packed`` - the served and the batch value again, each with its snapshot id, write
  time and versions, packed into one bytes field (``pack_value``): what SOAP's reads fetch, one row and one
  decode instead of K + 3 (a row without them - written before they existed, or materialised from an older
  log - is read from the fields above).

A write reads the users' rows, puts the new version in (:func:`sum_platform.embedding_row.shift_in`: replace the
snapshot's own slot, shift for a new snapshot, drop a late write of a snapshot the row has moved past - such a row
is not rewritten), pools and writes whole rows. Rows written before the per-slot snapshot ids (schema v1) are
migrated by their next write, or all at once by :func:`migrate_rows` (``sumctl migrate-embeddings``); a rollback
takes the rolled-back snapshot out of every row and records it as retired in the online store, so an old replica's
late write of it is dropped (:func:`retire_snapshot`). Concurrent writers (compute replicas,
the daily batch) never lose a version: on SQLite the read-modify-write holds an exclusive file lock next to the
database and writes through Feast's provider (``ingest_df``: what ``write_to_online_store`` runs after a registry
lookup the reader has already done); on Redis it is a transaction per chunk of users (``WATCH`` their keys, read
and pool, ``MULTI`` / ``HSET`` / ``EXEC``, again on a conflict) writing the rows in Feast's Redis layout, encoded
by Feast's own provider code.

Reads (:func:`read_embeddings`, :class:`EmbeddingReader`) go straight to Feast's online tables (same rows,
same value protos Feast writes; keys serialised with Feast's own function): a ``SELECT`` on the SQLite
table, one pipelined ``HMGET`` per batch on Redis, of the one packed field of the value asked for. They skip
``get_online_features``'s per-call registry and response-building work: ~0.03 ms instead of ~0.26 ms at p99 on
SQLite (``benchmarks/serving_bench.py``).
Being a read of the store itself it is always coherent with every writer - unlike an in-process cache, which
other processes' write-backs would leave stale. Other online store types fall back to
``get_online_features``. The SQLite database is switched to WAL journaling so reads never wait behind a
write transaction.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from sum_platform.files import exclusive_lock, write_json
from sum_platform.embedding_row import (PACKED_FIELDS, POOL_UNITS, SLOT_ID_FIELDS, SLOTS, VALUE_PREFIX, PoolUnit,
                                       Slots, as_slots,
                                       batch_fields, drop_snapshot, history_fields, migrate_ids, pack_value, pool,
                                       served_fields, shift_in, unpack_value, v1_rows)
from sum_platform.feature_store import EMBEDDINGS_VIEW, user_features_view
from sum_platform.offline_log import append_rows, partition_root

if TYPE_CHECKING:
    from feast import FeatureStore

    from sum_models.spec import FeatureSpec

__all__ = [
    "MAX_USER_ID",
    "EmbeddingReader",
    "OnlineRowReader",
    "num_embeddings",
    "to_ms",
    "write_embeddings",
    "log_offline",
    "delete_rows",
    "read_embeddings",
    "read_embeddings_feast",
    "read_history",
    "read_user_features",
    "read_user_rows",
    "reader_for",
    "pooled_preview",
    "migrate_rows",
    "retire_snapshot",
    "retired_snapshots",
    "reinstate_snapshot",
    "v1_row_count",
    "row_dim",
    "row_slots",
    # the row owner's (sum_platform.embedding_row), re-exported for the readers of this module
    "pack_value",
    "unpack_value",
    "PACKED_FIELDS",
    "served_fields",
    "batch_fields",
    "history_fields",
]

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------------
_LIST_DTYPES = {
    "float_list_val": np.float32,
    "double_list_val": np.float64,
    "int64_list_val": np.int64,
    "int32_list_val": np.int32,
}


def _decode(value_bytes: bytes) -> Any:
    """A Feast value proto as Python: numeric lists as numpy arrays, scalars as is, null as None."""
    from feast.protos.feast.types.Value_pb2 import Value

    v = Value()
    v.ParseFromString(value_bytes)
    kind = v.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    if kind in _LIST_DTYPES:
        return np.asarray(getattr(v, kind).val, dtype=_LIST_DTYPES[kind])
    if kind.endswith("_list_val"):
        return list(getattr(v, kind).val)
    return getattr(v, kind)


@functools.lru_cache(maxsize=1 << 16)
def _entity_key(user_id: int, version: int) -> bytes:
    """Feast's serialised entity key of a user (cached: serialising the proto was ~5 % of a read)."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return serialize_entity_key(
        EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user_id)]),
        entity_key_serialization_version=version,
    )


class OnlineRowReader:
    """Reads users' rows of one feature view from the online store (one connection per thread).

    SQLite online store: a direct ``SELECT`` on Feast's table (see the module docstring; Feast's online
    reads do not apply the view's TTL either); anything else: Feast's ``get_online_features``.

    Args:
        store: An open feature store whose definitions are applied.
        view: The feature view's name.
    """

    def __init__(self, store: "FeatureStore", view: str) -> None:
        from feast.infra.online_stores.helpers import compute_table_id

        self.store = store
        self.view = view
        # Held for writes too: Feast's write_to_online_store rebuilds every view from the registry's protos on
        # each call (~45 % of a compute write-back's time).
        self.feature_view = store.get_feature_view(view)
        cfg = store.config
        kind = str(getattr(cfg.online_store, "type", ""))
        self.backend = kind if kind in ("sqlite", "redis") else "feast"
        self._direct = self.backend == "sqlite"
        self._local = threading.local()
        self._ek_version = int(cfg.entity_key_serialization_version)
        if self.backend == "redis":
            from feast.infra.online_stores.helpers import _mmh3
            from feast.infra.online_stores.redis import _versioned_fv_name

            self.redis = redis_client(cfg.online_store.connection_string)
            self._project = cfg.project.encode("utf-8")
            self._fv_name = _versioned_fv_name(self.feature_view, cfg)
            self._ts_field = f"_ts:{self._fv_name}".encode()
            self._field_hash = lambda name: _mmh3(f"{self._fv_name}:{name}")
            self.retired_key = _retired_key(cfg)
        if self._direct:
            self.path = _sqlite_path(cfg)
            self.retired_path = _retired_path(cfg)
            versioning = bool(getattr(cfg.registry, "enable_online_feature_view_versioning", False))
            self.table = compute_table_id(cfg.project, self.feature_view, versioning)
            self._identity = self._file_identity()

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def replaced(self) -> bool:
        """Whether the SQLite file at the store's path is another file than when this reader was made (a rebuilt
        store, ``sumctl rebuild-online``): open connections, Feast's too, still point at the old one."""
        return self._direct and self._file_identity() != self._identity

    def _conn(self, timeout_s: float) -> sqlite3.Connection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(timeout_s)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
            try:  # persistent on the file; readers then never wait behind a writer's transaction
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                log.debug("could not switch %s to WAL: %s", self.path, exc)
            conns[timeout_s] = conn
        return conn

    def _key(self, user_id: int) -> bytes:
        return _entity_key(int(user_id), self._ek_version)

    def redis_key(self, user_id: int) -> bytes:
        """The Redis key of a user's row (Feast's layout: serialised entity key + project)."""
        return self._key(user_id) + self._project

    def rows(self, user_ids: Sequence[int], fields: Sequence[str], timeout_s: float = 30.0) -> dict[int, dict[str, Any]]:
        """``{user_id: {field: value}}`` for users with a stored row (absent fields: None).

        Numeric lists come back as numpy arrays (empty for an empty stored list). ``timeout_s`` bounds
        the wait for a lock (``sqlite3.OperationalError`` past it); in WAL mode reads rarely wait at all.
        """
        unique = list(dict.fromkeys(int(u) for u in user_ids))
        if not unique:
            return {}
        if self.backend == "redis":
            return self._rows_redis(unique, fields)
        if not self._direct:
            return self._rows_feast(unique, fields)
        keys = {self._key(u): u for u in unique}
        fph = ",".join("?" * len(fields))
        kph = ",".join("?" * len(keys))
        sql = (
            f'SELECT entity_key, feature_name, value FROM "{self.table}" '
            f"WHERE entity_key IN ({kph}) AND feature_name IN ({fph})"
        )
        out: dict[int, dict[str, Any]] = {}
        for key, name, value in self._conn(timeout_s).execute(sql, (*keys, *fields)):
            row = out.get(keys[key])
            if row is None:
                row = out[keys[key]] = dict.fromkeys(fields)
            row[name] = _decode(value)
        return out

    def user_ids(self) -> list[int]:
        """Every user with a row in the online store (SQLite: of this view's table; Redis: a hash of the project,
        which may hold other views only). For consistency checks, not for the read path."""
        from feast.infra.key_encoding_utils import deserialize_entity_key

        if self.backend == "redis":
            n = len(self._project)
            keys = [k[:-n] for k in self.redis.scan_iter(match=b"*" + self._project, count=1000)]
        elif self._direct:
            keys = [k for (k,) in self._conn(30.0).execute(f'SELECT DISTINCT entity_key FROM "{self.table}"')]
        else:
            raise NotImplementedError(f"listing the users of a {self.backend} online store")
        ids = []
        for key in keys:
            try:
                values = deserialize_entity_key(bytes(key), self._ek_version).entity_values
            except Exception:  # another entity's key in a shared Redis: not a user
                continue
            if len(values) == 1 and values[0].WhichOneof("val") == "int64_val":
                ids.append(int(values[0].int64_val))
        return sorted(set(ids))

    def _rows_redis(self, unique: list[int], fields: Sequence[str]) -> dict[int, dict[str, Any]]:
        """One pipelined round trip: ``HMGET`` of the fields' hashed names in each user's hash (Feast's layout:
        ``mmh3("<view>:<feature>")`` -> the value proto, ``_ts:<view>`` -> the event time)."""
        hashed = [self._field_hash(f) for f in fields]
        with self.redis.pipeline(transaction=False) as pipe:
            for u in unique:
                pipe.hmget(self.redis_key(u), hashed)
            replies = pipe.execute()
        out: dict[int, dict[str, Any]] = {}
        for u, values in zip(unique, replies):
            if all(v is None for v in values):
                continue
            out[u] = {f: (_decode(v) if v is not None else None) for f, v in zip(fields, values)}
        return out

    def _rows_feast(self, unique: list[int], fields: Sequence[str]) -> dict[int, dict[str, Any]]:
        resp = self.store.get_online_features(
            features=[f"{self.view}:{n}" for n in fields], entity_rows=[{"user_id": u} for u in unique]
        ).to_dict()
        out: dict[int, dict[str, Any]] = {}
        for i, uid in enumerate(resp["user_id"]):
            row = {}
            for n in fields:
                v = resp[n][i]
                row[n] = np.asarray(v) if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) else v
            if any(v is not None and not (isinstance(v, np.ndarray) and v.size == 0) for v in row.values()):
                out[int(uid)] = row
        return out


class EmbeddingReader(OnlineRowReader):
    """Reads ``sum_embeddings`` rows (see :class:`OnlineRowReader`).

    Args:
        store: An open feature store whose definitions are applied.
    """

    def __init__(self, store: "FeatureStore") -> None:
        super().__init__(store, EMBEDDINGS_VIEW)
        self.k = num_embeddings(store)

    def embeddings(
        self, user_ids: Sequence[int], source: str = "served", timeout_s: float = 30.0
    ) -> dict[int, dict[str, Any]]:
        """Users' stored embeddings.

        Args:
            user_ids: User ids.
            source: ``served`` (the pooled value, what async/realtime modes answer) or ``batch`` (the
                daily batch value, what offline mode answers).
            timeout_s: Lock wait bound (see :meth:`rows`).

        Returns:
            ``{user_id: {"snapshot_id", "written_at_ms", "pooled_versions", "embeddings": float16 [K, D]}}``
            for users with a complete value; others are absent.
        """
        if source not in PACKED_FIELDS:
            raise ValueError(f"source must be 'served' or 'batch', got {source!r}")
        field = PACKED_FIELDS[source]
        packed = self.rows(user_ids, [field], timeout_s)
        out: dict[int, dict[str, Any]] = {}
        unpacked: list[int] = []  # rows written before the packed fields existed (or no row at all)
        for uid in dict.fromkeys(int(u) for u in user_ids):
            raw = (packed.get(uid) or {}).get(field)
            if (value := unpack_value(raw)) is not None:
                out[uid] = value
            elif raw != b"":  # b"": no such value (a user without a batch value); None: no packed copy
                unpacked.append(uid)
        if unpacked:
            out.update(self._unpacked_embeddings(unpacked, source, timeout_s))
        return out

    def _unpacked_embeddings(self, user_ids: list[int], source: str, timeout_s: float) -> dict[int, dict[str, Any]]:
        """:meth:`embeddings` from the separate fields (K arrays, snapshot id, write time, versions)."""
        k = self.k
        if source == "served":
            fields, sid, ms = served_fields(k), "snapshot_id", "written_at_ms"
        else:
            fields, sid, ms = batch_fields(k), "batch_snapshot_id", "batch_written_at_ms"
        prefix = VALUE_PREFIX[source]
        out: dict[int, dict[str, Any]] = {}
        for uid, row in self.rows(user_ids, fields, timeout_s).items():
            arr = _stack([row.get(f"{prefix}{j}") for j in range(k)])
            if arr is None:
                continue
            written = row.get(ms)
            pooled = row.get("pooled_versions") if source == "served" else None
            out[uid] = {
                "snapshot_id": row.get(sid),
                "written_at_ms": int(written) if written is not None else None,
                "pooled_versions": int(pooled) if pooled is not None else None,
                "embeddings": arr.astype(np.float16),
            }
        return out


def _stack(vectors: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """``[K, D]`` float32 from K stored vectors; None when any is missing/empty or they are ragged."""
    if not vectors or any(v is None or len(v) == 0 for v in vectors):
        return None
    if len({len(v) for v in vectors}) != 1:  # a corrupt write: treat as absent
        return None
    return np.stack([np.asarray(v, dtype=np.float32) for v in vectors])


def _sqlite_path(cfg: Any) -> Path:
    """The SQLite online store's database file of a Feast repo config."""
    path = Path(cfg.online_store.path)
    if not path.is_absolute() and cfg.repo_path:
        path = Path(cfg.repo_path) / path
    return path


def redis_client(connection_string: str):
    """A redis-py client for a Feast connection string (``host:port,password=...``; a pool, thread-safe)."""
    import redis

    parts = connection_string.split(",")
    host, _, port = parts[0].rpartition(":")
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return redis.Redis(host=host or "127.0.0.1", port=int(port or 6379), password=options.get("password"),
                       db=int(options.get("db", 0)), socket_timeout=30, socket_connect_timeout=5)


_READERS: dict[tuple[int, str, str], OnlineRowReader] = {}
_READERS_LOCK = threading.Lock()


def reader_for(store: "FeatureStore", view: str = EMBEDDINGS_VIEW) -> Any:
    """The (cached) reader of a view of an open store (:class:`EmbeddingReader` for the embeddings)."""
    online = store.config.online_store
    key = (id(store), str(getattr(online, "path", None) or getattr(online, "connection_string", "")), view)
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None or reader.store is not store:
            reader = EmbeddingReader(store) if view == EMBEDDINGS_VIEW else OnlineRowReader(store, view)
            _READERS[key] = reader
        return reader


def read_embeddings(
    store: "FeatureStore", user_ids: Sequence[int] | np.ndarray, source: str = "served"
) -> dict[int, dict[str, Any]]:
    """Reads users' stored SUM embeddings from the online store.

    Args:
        store: An open feature store whose definitions are applied.
        user_ids: User ids (int64, non-negative).
        source: ``served`` (pooled value) or ``batch`` (last daily batch value).

    Returns:
        ``{user_id: {"snapshot_id": str, "written_at_ms": int, "pooled_versions": int | None,
        "embeddings": float16 [K, D]}}`` for the users that have a stored value; others are absent.
    """
    ids = _as_user_ids(user_ids)
    return reader_for(store).embeddings(ids.tolist(), source)


def read_embeddings_feast(store: "FeatureStore", user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The served value through Feast's ``get_online_features`` (reference for the direct read)."""
    ids = _as_user_ids(user_ids)
    if ids.size == 0:
        return {}
    k = num_embeddings(store)
    names = served_fields(k)
    resp = store.get_online_features(
        features=[f"{EMBEDDINGS_VIEW}:{n}" for n in names],
        entity_rows=[{"user_id": int(u)} for u in dict.fromkeys(ids.tolist())],
    ).to_dict()
    out: dict[int, dict[str, Any]] = {}
    for i, uid in enumerate(resp["user_id"]):
        arr = _stack([resp[f"embedding_{j}"][i] for j in range(k)])
        if arr is None:
            continue
        ms, pooled = resp["written_at_ms"][i], resp["pooled_versions"][i]
        out[int(uid)] = {
            "snapshot_id": resp["snapshot_id"][i],
            "written_at_ms": int(ms) if ms is not None else None,
            "pooled_versions": int(pooled) if pooled is not None else None,
            "embeddings": arr.astype(np.float16),
        }
    return out


def read_history(store: "FeatureStore", user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Whole rows (served value, raw versions, batch value) of users, for writers and tests.

    Returns:
        ``{user_id: {field: value}}``; arrays as float32 numpy arrays, empty when a slot is unused.
    """
    reader = reader_for(store)
    return reader.rows(_as_user_ids(user_ids).tolist(), history_fields(reader.k))


def delete_rows(store: "FeatureStore", user_ids: Sequence[int] | np.ndarray, view: str = EMBEDDINGS_VIEW) -> None:
    """Deletes users' rows of a view from the online store (Feast has no per-key delete).

    SQLite: the rows of the users' keys in the view's table; Redis: the view's fields in the users' hashes
    (other views of the same user stay).
    """
    reader = reader_for(store, view)
    ids = _as_user_ids(user_ids).tolist()
    if reader.backend == "redis":
        names = [f.name for f in store.get_feature_view(view).features]
        fields = [reader._field_hash(n) for n in names] + [reader._ts_field]
        with reader.redis.pipeline(transaction=False) as pipe:
            for u in ids:
                pipe.hdel(reader.redis_key(u), *fields)
            pipe.execute()
    elif reader.backend == "sqlite":
        with _write_lock(store):
            conn = sqlite3.connect(reader.path, timeout=30)
            try:
                with conn:
                    conn.executemany(f'DELETE FROM "{reader.table}" WHERE entity_key = ?', [(reader._key(u),) for u in ids])
            finally:
                conn.close()
    else:
        raise NotImplementedError(f"deleting rows of a {reader.backend} online store")


# ---------------------------------------------------------------------------------------------
# Writes
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _write_lock(store: "FeatureStore") -> Iterator[None]:
    """Exclusive lock for a read-modify-write of embedding rows (all processes on this machine)."""
    reader = reader_for(store)
    if not reader._direct:  # scale-out stores need their own per-key atomicity (see README)
        yield
        return
    with _sqlite_write_lock(reader.path):
        yield


def _sqlite_write_lock(path: Path) -> contextlib.AbstractContextManager:
    return exclusive_lock(Path(f"{path}.write.lock"))


# ---------------------------------------------------------------------------------------------
# Retired snapshots: the tombstones a rollback leaves, seen by every writer
# ---------------------------------------------------------------------------------------------
def _retired_key(cfg: Any) -> bytes:
    """Redis: the set of retired snapshot ids of the project. Its name does not end in the project's name, as
    Feast's user keys do: a rebuild of the online store deletes those it did not write, and must keep this one."""
    return f"{cfg.project}:{EMBEDDINGS_VIEW}:retired_snapshots".encode()


def _retired_path(cfg: Any) -> Path:
    """SQLite: the retired snapshot ids, a JSON file beside the database (not in it: a rebuild of the online store
    replaces the database's rows or the file itself, and must not bring a retired snapshot back)."""
    path = _sqlite_path(cfg)
    return path.with_name(f"{path.name}.retired_snapshots.json")


def _read_retired_file(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text())["retired"])
    except FileNotFoundError:
        return set()


def _is_retired(reader: OnlineRowReader, snapshot_id: str) -> bool:
    """Whether a snapshot is retired, read as a write's read-modify-write reads its rows (see :func:`_rewrite`)."""
    if reader.backend == "redis":
        return bool(reader.redis.sismember(reader.retired_key, snapshot_id))
    if reader._direct:
        return snapshot_id in _read_retired_file(reader.retired_path)
    return False  # other stores: no retirement (retire_snapshot cannot list their rows either)


def retired_snapshots(store: "FeatureStore") -> set[str]:
    """The snapshots retired by a rollback (and not promoted again since): writes of them are dropped."""
    cfg = store.config
    kind = str(getattr(cfg.online_store, "type", ""))
    if kind == "redis":
        members = redis_client(cfg.online_store.connection_string).smembers(_retired_key(cfg))
        return {m.decode() for m in members}
    if kind == "sqlite":
        return _read_retired_file(_retired_path(cfg))
    return set()


def _set_retired(store: "FeatureStore", snapshot_id: str, retired: bool) -> bool:
    """Adds a snapshot to the retired ones or takes it out; whether that changed anything. Needs only the store's
    config (not its applied views): a promotion clears a retirement with no embeddings view read."""
    cfg = store.config
    kind = str(getattr(cfg.online_store, "type", ""))
    if kind == "redis":
        client, key = redis_client(cfg.online_store.connection_string), _retired_key(cfg)
        return bool(client.sadd(key, snapshot_id) if retired else client.srem(key, snapshot_id))
    if kind == "sqlite":
        path = _retired_path(cfg)
        if not retired and snapshot_id not in _read_retired_file(path):
            return False  # the common case (every promotion asks): no lock, no file made
        # Under the writers' lock: each write's read-modify-write is wholly before this change or wholly after it.
        with _sqlite_write_lock(_sqlite_path(cfg)):
            ids = _read_retired_file(path)
            if (snapshot_id in ids) == retired:
                return False
            write_json(path, {"retired": sorted(ids | {snapshot_id} if retired else ids - {snapshot_id})})
        return True
    if retired:
        raise NotImplementedError(f"retiring a snapshot in a {kind} online store")
    return False


def reinstate_snapshot(store: "FeatureStore", snapshot_id: str) -> bool:
    """Takes a snapshot out of the retired ones (a deliberate promotion of it again undoes its rollback): its
    writes land again. Returns whether it was retired."""
    changed = _set_retired(store, snapshot_id, False)
    if changed:
        log.info("snapshot %s reinstated: its writes land again", snapshot_id)
    return changed


def _check(
    reader: EmbeddingReader, user_ids: Any, embeddings: np.ndarray, snapshot_id: str
) -> tuple[list[int], np.ndarray, list[int]]:
    """Validated ``(user ids in write order, fp16 [N, K, D], the input rows they come from)``; a repeated id keeps
    its last row."""
    ids = _as_user_ids(user_ids)
    emb = np.asarray(embeddings)
    if emb.ndim != 3:
        raise ValueError(f"embeddings must be [N, K, D], got shape {emb.shape}")
    if emb.shape[0] != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} user ids but {emb.shape[0]} embedding rows")
    if emb.shape[1] != reader.k:
        raise ValueError(f"embeddings have K={emb.shape[1]}, view {EMBEDDINGS_VIEW!r} declares K={reader.k}")
    if not snapshot_id:
        raise ValueError("snapshot_id must be a non-empty string")
    with np.errstate(over="ignore"):
        emb16 = emb.astype(np.float16)
    if not np.isfinite(emb16).all():
        raise ValueError("embeddings have NaN/inf values (or values overflowing fp16)")
    last = {int(u): i for i, u in enumerate(ids.tolist())}
    order = list(last)
    picked = [last[u] for u in order]
    return order, emb16[picked], picked


def row_dim(row: dict[str, Any] | None, k: int) -> int | None:
    """D of a stored row: the length of its latest non-empty version (None: a row with no version)."""
    for slot in SLOTS:
        v = (row or {}).get(f"{VALUE_PREFIX[slot]}0")
        if v is not None and len(v):
            return len(v)
    return None


def row_slots(row: dict[str, Any] | None, k: int) -> Slots:
    """One stored row (its :func:`history_fields`) as :class:`Slots` of its own ``[K, D]`` (no version: D = 1)."""
    return as_slots([row], k, row_dim(row, k) or 1)


def _frame(order: Sequence[int], slots: Slots, old_rows: Sequence[dict | None], event_ms: np.ndarray,
           batch: tuple[str, np.ndarray] | None = None, keep_served: bool = False) -> pd.DataFrame:
    """Whole rows to write: each user's slots, its served value (the pool of the slots, paper §5.2) and its batch
    value.

    Args:
        order: The users, one per row of ``slots``.
        slots: Their slots after the change.
        old_rows: Their stored rows (None: none): the batch value is carried over from them.
        event_ms: int64 ``[N]``: each row's event time (its ``written_at``).
        batch: ``(snapshot_id, write times [N])`` of a daily batch write: the served value is also the batch value.
        keep_served: Carry the stored served and batch values over verbatim (a migration moves no value).
    """
    k, d = slots.values.shape[2], slots.values.shape[3]
    empty = np.zeros(0, dtype=np.float32)
    pooled, n_pooled = pool(slots.values)
    present = ~np.isnan(slots.values[:, :, 0, 0])
    cols: dict[str, list] = {name: [] for name in [*history_fields(k), *PACKED_FIELDS.values()]}
    for i, uid in enumerate(order):
        old = old_rows[i] or {}
        n, sid, ms = int(n_pooled[i]), slots.ids[i, 0], int(slots.written_ms[i])
        for j in range(k):
            for s, slot in enumerate(SLOTS):
                value = slots.values[i, s, j].astype(np.float32) if present[i, s] else empty
                cols[f"{VALUE_PREFIX[slot]}{j}"].append(value)
        for s, field in enumerate(SLOT_ID_FIELDS[1:], start=1):
            cols[field].append(slots.ids[i, s])
        if keep_served:
            for name in served_fields(k):
                cols[name].append(old.get(name))
            cols[PACKED_FIELDS["served"]].append(old.get(PACKED_FIELDS["served"]))
        else:
            for j in range(k):
                cols[f"{VALUE_PREFIX['served']}{j}"].append(pooled[i, j].astype(np.float32) if n else empty)
            cols["snapshot_id"].append(sid)
            cols["written_at_ms"].append(ms if ms >= 0 else None)
            cols["pooled_versions"].append(n)
            cols[PACKED_FIELDS["served"]].append(pack_value(pooled[i], sid, ms, n) if n else b"")
        if keep_served:
            for name in [*batch_fields(k), PACKED_FIELDS["batch"]]:
                cols[name].append(old.get(name))
        elif batch is not None:
            bsid, bms = batch[0], int(batch[1][i])
            for j in range(k):
                cols[f"{VALUE_PREFIX['batch']}{j}"].append(pooled[i, j].astype(np.float32))
            cols["batch_snapshot_id"].append(str(bsid))
            cols["batch_written_at_ms"].append(bms)
            cols[PACKED_FIELDS["batch"]].append(pack_value(pooled[i], bsid, bms, None))
        else:
            old_batch = _stack([old.get(f"{VALUE_PREFIX['batch']}{j}") for j in range(k)])
            for j in range(k):
                cols[f"{VALUE_PREFIX['batch']}{j}"].append(empty if old_batch is None else old_batch[j])
            bsid = old.get("batch_snapshot_id") if old_batch is not None else None
            bms = old.get("batch_written_at_ms") if old_batch is not None else None
            cols["batch_snapshot_id"].append(bsid)
            cols["batch_written_at_ms"].append(int(bms) if bms is not None else None)
            cols[PACKED_FIELDS["batch"]].append(b"" if old_batch is None or bms is None else
                                        pack_value(old_batch.astype(np.float16), bsid or "", int(bms), None))
    frame: dict[str, Any] = {"user_id": np.asarray(order, dtype=np.int64)}
    frame.update(cols)
    frame["written_at_ms"] = pd.array(cols["written_at_ms"], dtype="Int64")
    frame["pooled_versions"] = pd.array(cols["pooled_versions"], dtype="Int64")
    frame["batch_written_at_ms"] = pd.array(cols["batch_written_at_ms"], dtype="Int64")
    for name in ("snapshot_id", "batch_snapshot_id", *SLOT_ID_FIELDS[1:], *PACKED_FIELDS.values()):
        frame[name] = np.asarray(cols[name], dtype=object)
    frame["written_at"] = pd.to_datetime(np.asarray(event_ms, dtype=np.int64), unit="ms", utc=True)
    return pd.DataFrame(frame)


def _shifted(reader: EmbeddingReader, order: list[int], emb16: np.ndarray, snapshot_id: str,
             ms: "int | np.ndarray", unit: PoolUnit) -> tuple[dict, Slots, np.ndarray, np.ndarray]:
    """The users' stored rows, their slots after the write (:func:`sum_platform.embedding_row.shift_in`), where
    each version landed (-1: dropped) and the write times, one per user."""
    old_rows = reader.rows(order, history_fields(reader.k))
    stored = as_slots([old_rows.get(u) for u in order], reader.k, emb16.shape[2])
    ms_arr = np.broadcast_to(np.asarray(ms, dtype=np.int64), (len(order),))
    slots, landed = shift_in(stored, emb16, snapshot_id, ms_arr, unit)
    return old_rows, slots, landed, ms_arr


def _pooled_frame(reader: EmbeddingReader, order: list[int], emb16: np.ndarray, snapshot_id: str,
                  ms: "int | np.ndarray", batch: bool, unit: PoolUnit) -> pd.DataFrame:
    """The rows a write changes: each user's slots with the new version in (a row whose version was dropped, a
    late write of a snapshot older than its history, is left out: it is not rewritten)."""
    old_rows, slots, landed, ms_arr = _shifted(reader, order, emb16, snapshot_id, ms, unit)
    kept = np.flatnonzero(landed >= 0)
    # A late version landing in an older slot leaves slot 0's write time; the row's event time is this write's,
    # never earlier than the latest version's (the offline log's point-in-time order).
    event = np.maximum(ms_arr, slots.written_ms)[kept]
    return _frame([order[i] for i in kept], slots.take(kept), [old_rows.get(order[i]) for i in kept], event,
                  batch=(snapshot_id, ms_arr[kept]) if batch else None)


def pooled_preview(
    store: "FeatureStore",
    user_ids: Sequence[int] | np.ndarray,
    embeddings_fp16: np.ndarray,
    snapshot_id: str,
    written_at: datetime | pd.Timestamp | int | None = None,
    *,
    unit: PoolUnit = "snapshot",
) -> dict[int, tuple[np.ndarray, int]]:
    """The served values :func:`write_embeddings` would write now, without writing (no lock taken): the same
    :func:`sum_platform.embedding_row.shift_in` and pool (a user whose version would be dropped: its stored value).

    The realtime path answers with this value and writes it right after; a concurrent writer slipping in
    between can make the stored value differ from the answered one (both are valid pools).

    Returns:
        ``{user_id: (pooled fp16 [K, D], versions pooled)}``.
    """
    reader = reader_for(store)
    order, emb16, _ = _check(reader, user_ids, embeddings_fp16, snapshot_id)
    if not order:
        return {}
    _, slots, _, _ = _shifted(reader, order, emb16, snapshot_id, to_ms(written_at), unit)
    pooled, n = pool(slots.values)
    return {uid: (pooled[i], int(n[i])) for i, uid in enumerate(order)}


def write_embeddings(
    store: "FeatureStore",
    user_ids: Sequence[int] | np.ndarray,
    embeddings_fp16: np.ndarray,
    snapshot_id: str,
    written_at: datetime | pd.Timestamp | int | None = None,
    *,
    unit: PoolUnit = "snapshot",
    batch: bool = False,
    to_offline: bool = False,
    offline_file: str | None = None,
    return_frame: bool = False,
) -> Any:
    """Writes a new version of users' SUM embeddings and serves their average pool (paper §5.2).

    For each user the new version goes into the stored slots by the row owner's rule
    (:func:`sum_platform.embedding_row.shift_in`, ``unit``: ``serving.pool_unit``): under ``snapshot`` a write of
    the snapshot a slot holds replaces that slot, a newer snapshot shifts the history, a late write of a snapshot
    older than the row's latest that the row no longer holds is dropped (that row is not rewritten); under
    ``write`` every write shifts, except a rerun (same snapshot and write time) which replaces. The served
    ``embedding_k`` becomes the fp16 mean of the slots. Stored versions whose shape differs from the new
    ``[K, D]`` are dropped. Rows go to the online store through Feast's provider (``ingest_df``, what
    ``write_to_online_store`` calls; Redis: Feast's row encoding in a transaction per chunk).

    Args:
        store: An open feature store whose definitions are applied.
        user_ids: ``N`` user ids (int64, non-negative; a repeated id keeps its last row).
        embeddings_fp16: ``[N, K, D]`` freshly computed embeddings. Values are rounded to fp16 (a no-op
            for an fp16 array) and stored as float32, so every stored value is exactly fp16.
        snapshot_id: The snapshot that computed them.
        written_at: Write time (datetime, pandas Timestamp or Unix ms; naive = UTC); default now. Or one Unix ms
            per row (a list or array of N): versions computed at different times, written together (the compute
            deployment's merged write-backs). Stored as ``written_at_ms`` and as the row's event time.
        unit: What a version is: ``snapshot`` or ``write`` (``serving.pool_unit``; every writer passes it).
        batch: A daily batch write: the pooled value is also kept as the row's ``batch_*`` value (what
            ``offline`` mode serves); other writes carry the stored ``batch_*`` value over.
        to_offline: Also log the rows to the view's offline source (``data/embeddings/ds=*/``), so a
            point-in-time retrieval gives what was served at any moment (downstream training frames).
        offline_file: The log file's name (a rerun replaces it: the daily batch passes one); default unique.
        return_frame: Return the written rows (a DataFrame with every view column) instead of a count.

    Returns:
        The number of rows written (or the frame, with ``return_frame``).

    Raises:
        ValueError: Shapes disagree with each other or with the view's K, values are not finite in
            fp16, ``snapshot_id`` is empty, or ``unit`` is not a pool unit.
    """
    if unit not in POOL_UNITS:
        raise ValueError(f"pool unit must be one of {POOL_UNITS}, got {unit!r}")
    reader = reader_for(store)
    order, emb16, picked = _check(reader, user_ids, embeddings_fp16, snapshot_id)
    if not order:
        return pd.DataFrame() if return_frame else 0
    if isinstance(written_at, (list, tuple, np.ndarray)):
        per_row = np.asarray(written_at, dtype=np.int64)
        n_rows = len(embeddings_fp16)  # as many as user ids (checked above)
        if per_row.shape != (n_rows,):
            raise ValueError(f"{per_row.size} write times for {n_rows} rows")
        ms: int | np.ndarray = per_row[picked]
    else:
        ms = to_ms(written_at)
    position = {u: i for i, u in enumerate(order)}
    dropped = [0]

    def rows(users: list[int]) -> pd.DataFrame:
        # Read within the read-modify-write (see _rewrite): a retirement is seen here or sweeps this write's rows.
        if _is_retired(reader, snapshot_id):
            dropped[0] += len(users)
            return pd.DataFrame()
        at = [position[u] for u in users]
        return _pooled_frame(reader, users, emb16[at], snapshot_id, ms[at] if isinstance(ms, np.ndarray) else ms,
                             batch, unit)

    df = _rewrite(store, reader, order, rows, what=f"{len(order)} embeddings of {snapshot_id}")
    if dropped[0]:  # an old replica's late write-back after a rollback: expected while serving moves, not an error
        log.info("dropped %d write(s) of %s: a rollback retired it", dropped[0], snapshot_id)
    if to_offline and len(df):
        log_offline(store, df, offline_file)
    return df if return_frame else int(len(df))


#: Users per Redis transaction of :func:`_rewrite` (a conflict retries only its own chunk).
REDIS_WRITE_CHUNK = 512
#: Optimistic retries of one chunk before giving up (each follows a concurrent write to one of its users).
REDIS_WRITE_RETRIES = 100


def _rewrite(store: "FeatureStore", reader: EmbeddingReader, users: list[int],
             rows: Callable[[list[int]], pd.DataFrame], what: str) -> pd.DataFrame:
    """One read-modify-write of users' rows: ``rows(users)`` reads their stored rows and returns those to write
    (whole rows; users left out are not written), atomically against every other writer.

    SQLite (and other stores): under the exclusive file lock, written through Feast's provider (``ingest_df``,
    what ``write_to_online_store`` runs after its registry lookup, with the reader's view). Redis: a transaction
    per chunk of users: ``WATCH`` their keys, read and pool (on another connection of the pool), then ``MULTI`` /
    ``HSET`` whole rows / ``EXEC``. A concurrent write to any of them between the ``WATCH`` and the ``EXEC`` aborts
    the transaction (``WatchError``) and the chunk is read and pooled again, so no writer's version is lost (what the
    file lock does for SQLite). Rows are encoded by Feast's own provider code, in the layout of Feast's Redis store.

    The retired snapshots (:func:`retire_snapshot`) are read by ``rows`` inside the same atomic step: SQLite under
    the file lock that also guards their file; Redis with their set ``WATCH``ed with the chunk's keys. A retirement
    records the snapshot first, then sweeps every row. A write that read the set before the record commits its rows
    before the record too (SQLite: the lock orders them; Redis: the record changes a watched key, so a later
    ``EXEC`` fails and the chunk is read again, the record included), so the sweep, which lists and reads the rows
    after the record, finds them; a write after the record sees it and is dropped. No window either way.
    """
    if reader.backend != "redis":
        with _write_lock(store):
            df = rows(users)
            if len(df):
                store._get_provider().ingest_df(reader.feature_view, df)
        return df
    import redis
    from feast.infra.passthrough_provider import PassthroughProvider
    from google.protobuf.timestamp_pb2 import Timestamp

    frames = []
    for lo in range(0, len(users), REDIS_WRITE_CHUNK):
        chunk = users[lo : lo + REDIS_WRITE_CHUNK]
        keys = [reader.redis_key(u) for u in chunk]
        for attempt in range(REDIS_WRITE_RETRIES):
            with reader.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys, reader.retired_key)
                    df = rows(chunk)
                    if len(df):
                        encoded = PassthroughProvider._prep_rows_to_write_for_ingestion(
                            feature_view=reader.feature_view, df=df)
                        pipe.multi()
                        for uid, (_, features, event_ts, _) in zip(df["user_id"].tolist(), encoded):
                            ts = Timestamp()
                            ts.FromDatetime(event_ts)
                            mapping = {reader._ts_field: ts.SerializeToString()}
                            mapping.update({reader._field_hash(name): v.SerializeToString()
                                            for name, v in features.items()})
                            pipe.hset(reader.redis_key(uid), mapping=mapping)
                        pipe.execute()
                    frames.append(df)
                    break
                except redis.WatchError:
                    time.sleep(0.001 * min(attempt, 20))
        else:
            raise RuntimeError(f"{REDIS_WRITE_RETRIES} concurrent writes to the same users in a row: gave up writing "
                               f"{len(chunk)} rows ({what})")
    frames = [f for f in frames if len(f)]
    return frames[0] if len(frames) == 1 else (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())


#: Users per read-modify-write of :func:`migrate_rows` and :func:`retire_snapshot` (writers wait at most one).
REWRITE_CHUNK = 512


def _rewrite_all(store: "FeatureStore", change: Callable[[Slots], tuple[Slots, np.ndarray]], keep_served: bool,
                 after_ms: int, what: str) -> tuple[int, pd.DataFrame]:
    """Every stored row through ``change`` (slots -> (slots, bool [N] rows changed)); the changed rows are
    rewritten, chunk by chunk, each chunk read and written atomically (:func:`_rewrite`). A rewritten row's event
    time is its last write's (served or batch) plus ``after_ms``: after what it replaces in the offline log, before
    any later write, on the workspace's clock (simulated days included). Returns ``(rows read, rows rewritten)``."""
    reader = reader_for(store)
    k = reader.k
    users = reader.user_ids()
    seen = [0]

    def rows(chunk: list[int]) -> pd.DataFrame:
        stored = reader.rows(chunk, [*history_fields(k), *PACKED_FIELDS.values()])
        have = [u for u in chunk if u in stored and row_dim(stored[u], k) is not None]
        seen[0] += len(have)
        frames = []
        for d in sorted({row_dim(stored[u], k) for u in have}):
            group = [u for u in have if row_dim(stored[u], k) == d]
            slots, changed = change(as_slots([stored[u] for u in group], k, d))
            at = np.flatnonzero(changed)
            if not len(at):
                continue
            sub = slots.take(at)
            event = np.asarray([max(int(stored[group[i]].get(f) or 0) for f in ("written_at_ms", "batch_written_at_ms"))
                                for i in at], dtype=np.int64) + after_ms
            frames.append(_frame([group[i] for i in at], sub, [stored[group[i]] for i in at], event,
                                 keep_served=keep_served))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    written = []
    for lo in range(0, len(users), REWRITE_CHUNK):
        df = _rewrite(store, reader, users[lo : lo + REWRITE_CHUNK], rows, what)
        if len(df):
            written.append(df)
    return seen[0], pd.concat(written, ignore_index=True) if written else pd.DataFrame()


def v1_row_count(store: "FeatureStore") -> tuple[int, list[int]]:
    """``(rows in the schema v1 layout, some of their users)``: older versions stored without their snapshot ids
    (:func:`sum_platform.embedding_row.v1_rows`), what :func:`migrate_rows` rewrites."""
    reader = reader_for(store)
    users, found = reader.user_ids(), []
    for lo in range(0, len(users), REWRITE_CHUNK):
        for uid, row in reader.rows(users[lo : lo + REWRITE_CHUNK], history_fields(reader.k)).items():
            if v1_rows(row_slots(row, reader.k))[0]:
                found.append(uid)
    return len(found), found[:5]


def migrate_rows(store: "FeatureStore", *, to_offline: bool = True) -> dict[str, int]:
    """Rewrites every row of the schema v1 layout (older versions without their snapshot ids) in the current one:
    each older slot gets its snapshot id by :func:`sum_platform.embedding_row.migrate_ids`. No value moves: the
    served and the batch value, their write times and packed copies stay byte for byte; a second run changes
    nothing. (Writers migrate the rows they write anyway; this does the rest at once, ``sumctl
    migrate-embeddings``.) The store's definitions must be applied (the ``prev*_snapshot_id`` fields).
    ``to_offline``: log the migrated rows (1 ms after the row's last write) to the offline source, so a rebuild of
    the online store from it gives the migrated rows.

    Returns:
        ``{"rows": rows read, "migrated": rows rewritten}``.
    """
    def change(slots: Slots) -> tuple[Slots, np.ndarray]:
        return migrate_ids(slots), v1_rows(slots)

    seen, df = _rewrite_all(store, change, keep_served=True, after_ms=1, what="schema v1 rows migrated")
    if to_offline and len(df):
        log_offline(store, df)
    log.info("migrated %d of %d sum_embeddings rows to per-slot snapshot ids", len(df), seen)
    return {"rows": seen, "migrated": int(len(df))}


def retire_snapshot(store: "FeatureStore", snapshot_id: str, *, to_offline: bool = True) -> dict[str, int]:
    """Takes one snapshot's versions out of every row (a rollback retires the rolled-back snapshot): its slots are
    emptied, the older versions move up (:func:`sum_platform.embedding_row.drop_snapshot`) and the served value is
    pooled again. Later writes of the restored production snapshot land in its own slot. A row left with no version
    serves nothing until its next write.

    The snapshot is first recorded as retired in the online store (:func:`retired_snapshots`), then the rows are
    swept: every later write of it - an old replica's write-back while serving rolls back - is dropped, so it never
    comes back into a pool (under ``snapshot`` pooling it is newer than the restored production and would shift the
    history). Promoting it again clears the record (:func:`reinstate_snapshot`).

    The batch value (offline mode's) is left as it is, even one pooled with the snapshot's version: that pool mixed
    versions by their state at the batch's time, which the row no longer holds, so it cannot be re-pooled without
    the snapshot; the next daily batch, of the restored production, replaces it.

    Args:
        store: An open feature store whose definitions are applied.
        snapshot_id: The snapshot to retire.
        to_offline: Log the rewritten rows to the offline source (a rebuild of the online store from it must not
            bring the retired versions back).

    Returns:
        ``{"rows": rows read, "retired": rows rewritten}``.
    """
    def change(slots: Slots) -> tuple[Slots, np.ndarray]:
        return drop_snapshot(slots, snapshot_id)

    _set_retired(store, snapshot_id, True)  # before the sweep: see _rewrite
    seen, df = _rewrite_all(store, change, keep_served=False, after_ms=1, what=f"versions of {snapshot_id} retired")
    if to_offline and len(df):
        log_offline(store, df)
    log.info("retired %s from %d of %d sum_embeddings rows", snapshot_id, len(df), seen)
    return {"rows": seen, "retired": int(len(df))}


def log_offline(store: "FeatureStore", rows: pd.DataFrame, name: str | None = None) -> None:
    """Appends written ``sum_embeddings`` rows (:func:`write_embeddings` ``return_frame``) to the view's offline
    source, under ``name`` in each date's partition (a rerun replaces its own file; default: a unique name)."""
    source = reader_for(store).feature_view.batch_source
    append_rows(partition_root(source.path), rows, source.timestamp_field, name)


# ---------------------------------------------------------------------------------------------
# User features (the compute deployment's inputs)
# ---------------------------------------------------------------------------------------------
def read_user_rows(
    store: "FeatureStore", user_ids: Sequence[int] | np.ndarray, spec: "FeatureSpec", view: str | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Reads users' current input features as rows (what :func:`sum_models.data.encode_user_rows` encodes).

    Returns:
        ``(rows, skipped)``: ``{user_id: {feature: value or None}}`` for the users with a stored row (None: a
        feature declared after the row was written), in first-seen order; ``{user_id: "no_features"}`` for the
        others.
    """
    columns = list(spec.user_dense) + list(spec.user_sparse)
    unique = list(dict.fromkeys(int(u) for u in _as_user_ids(user_ids)))
    if not unique:
        return {}, {}
    stored = reader_for(store, view or user_features_view()).rows(unique, columns)
    rows: dict[int, dict[str, Any]] = {}
    skipped: dict[int, str] = {}
    for u in unique:
        row = stored.get(u) or {}
        if columns and all(row.get(c) is None for c in columns):
            skipped[u] = "no_features"
        else:
            rows[u] = {c: row.get(c) for c in columns}
    return rows, skipped


def read_user_features(
    store: "FeatureStore", user_ids: Sequence[int] | np.ndarray, spec: "FeatureSpec", view: str | None = None,
) -> tuple[pd.DataFrame, dict[int, str]]:
    """Reads users' current input features (the user tower's inputs) from the online store.

    Args:
        store: An open feature store whose definitions are applied.
        user_ids: User ids.
        spec: The model's input spec (which dense and sparse columns to read).
        view: The Feast view holding them; default: the params' ``source.user_features_view``.

    Returns:
        ``(frame, skipped)``: one row per user with complete features (``user_id`` plus every spec
        column; a value missing from a stored row, i.e. a feature declared after the row was written, is
        filled as training fills it: dense 0.0, sparse an empty list), and ``{user_id: "no_features"}``
        for the users with no stored row.
    """
    from sum_models.data import fill_missing_user_features  # compute path only: keeps torch off the reader

    columns = list(spec.user_dense) + list(spec.user_sparse)
    rows, skipped = read_user_rows(store, user_ids, spec, view)
    present = list(rows)
    # The frame is built once from columns (pandas' per-column work is what a few users' frame costs).
    data: dict[str, Any] = {"user_id": np.asarray(present, dtype=np.int64)}
    for c in spec.user_dense:
        data[c] = np.asarray([np.nan if (v := rows[u][c]) is None else v for u in present], dtype=np.float32)
    for c in spec.user_sparse:
        data[c] = [rows[u][c] for u in present]
    df = pd.DataFrame(data, columns=["user_id", *columns])
    # Values of a feature declared after the user's row was written are filled (dense 0.0, sparse empty),
    # exactly as training fills them, so the served model sees what it was trained on.
    fill_missing_user_features(df, spec)
    return df, skipped
