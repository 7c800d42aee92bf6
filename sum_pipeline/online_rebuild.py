"""Rebuilding the online store from the offline store (``sumctl rebuild-online``) without ever making it worse.

The online store is a cache the offline sources can refill: the users' features are materialised from the daily
users partitions, and every embedding row the online store was given (the daily batch, each SOAP write-back) was
logged whole to ``sum_embeddings``' offline source as it was written. So a damaged or lost online store (a
truncated SQLite file, a flushed Redis) is rebuilt by letting Feast materialise both views over every day of the
workspace: each user gets back the latest row logged for it - what was served - and its features.

The new store is built *beside* the old one, which keeps serving until the swap; a rebuild that fails (an unreadable
offline partition, a full disk) leaves the old store untouched and removes what it staged:

* **SQLite** - Feast materialises into a new file next to the old one (a dot name, rollback journal, fsynced).
  A readable old store then takes the new rows in one transaction (``ATTACH``; per view table ``DELETE`` + ``INSERT``):
  readers see the old rows or the new, the file and its WAL stay the ones the replicas have open. An unreadable
  one (a truncated file) is swapped: its ``-wal``/``-shm`` and the file are moved aside (kept for a post-mortem)
  and the new file is renamed over it; the serving replicas notice the new inode on their next health check and
  reopen it (:meth:`serving.store_io.OnlineRowReader.replaced`). Swapping a *readable* file would be unsafe:
  SQLite finds a WAL by the database's name, so a replica's old connection could apply or delete the new file's.
* **Redis** - Feast materialises into an empty Redis database of the same server (claimed with a marker key) as a
  staging namespace; each rebuilt key is then copied over the live one (``COPY ... REPLACE``: a key is never deleted
  before its replacement is written), the live keys of the project the rebuild did not produce are deleted last,
  and the staging keys are removed.

``only_missing`` (what ``sumctl doctor`` prescribes when a few users lost their rows) writes only the views a user
has no row of: every other row is left as it is, its write time included.

A write-back that lands between the materialisation and the swap is replaced by the user's latest logged row (it is
in the offline log; the next write-back supersedes it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from serving.store_io import EMBEDDINGS_VIEW, reader_for, redis_client
from sum_models import atomic
from sum_platform.context import Context
from sum_platform.feature_store import definitions, get_store, user_features_view
from sum_platform.files import exclusive_lock

__all__ = ["rebuild_online_store", "RebuildError"]

log = logging.getLogger(__name__)

#: Keys per Redis round trip.
BATCH = 1000
#: The marker key that claims an empty Redis database as a rebuild's staging namespace.
CLAIM_KEY = b"sum:online-rebuild:claim"
#: Redis databases tried for staging (the server's default count is 16).
STAGING_DBS = range(1, 16)


class RebuildError(RuntimeError):
    """The rebuild could not run or failed; the old online store is untouched."""


def rebuild_online_store(ctx: Context, *, only_missing: bool = False) -> dict[str, Any]:
    """Builds the online store anew from the offline store beside the old one and swaps it in (module docstring).

    Args:
        ctx: The workspace.
        only_missing: Write only the rows users lack (per view); rows present are left as they are.

    Returns:
        ``{"backend", "swap" ("transaction" | "file" | "keys"), "rows_written" (SQLite) or "keys_written" (Redis),
        "deleted_keys" (Redis), "moved_aside" (a swapped SQLite file) or None, "from", "to", "users": users with an
        embeddings row afterwards, "only_missing"}``.

    Raises:
        FileNotFoundError: The workspace has no users partition to start from.
        RebuildError: The materialisation or the swap failed (the old store is untouched), or another process holds
            the SQLite store locked.
    """
    users_root = ctx.ws.data / "users"
    days = sorted(p.name.removeprefix("ds=") for p in users_root.glob("ds=*"))
    if not days:
        raise FileNotFoundError(f"no users partition under {users_root}: nothing to rebuild from")
    config = get_store(ctx.params).config
    online = config.online_store
    start = datetime.fromisoformat(days[0]).replace(tzinfo=timezone.utc) - timedelta(seconds=1)
    end = datetime.now(timezone.utc) + timedelta(seconds=1)
    span = (start, end)
    with exclusive_lock(ctx.ws.feast_dir / "online_rebuild.lock"):  # one rebuild of a workspace at a time
        if online.type == "sqlite":
            path = Path(online.path)
            if not path.is_absolute():
                path = Path(config.repo_path or ".") / path
            out = _rebuild_sqlite(ctx, path, span, only_missing)
        elif online.type == "redis":
            out = _rebuild_redis(ctx, online.connection_string, config.project, span, only_missing)
        else:
            raise NotImplementedError(f"rebuilding a {online.type} online store")
    out.update({"backend": online.type, "only_missing": only_missing, "from": start.isoformat(),
                "to": end.isoformat(), "users": len(reader_for(get_store(ctx.params)).user_ids())})
    log.info("online store rebuilt from the offline store: %s", out)
    return out


def _views(ctx: Context) -> list[str]:
    return [user_features_view(ctx.params), EMBEDDINGS_VIEW]


def _materialize(ctx: Context, online_store: dict, span: tuple[datetime, datetime]) -> Any:
    """Feast's store on ``online_store`` (the staging one) with the definitions applied and both views materialised
    over ``span``; raises :class:`RebuildError` naming what failed."""
    store = get_store(ctx.params, online_store=online_store)
    try:
        store.apply(definitions(ctx.params))
        views = [store.get_feature_view(name) for name in _views(ctx)]
        store.materialize(start_date=span[0], end_date=span[1], feature_views=[v.name for v in views])
    except Exception as exc:
        _close(store)
        raise RebuildError(f"materialising the offline store failed, the online store is untouched: "
                           f"{type(exc).__name__}: {exc}") from exc
    return store


def _close(store: Any) -> None:
    """Closes Feast's own connection to a staging store (its SQLite file is then ours to move or delete)."""
    online = getattr(store._get_provider(), "online_store", None)
    conn = getattr(online, "_conn", None)
    if conn is not None:
        conn.close()
        online._conn = None


# ---------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------
def _rebuild_sqlite(ctx: Context, path: Path, span: tuple[datetime, datetime], only_missing: bool) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.recover(path)  # a killed rebuild's staging file
    staging = atomic.temp_sibling(path)
    try:
        store = _materialize(ctx, {"type": "sqlite", "path": str(staging)}, span)
        from feast.infra.online_stores.helpers import compute_table_id

        versioning = bool(getattr(store.config.registry, "enable_online_feature_view_versioning", False))
        tables = [compute_table_id(store.config.project, store.get_feature_view(v), versioning) for v in _views(ctx)]
        _close(store)
        _settle(staging)
        with exclusive_lock(Path(f"{path}.write.lock")):  # the embeddings writers' lock (serving.store_io)
            try:
                written = _copy_rows(path, staging, tables, only_missing)
                return {"swap": "transaction", "rows_written": written, "moved_aside": None}
            except sqlite3.OperationalError as exc:
                if _transient(exc):
                    raise RebuildError(f"the online store {path} is locked by another writer ({exc}); nothing was "
                                       "changed: run the rebuild again") from exc
                damage: sqlite3.DatabaseError = exc
            except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed": unreadable
                damage = exc
            log.warning("the online store %s cannot take the rebuilt rows (%s): swapping the file", path, damage)
            aside = _swap_file(path, staging)
            return {"swap": "file", "rows_written": None, "moved_aside": str(aside) if aside else None,
                    "damage": f"{type(damage).__name__}: {damage}"}
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{staging}{suffix}").unlink(missing_ok=True)


def _transient(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _settle(db: Path) -> None:
    """Leaves ``db`` self-contained and durable: rollback journal (no WAL beside it), fsynced."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE").fetchone()
    finally:
        conn.close()
    atomic.fsync_tree(db)
    atomic.fsync_dir(db.parent)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _copy_rows(path: Path, staging: Path, tables: list[str], only_missing: bool) -> int:
    """Copies the rebuilt tables' rows into the live database in one transaction (``only_missing``: the rows of
    entities a table has none of); returns the rows written."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    written = 0
    try:
        conn.execute("ATTACH DATABASE ? AS rebuilt", (str(staging),))
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table in tables:
                q = _quote(table)
                created = conn.execute("SELECT sql FROM rebuilt.sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
                                       "ORDER BY type DESC", (table,)).fetchall()  # the table, then its indexes
                if not created:
                    continue
                if conn.execute("SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?",
                                (table,)).fetchone() is None:
                    for (sql,) in created:
                        conn.execute(sql)  # unqualified: created in main
                live = {r[1] for r in conn.execute(f"PRAGMA main.table_info({q})")}
                cols = ",".join(_quote(r[1]) for r in conn.execute(f"PRAGMA rebuilt.table_info({q})") if r[1] in live)
                if only_missing:
                    cur = conn.execute(f"INSERT INTO main.{q} ({cols}) SELECT {cols} FROM rebuilt.{q} AS r WHERE NOT "
                                       f"EXISTS (SELECT 1 FROM main.{q} AS m WHERE m.entity_key = r.entity_key)")
                else:
                    conn.execute(f"DELETE FROM main.{q}")
                    cur = conn.execute(f"INSERT INTO main.{q} ({cols}) SELECT {cols} FROM rebuilt.{q}")
                written += max(cur.rowcount, 0)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return written


def _swap_file(path: Path, staging: Path) -> Path | None:
    """Moves the unreadable ``path`` (and its ``-wal``/``-shm``) aside and renames ``staging`` over it; returns
    where the old file is kept (None: there was none)."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    kept = None
    if path.exists():  # the old file stays for a post-mortem; the path is never without a database
        try:
            os.link(path, aside)
        except OSError:  # a filesystem without hard links
            shutil.copy2(path, aside)
        kept = aside
    # The WAL is found by the database's name: the old one must not be applied to the new file.
    for suffix in ("-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            os.replace(part, f"{aside}{suffix}")
    os.replace(staging, path)
    atomic.fsync_dir(path.parent)
    return kept


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------
def _with_db(connection_string: str, db: int) -> str:
    parts = [p for p in connection_string.split(",") if not p.startswith("db=")]
    return ",".join([*parts, f"db={db}"])


def _db_of(connection_string: str) -> int:
    options = dict(p.split("=", 1) for p in connection_string.split(",")[1:] if "=" in p)
    return int(options.get("db", 0))


def _claim_value() -> bytes:
    return f"{socket.gethostname()}:{os.getpid()}".encode()


def _claimed_by_the_dead(value: bytes | None) -> bool:
    """Whether a staging claim was left by a rebuild on this host whose process is gone."""
    host, _, pid = (value or b"").decode(errors="replace").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _delete_project_keys(client: Any, project: bytes) -> int:
    deleted = 0
    keys = list(client.scan_iter(match=b"*" + project, count=BATCH))
    for lo in range(0, len(keys), BATCH):
        deleted += int(client.delete(*keys[lo : lo + BATCH]))
    return deleted


@contextlib.contextmanager
def _staging_db(connection_string: str, project: bytes) -> Iterator[tuple[int, Any]]:
    """An empty database of the live server claimed for the rebuild (``(index, client)``); its keys are deleted
    afterwards. A claim a killed rebuild of this host left is taken over (with the keys it staged)."""
    import redis

    live = _db_of(connection_string)
    for db in STAGING_DBS:
        if db == live:
            continue
        client = redis_client(_with_db(connection_string, db))
        try:
            if not client.set(CLAIM_KEY, _claim_value(), nx=True):
                if not _claimed_by_the_dead(client.get(CLAIM_KEY)):
                    continue
                _delete_project_keys(client, project)
                client.set(CLAIM_KEY, _claim_value())
        except redis.ResponseError:  # "DB index is out of range": no more databases
            break
        if client.dbsize() != 1:  # not empty: someone else's data
            client.delete(CLAIM_KEY)
            continue
        try:
            yield db, client
        finally:
            _delete_project_keys(client, project)
            client.delete(CLAIM_KEY)
        return
    raise RebuildError("no empty Redis database to stage the rebuild in (databases 1-15 of the server hold data); "
                       "nothing was changed")


def _rebuild_redis(ctx: Context, connection_string: str, project_name: str, span: tuple[datetime, datetime],
                   only_missing: bool) -> dict[str, Any]:
    project = project_name.encode()
    live = redis_client(connection_string)
    live_db = _db_of(connection_string)
    before = set(live.scan_iter(match=b"*" + project, count=BATCH))
    with _staging_db(connection_string, project) as (db, staging):
        store = _materialize(ctx, {"type": "redis", "connection_string": _with_db(connection_string, db)}, span)
        rebuilt = list(staging.scan_iter(match=b"*" + project, count=BATCH))
        if only_missing:
            written = _copy_missing_views(ctx, staging, live, rebuilt)
            deleted = 0
        else:
            written = 0
            for lo in range(0, len(rebuilt), BATCH):
                with staging.pipeline(transaction=False) as pipe:
                    for key in rebuilt[lo : lo + BATCH]:
                        pipe.copy(key, key, destination_db=live_db, replace=True)  # atomic per key
                    written += sum(bool(ok) for ok in pipe.execute())
            stale = sorted(before - set(rebuilt))  # users the offline store has no row of
            deleted = sum(int(live.delete(*stale[lo : lo + BATCH])) for lo in range(0, len(stale), BATCH))
        del store
    return {"swap": "keys", "keys_written": written, "deleted_keys": deleted, "moved_aside": None}


def _copy_missing_views(ctx: Context, staging: Any, live: Any, rebuilt: list[bytes]) -> int:
    """Writes, per rebuilt key, the fields of each view the live hash has no row of (its ``_ts:<view>`` field
    absent); returns the (key, view) rows written."""
    store = get_store(ctx.params)
    readers = [reader_for(store, view) for view in _views(ctx)]
    fields = [({r._field_hash(f.name) for f in r.feature_view.features} | {r._ts_field}, r._ts_field) for r in readers]
    written = 0
    for lo in range(0, len(rebuilt), BATCH):
        keys = rebuilt[lo : lo + BATCH]
        with staging.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            rows = pipe.execute()
        with live.pipeline(transaction=False) as pipe:
            for key in keys:
                for _, ts_field in fields:
                    pipe.hexists(key, ts_field)
            present = iter(pipe.execute())
        with live.pipeline(transaction=False) as pipe:
            for key, row in zip(keys, rows):
                for names, _ in fields:
                    if next(present):
                        continue
                    mapping = {name: value for name, value in row.items() if name in names}
                    if mapping:
                        pipe.hset(key, mapping=mapping)
                        written += 1
            pipe.execute()
    return written
