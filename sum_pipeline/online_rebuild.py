"""Rebuilding the online store from the offline store (``sumctl rebuild-online``).

The online store is a cache the offline sources can refill: the users' features are materialised from the daily
users partitions, and every embedding row the online store was given (the daily batch, each SOAP write-back) was
logged whole to ``sum_embeddings``' offline source as it was written. So a damaged or lost online store (a
truncated SQLite file, a flushed Redis) is rebuilt by moving the damaged file aside (kept for a post-mortem),
applying the feature repo again (Feast creates the tables) and letting Feast materialise both views over every day
of the workspace: each user gets back the latest row logged for it - what was served - and its features.

The serving replicas notice a replaced SQLite file by its inode on their next health check and reopen it
(:meth:`serving.store_io.OnlineRowReader.reopen_if_replaced`), so serving needs no restart.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from serving.store_io import EMBEDDINGS_VIEW, reader_for, redis_client
from sum_platform.context import Context
from sum_platform.feature_store import apply_definitions, get_store, user_features_view

__all__ = ["rebuild_online_store"]

log = logging.getLogger(__name__)


def rebuild_online_store(ctx: Context) -> dict[str, Any]:
    """Moves the online store aside and refills it from the offline store (see the module docstring).

    Returns:
        ``{"moved_aside": path or None, "deleted_keys": n (Redis), "from", "to", "users": users with an embeddings
        row afterwards}``.

    Raises:
        FileNotFoundError: The workspace has no users partition to start from.
    """
    users_root = ctx.ws.data / "users"
    days = sorted(p.name.removeprefix("ds=") for p in users_root.glob("ds=*"))
    if not days:
        raise FileNotFoundError(f"no users partition under {users_root}: nothing to rebuild from")
    config = get_store(ctx.params).config
    online = config.online_store
    out: dict[str, Any] = {"moved_aside": None, "deleted_keys": 0}
    if online.type == "sqlite":
        path = Path(online.path)
        if not path.is_absolute():
            path = Path(config.repo_path or ".") / path
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{path}{suffix}")
            if part.exists():
                os.replace(part, f"{aside}{suffix}")
        out["moved_aside"] = str(aside)
    elif online.type == "redis":
        client = redis_client(online.connection_string)
        keys = list(client.scan_iter(match=b"*" + config.project.encode(), count=1000))
        for lo in range(0, len(keys), 1000):
            out["deleted_keys"] += int(client.delete(*keys[lo : lo + 1000]))
    else:
        raise NotImplementedError(f"rebuilding a {online.type} online store")
    store = apply_definitions(ctx.params)
    start = datetime.fromisoformat(days[0]).replace(tzinfo=timezone.utc) - timedelta(seconds=1)
    end = datetime.now(timezone.utc) + timedelta(seconds=1)
    store.materialize(start_date=start, end_date=end, feature_views=[user_features_view(ctx.params), EMBEDDINGS_VIEW])
    out.update({"from": start.isoformat(), "to": end.isoformat(), "users": len(reader_for(store).user_ids())})
    log.info("online store rebuilt from the offline store: %s", out)
    return out
