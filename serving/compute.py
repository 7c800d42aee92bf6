"""The SOAP compute deployment (paper §4): the production user tower, the frozen one, and the write-back.

:class:`ComputeCenter` batches compute calls (``@serve.batch``), reads the users' current features from
the online store, runs the tower and writes the new version through
:func:`serving.store_io.write_embeddings`, which average-pools it with the two previous stored versions (of the two
previous snapshots, or of the two previous writes: ``serving.pool_unit``)
and stores fp16 values with the snapshot id and write time (the same write the daily batch uses). A new
snapshot arrives through ``user_config`` -> :meth:`ComputeCenter.reconfigure`, which swaps the tower
only after a successful load. The frozen tower (the first production snapshot's) answers ``frozen``
reads: computed on read, never pooled nor written.

The blocking work of a batch runs in executor jobs (:func:`_compute_pooled`, :func:`_write_pooled`,
:func:`_compute_only`) on one worker thread whose CPU priority :mod:`serving.cpu` lowers (one thread: a second
one would contend for the GIL and the pinned CPU, slowing the computes it was meant to free). A write costs ~9 ms
however few users it holds (Feast's write, the offline log's file), so the write-backs of realtime batches are
buffered for ``write_coalesce_ms`` and written together, after their answers: a realtime compute does not queue
behind the previous one's write. A batch that touches a user with a buffered write flushes the buffer first, so
every pooled value builds on the user's previous write. torch is
imported inside the replica only (the driver that builds the application does not need it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from serving.cpu import background_thread, thread_priority
from serving.metrics import ComputeMetrics
from serving.settings import USER_CONFIG_KEYS, open_store, snapshot_fingerprint
from serving.store_io import pooled_preview, read_user_rows, reader_for, to_ms, write_embeddings

__all__ = ["ComputeCenter"]

log = logging.getLogger("ray.serve")

#: Users per tower forward pass inside one compute batch.
TOWER_BATCH_SIZE = 512


@dataclass(frozen=True)
class _Tower:
    tower: Any
    snapshot_id: str
    snapshot_dir: str
    fingerprint: str | None
    loaded_at: float


@serve.deployment(
    name="ComputeCenter",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=5.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_timeout_s=10.0,
    # A code change replaces the replica: start the new one before stopping the old.
    max_surge_percent=100,
)
class ComputeCenter:
    """Runs the production user tower (and the frozen one) and writes fresh embeddings back.

    Args:
        settings: :func:`serving.settings.app_settings` (``torch_threads``, ``compute_niceness``, ...).
    """

    def __init__(self, settings: dict | None = None) -> None:
        import torch

        # What the first snapshot load needs besides torch (Feast, the snapshot loader: seconds of imports on two
        # cores), imported here at the replica's priority as torch is: on the loader thread (nice 19, SCHED_IDLE) they
        # waited for every busy thread of the machine (~27 s instead of ~11 s, measured under load).
        import feast  # noqa: F401
        import sum_models.snapshot  # noqa: F401

        settings = dict(settings or {})
        torch.set_num_threads(int(settings.get("torch_threads", 1)))
        # The write path yields the CPU to the read path when they share a machine. Linux priorities are
        # per thread, so each worker thread lowers its own (the event loop thread, which answers health
        # checks and queues batches, keeps the replica's).
        self._cpu = {"niceness": int(settings.get("compute_niceness", 0)),
                     "sched_idle": bool(settings.get("compute_sched_idle", False)),
                     "cpus": settings.get("compute_cpus"), "threads": {}}
        self._prod: _Tower | None = None
        self._frozen: _Tower | None = None
        self._store = None
        self._store_key: tuple[str, str] | None = None
        #: Why the requested snapshot (frozen snapshot) is not loaded: ``(short reason, detail)``. The reason (id and
        #: exception type) is public on /version; the detail (folder, exception text) goes to logs and info() only.
        self._last_error: tuple[str, str] | None = None
        self._frozen_error: tuple[str, str] | None = None
        self._requested: tuple[str, str, str | None] | None = None
        self._user_config: dict = {}
        self._debug_delay_s = 0.0
        #: serving.pool_unit: what a pooled version is (sum_platform.embedding_row), from the user_config.
        self._pool_unit = "snapshot"
        # Snapshot loads run beside compute batches (which keep using the current tower meanwhile).
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-load",
                                          initializer=background_thread, initargs=(self._cpu, "load"))
        # One worker: feature reads, inference and writes of one batch never interleave with another's.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-compute",
                                            initializer=background_thread, initargs=(self._cpu, "compute"))
        for pool in (self._loader, self._executor):
            pool.submit(lambda: None)  # start the threads now, so info() reports their priority at once
        #: Realtime write-backs not yet handed to the executor (one merged write per window), their users, the
        #: future every buffered user's write resolves, and the window's timer.
        self._buffer: list[dict] = []
        self._buffer_users: set[int] = set()
        self._buffer_done: asyncio.Future | None = None
        self._buffer_timer: asyncio.TimerHandle | None = None
        self._write_coalesce_s = 0.0
        #: Users whose write is buffered or queued -> the future it resolves (a later compute of them waits).
        self._unwritten: dict[int, asyncio.Future] = {}
        self._stats = {
            "batches": 0,
            "requests": 0,
            "written": 0,
            "skipped": 0,
            "failed_batches": 0,
            "frozen_batches": 0,
            "frozen_requests": 0,
        }
        self._metrics = ComputeMetrics()

    # -- configuration -------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        """Applies a ``user_config``: batching and debug knobs at once, then the snapshots.

        The production snapshot is swapped in only after a successful load. On a load failure a replica
        that already runs a tower keeps it and records the error, which ``/version`` reports
        (``last_error`` for ``requested_snapshot_id``) so the rollout sees it and rolls back. It does
        not raise there: Ray Serve 2.60 stops a replica whose ``reconfigure`` raises and retries fresh
        replicas with the bad config, which would take compute down until the rollback finished. A
        replica with no tower yet (starting up) raises, so Serve marks the deploy failed. A frozen
        snapshot that fails to load never fails the replica: frozen reads answer 503 until it loads.

        Args:
            user_config: :func:`serving.settings.compute_user_config`. A loaded snapshot is reloaded when
                its fingerprint changed (re-exported under the same id).

        Raises:
            ValueError: Missing keys (always), or the manifest names another snapshot id (no tower yet).
            sum_models.snapshot.SnapshotError: Missing or corrupt snapshot files (no tower yet).
        """
        user_config = dict(user_config or {})
        missing = [k for k in USER_CONFIG_KEYS if not user_config.get(k)]
        if missing:
            raise ValueError(f"compute user_config lacks {missing}; got {sorted(user_config)}")
        self._user_config = user_config
        self._apply_knobs(user_config)
        store_key = (str(user_config["workspace"]), str(user_config["params_path"]))
        snapshot_dir, snapshot_id = str(user_config["snapshot_dir"]), str(user_config["snapshot_id"])
        wanted_fp = user_config.get("fingerprint") or snapshot_fingerprint(snapshot_dir)
        self._requested = (snapshot_dir, snapshot_id, wanted_fp)
        if self._wanted(self._prod, snapshot_dir, snapshot_id, wanted_fp) and store_key == self._store_key:
            self._last_error = None
        else:
            try:
                loaded, store = await asyncio.get_running_loop().run_in_executor(
                    self._loader, self._load, snapshot_dir, snapshot_id, store_key
                )
            except Exception as exc:
                self._last_error = _load_failure("", snapshot_id, snapshot_dir, exc)
                if self._prod is None:
                    log.error("%s; no tower to keep", self._last_error[1])
                    raise
                log.error("%s; keeping %s", self._last_error[1], self._prod.snapshot_id)
            else:
                self._set_loaded("production", self._prod, loaded)
                self._prod, self._store, self._store_key = loaded, store, store_key
                self._last_error = None
                log.info("compute center serves snapshot %s from %s", snapshot_id, snapshot_dir)
        await self._reconfigure_frozen(user_config, store_key)

    def _apply_knobs(self, user_config: dict) -> None:
        self._pool_unit = str(user_config["pool_unit"])
        self._debug_delay_s = max(0.0, float(user_config.get("debug_delay_ms") or 0.0)) / 1000.0
        self._write_coalesce_s = max(0.0, float(user_config.get("write_coalesce_ms") or 0.0)) / 1000.0
        size = user_config.get("max_batch_size")
        wait_ms = user_config.get("batch_wait_ms")
        for method in (self.compute, self.compute_many, self.compute_frozen):
            if size:
                method.set_max_batch_size(int(size))  # type: ignore[attr-defined]
            if wait_ms is not None:
                method.set_batch_wait_timeout_s(float(wait_ms) / 1000.0)  # type: ignore[attr-defined]

    async def _reconfigure_frozen(self, user_config: dict, store_key: tuple[str, str]) -> None:
        frozen_dir, frozen_id = user_config.get("frozen_snapshot_dir"), user_config.get("frozen_snapshot_id")
        if not frozen_dir or not frozen_id:
            return
        frozen_dir, frozen_id = str(frozen_dir), str(frozen_id)
        frozen_fp = user_config.get("frozen_fingerprint") or snapshot_fingerprint(frozen_dir)
        if self._wanted(self._frozen, frozen_dir, frozen_id, frozen_fp):
            self._frozen_error = None
            return
        if self._prod is not None and self._wanted(self._prod, frozen_dir, frozen_id, frozen_fp):
            loaded = self._prod  # towers are read-only in eval mode: share it
        else:
            try:
                loaded, _ = await asyncio.get_running_loop().run_in_executor(
                    self._loader, self._load, frozen_dir, frozen_id, store_key
                )
            except Exception as exc:
                self._frozen_error = _load_failure("frozen ", frozen_id, frozen_dir, exc)
                log.error("%s; frozen mode keeps %s", self._frozen_error[1], self._frozen and self._frozen.snapshot_id)
                return
        self._set_loaded("frozen", self._frozen, loaded)
        self._frozen, self._frozen_error = loaded, None

    @staticmethod
    def _wanted(current: _Tower | None, snapshot_dir: str, snapshot_id: str, fingerprint: str | None) -> bool:
        return current is not None and (current.snapshot_dir, current.snapshot_id, current.fingerprint) == (
            snapshot_dir,
            snapshot_id,
            fingerprint,
        )

    def _set_loaded(self, role: str, old: _Tower | None, new: _Tower) -> None:
        if old is not None and old.snapshot_id != new.snapshot_id:
            self._metrics.loaded.set(0, tags={"role": role, "snapshot_id": old.snapshot_id})
        self._metrics.loaded.set(1, tags={"role": role, "snapshot_id": new.snapshot_id})

    def _load(self, snapshot_dir: str, snapshot_id: str, store_key: tuple[str, str]) -> tuple[_Tower, Any]:
        from sum_models.snapshot import load_user_tower  # torch: loaded in the replica only

        fingerprint = snapshot_fingerprint(snapshot_dir)
        tower, manifest = load_user_tower(Path(snapshot_dir))
        if manifest.get("snapshot_id") != snapshot_id:
            raise ValueError(f"snapshot at {snapshot_dir} is {manifest.get('snapshot_id')!r}, not {snapshot_id!r}")
        store = self._store if store_key == self._store_key and self._store is not None else None
        if store is None:
            _, store = open_store(*store_key)
        return _Tower(tower.eval(), snapshot_id, snapshot_dir, fingerprint, time.time()), store

    # -- compute -------------------------------------------------------------------------------
    async def _process(self, user_ids: list[int], wait_for_write: bool) -> dict[int, dict]:
        """Computes a batch: (1) features -> tower -> pooled value (a lock-free preview of the write), then (2) the
        pooled write-back. ``wait_for_write=False`` (realtime) answers after job 1 and buffers the write for
        ``write_coalesce_ms`` (:meth:`_flush`); ``wait_for_write=True`` (async) writes at once and answers after.
        A user with an earlier write not yet done waits for it first: the value answered is the one written."""
        prod, store = self._prod, self._store
        if prod is None:
            raise RuntimeError("no user tower loaded")
        if self._debug_delay_s:
            await asyncio.sleep(self._debug_delay_s)  # test/benchmark knob: a slower model
        if self._buffer_users.intersection(user_ids):
            self._flush()
        earlier = {self._unwritten[u] for u in user_ids if u in self._unwritten}
        if earlier:
            await asyncio.wait(earlier)
        self._stats["batches"] += 1
        self._stats["requests"] += len(user_ids)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results, pending = await loop.run_in_executor(
                self._executor, _compute_pooled, prod.tower, store, prod.snapshot_id, list(user_ids), not wait_for_write,
                self._pool_unit,
            )
        except Exception:
            self._stats["failed_batches"] += 1
            raise
        self._count_skipped(results, "production")
        if not pending:
            return results
        self._metrics.batch_size.observe(len(user_ids), tags={"tower": "production"})
        write = self._buffer_write({**pending, "snapshot_id": prod.snapshot_id, "store": store, "t0": t0,
                                    "unit": self._pool_unit})
        if not wait_for_write:
            if self._write_coalesce_s <= 0:
                self._flush()
            return results
        self._flush()
        await asyncio.wait({write})
        if write.exception() is not None:
            raise write.exception()  # type: ignore[misc]
        for u in pending["user_ids"]:
            results[u]["status"] = "written"
        return results

    def _count_skipped(self, results: dict[int, dict], tower: str) -> None:
        """Counts (stats, metric by reason) the users a batch skipped; logs the non-finite ones (a data problem
        upstream: the data gate's range checks should have stopped such a day)."""
        reasons: dict[str, list[int]] = {}
        for u, r in results.items():
            if r["status"] not in ("computed", "written"):
                reasons.setdefault(r["status"], []).append(u)
        for reason, users in reasons.items():
            self._stats["skipped"] += len(users)
            self._stats[f"skipped_{reason}"] = self._stats.get(f"skipped_{reason}", 0) + len(users)
            self._metrics.skipped.inc(len(users), tags={"tower": tower, "reason": reason})
            if reason.startswith("nonfinite"):
                log.warning("compute (%s tower) skipped %d user(s), %s: e.g. %s", tower, len(users), reason, users[:5])

    def _buffer_write(self, pending: dict) -> "asyncio.Future":
        """Adds a batch's write-back to the buffer (flushed first if it holds one of the users, or another
        snapshot's or store's rows); returns the future the write resolves."""
        head = self._buffer[0] if self._buffer else None
        if head is not None and (
            self._buffer_users.intersection(pending["user_ids"])
            or head["snapshot_id"] != pending["snapshot_id"]
            or head["unit"] != pending["unit"]
            or head["store"] is not pending["store"]
        ):
            self._flush()
        loop = asyncio.get_running_loop()
        if self._buffer_done is None:
            self._buffer_done = loop.create_future()
            self._buffer_timer = loop.call_later(self._write_coalesce_s, self._flush)
        self._buffer.append(pending)
        self._buffer_users.update(pending["user_ids"])
        for u in pending["user_ids"]:
            self._unwritten[u] = self._buffer_done
        return self._buffer_done

    def _flush(self) -> None:
        """Hands the buffered write-backs to the executor as one write (the versions keep their own write times)."""
        if self._buffer_timer is not None:
            self._buffer_timer.cancel()
            self._buffer_timer = None
        batch, done = self._buffer, self._buffer_done
        self._buffer, self._buffer_users, self._buffer_done = [], set(), None
        if not batch or done is None:
            return
        merged = {
            "user_ids": [u for p in batch for u in p["user_ids"]],
            "embeddings": np.concatenate([p["embeddings"] for p in batch]),
            "written_at_ms": [p["written_at_ms"] for p in batch for _ in p["user_ids"]],
            "unit": batch[0]["unit"],
        }
        store, snapshot_id, t0 = batch[0]["store"], batch[0]["snapshot_id"], min(p["t0"] for p in batch)
        write = asyncio.get_running_loop().run_in_executor(self._executor, _write_pooled, store, snapshot_id, merged)

        def written(fut: "asyncio.Future") -> None:
            for u in merged["user_ids"]:
                if self._unwritten.get(u) is done:
                    del self._unwritten[u]
            exc = None if not fut.cancelled() else asyncio.CancelledError()
            exc = exc or fut.exception()
            if exc is not None:
                self._stats["failed_batches"] += 1
                log.error("write-back of %d users failed: %s", len(merged["user_ids"]), exc)
                done.set_exception(exc)
                done.exception()  # retrieved: a realtime batch nobody waits for must not warn
                return
            self._stats["written"] += fut.result()
            self._metrics.write_backs.inc(fut.result())
            self._metrics.latency.observe(time.perf_counter() - t0 + self._debug_delay_s, tags={"tower": "production"})
            done.set_result(fut.result())

        write.add_done_callback(written)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def compute(self, user_ids: list[int]) -> list[dict]:
        """Realtime: recomputes and pools the users' embeddings, answers, then writes them back.

        Returns:
            Per call: ``{"user_id", "status", "snapshot_id", "written_at_ms", "pooled_versions",
            "embeddings"}``; status ``computed`` (``embeddings``: the pooled fp16 ``[K, D]``, being written
            back) or why it was skipped (``no_features``, ``nonfinite_features``, ``nonfinite_embedding``).
        """
        results = await self._process(list(user_ids), wait_for_write=False)
        return [results[int(u)] for u in user_ids]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def compute_many(self, calls: list[list[int]]) -> list[list[dict]]:
        """Async: recomputes, pools and writes back the users of each call (the ingress coalesces the
        reads of a few milliseconds into one call); answers once written.

        Returns:
            Per call, per user: ``{"user_id", "status"}`` with status ``written`` or a skip reason.
        """
        unique = list(dict.fromkeys(int(u) for call in calls for u in call))
        results = await self._process(unique, wait_for_write=True)
        return [[{"user_id": int(u), "status": results[int(u)]["status"]} for u in call] for call in calls]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def compute_frozen(self, user_ids: list[int]) -> list[dict]:
        """Embeddings of a batch of users by the frozen (first) snapshot's tower; nothing is written.

        Returns:
            Per call: ``{"user_id", "status", "snapshot_id", "embeddings"}``; status ``computed``, a
            skip reason, or ``no_frozen_snapshot``.
        """
        frozen, store = self._frozen, self._store
        if frozen is None or store is None:
            return [{"user_id": int(u), "status": "no_frozen_snapshot", "snapshot_id": None} for u in user_ids]
        if self._debug_delay_s:
            await asyncio.sleep(self._debug_delay_s)
        self._stats["frozen_batches"] += 1
        self._stats["frozen_requests"] += len(user_ids)
        t0 = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self._executor, _compute_only, frozen.tower, store, frozen.snapshot_id, list(user_ids)
        )
        self._count_skipped(results, "frozen")
        self._metrics.latency.observe(time.perf_counter() - t0 + self._debug_delay_s, tags={"tower": "frozen"})
        self._metrics.batch_size.observe(len(user_ids), tags={"tower": "frozen"})
        return [results[int(u)] for u in user_ids]

    # -- introspection -------------------------------------------------------------------------
    def snapshot_id(self) -> str | None:
        """The id of the snapshot whose tower this replica runs."""
        return self._prod.snapshot_id if self._prod else None

    def version(self) -> dict:
        """What runs (id, fingerprint), whose workspace it is, what the latest ``user_config`` asked for, and why it
        does not run if it does not (``last_error``: the snapshot and the exception type); the same for the frozen
        snapshot. ``errors_detail`` (folders, exception text) is for the ingress to log, never to answer."""
        requested = self._requested or (None, None, None)
        prod, frozen = self._prod, self._frozen
        last, frozen_error = self._last_error, self._frozen_error
        return {
            "snapshot_id": prod.snapshot_id if prod else None,
            "fingerprint": prod.fingerprint if prod else None,
            "workspace_id": self._user_config.get("workspace_id"),
            "requested_snapshot_id": requested[1],
            "requested_fingerprint": requested[2],
            "last_error": last[0] if last else None,
            "frozen_snapshot_id": frozen.snapshot_id if frozen else None,
            "frozen_error": frozen_error[0] if frozen_error else None,
            "cpu_priority": self._cpu_priority(),
            "errors_detail": [e[1] for e in (last, frozen_error) if e],
        }

    def _cpu_priority(self) -> dict:
        return {role: thread_priority(tid) for role, tid in self._cpu["threads"].items()}

    def info(self) -> dict:
        """Loaded snapshots, load times, last load errors, the ``user_config`` in force and counters."""
        prod, frozen = self._prod, self._frozen
        return {
            "snapshot_id": prod.snapshot_id if prod else None,
            "snapshot_dir": prod.snapshot_dir if prod else None,
            "fingerprint": prod.fingerprint if prod else None,
            "loaded_at": prod.loaded_at if prod else None,
            "frozen_snapshot_id": frozen.snapshot_id if frozen else None,
            "frozen_snapshot_dir": frozen.snapshot_dir if frozen else None,
            "pid": os.getpid(),
            "cpu_priority": self._cpu_priority(),
            "requested": list(self._requested) if self._requested else None,
            "last_error": self._last_error[1] if self._last_error else None,
            "frozen_error": self._frozen_error[1] if self._frozen_error else None,
            "user_config": dict(self._user_config),
            "max_batch_size": self.compute._get_max_batch_size(),  # type: ignore[attr-defined]
            "stats": dict(self._stats),
        }

    async def __del__(self) -> None:
        # Serve calls this before the replica stops: the buffered realtime write-backs are written, not lost.
        done = self._buffer_done
        self._flush()
        if done is not None:
            await asyncio.wait({done}, timeout=10)

    def _reopen_store_if_replaced(self) -> None:
        """A rebuilt online store is a new file: Feast's cached connection would keep writing to the old one
        (write-backs still buffered, <= write_coalesce_ms of them, go there). Never fails the health check."""
        if self._store is None or self._store_key is None:
            return
        try:
            if reader_for(self._store).replaced():
                _, self._store = open_store(*self._store_key)
                log.warning("online store file replaced: reopened it")
        except Exception as exc:  # the reads and writes themselves report a store that cannot be opened
            log.warning("could not check or reopen the online store: %s", exc)

    def check_health(self) -> None:
        """Ray Serve's health check (every few seconds): unhealthy while no production tower is loaded.
        Also refreshes the loaded-snapshot gauges (a gauge set once is not exported forever)."""
        if self._prod is None:
            raise RuntimeError(f"no user tower loaded (last error: {self._last_error and self._last_error[1]})")
        self._reopen_store_if_replaced()
        self._metrics.loaded.set(1, tags={"role": "production", "snapshot_id": self._prod.snapshot_id})
        if self._frozen is not None:
            self._metrics.loaded.set(1, tags={"role": "frozen", "snapshot_id": self._frozen.snapshot_id})


def _load_failure(role: str, snapshot_id: str, snapshot_dir: str, exc: BaseException) -> tuple[str, str]:
    """``(reason, detail)`` of a snapshot that failed to load: the reason names the snapshot and the exception type
    (public), the detail adds the folder and the exception text (logs, :meth:`ComputeCenter.info`)."""
    return (f"loading {role}{snapshot_id} failed ({type(exc).__name__})",
            f"loading {role}{snapshot_id} from {snapshot_dir} failed: {type(exc).__name__}: {exc}")


def _compute_pooled(
    tower, store, snapshot_id: str, user_ids: list[int], preview: bool = True, unit: str = "snapshot"
) -> tuple[dict[int, dict], dict | None]:
    """Job 1 of a compute batch: read features -> tower (-> pooled value as the write will store it).

    Rows go from the store to the tower's tensors without a pandas frame (for the one user of a realtime call
    the frame cost more than the tower).

    Args:
        preview: Compute the pooled value now (realtime answers with it); otherwise only the tower runs
            and results carry no embeddings (async: nobody waits for them).
        unit: ``serving.pool_unit`` (the preview pools as the write will).

    Returns:
        ``(results, pending)``: per user the answer (status ``computed``, with the pooled embeddings when
        ``preview``, or a skip reason), and what job 2 writes (None if nothing).
    """
    rows, skipped = read_user_rows(store, user_ids, tower.spec)
    emb, ids, bad = _embed_finite(tower, rows)
    skipped.update(bad)
    results: dict[int, dict] = {
        u: {"user_id": u, "status": reason, "snapshot_id": None, "written_at_ms": None} for u, reason in skipped.items()
    }
    if not ids:
        return results, None
    written_at_ms = to_ms(None)
    pending = {"user_ids": ids, "embeddings": emb, "written_at_ms": written_at_ms}
    if not preview:
        for u in ids:
            results[u] = {"user_id": u, "status": "computed", "snapshot_id": snapshot_id, "written_at_ms": written_at_ms}
        return results, pending
    for u, (pooled, n_pooled) in pooled_preview(store, ids, emb, snapshot_id, written_at_ms, unit=unit).items():
        results[u] = {
            "user_id": u,
            "status": "computed",
            "snapshot_id": snapshot_id,
            "written_at_ms": written_at_ms,
            "pooled_versions": n_pooled,
            "embeddings": pooled,
        }
    return results, pending


def _embed_finite(tower, rows: dict[int, dict]) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Embeddings of the users whose feature rows and embeddings are finite, ``TOWER_BATCH_SIZE`` per forward pass
    (:func:`sum_models.snapshot.embed_user_rows_finite`): one bad row must not fail the batch it shares.

    Returns:
        ``(embeddings fp16 [N, K, D], their user ids, {skipped user id: nonfinite_features | nonfinite_embedding})``.
    """
    from sum_models.snapshot import embed_user_rows_finite  # torch: loaded in the replica only

    ids = list(rows)
    emb, skipped = embed_user_rows_finite(tower, [rows[u] for u in ids], batch_size=TOWER_BATCH_SIZE)
    ok = skipped == ""
    return emb[ok], [u for u, good in zip(ids, ok) if good], {u: str(r) for u, r in zip(ids, skipped) if r}


def _write_pooled(store, snapshot_id: str, pending: dict) -> int:
    """Job 2 of a compute batch: the pooled write-back (read-modify-write under the store's lock)."""
    # Logged offline too: downstream models train on what serving returned (point-in-time, through Feast).
    return write_embeddings(store, pending["user_ids"], pending["embeddings"], snapshot_id, pending["written_at_ms"],
                            unit=pending["unit"], to_offline=True)


def _compute_only(tower, store, snapshot_id: str, user_ids: list[int]) -> dict[int, dict]:
    """Blocking part of a frozen batch: read features -> tower (no pooling, no write)."""
    rows, skipped = read_user_rows(store, user_ids, tower.spec)
    emb, ids, bad = _embed_finite(tower, rows)
    skipped.update(bad)
    results: dict[int, dict] = {u: {"user_id": u, "status": reason, "snapshot_id": None} for u, reason in skipped.items()}
    if ids:
        now = to_ms(None)
        for i, u in enumerate(ids):
            results[u] = {
                "user_id": u,
                "status": "computed",
                "snapshot_id": snapshot_id,
                "written_at_ms": now,
                "pooled_versions": 1,
                "embeddings": emb[i],
            }
    return results
