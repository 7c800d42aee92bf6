"""SOAP (paper §4): the SUM Online Asynchronous Platform as a Ray Serve application.

Two deployments:

* :class:`SoapIngress` (the client, FastAPI): answers reads of users' embeddings in one of four modes
  (``serving.mode``, switchable by ``reconfigure`` or per request with ``?mode=``):

  ``async`` (default)
      the stored, average-pooled embeddings from the online store at once; fires the compute call
      without awaiting it (at most ``serving.max_inflight_compute`` in flight; more are dropped and
      counted). The read never waits for inference.
  ``realtime``
      fires the compute call and waits for its pooled result up to ``serving.realtime_budget_ms``
      (the read of the store runs meanwhile); past the budget it answers from the store and counts a
      fallback, while the compute still finishes and writes back.
  ``offline``
      the last daily batch value (``batch_embedding_k``), no compute call: the paper's offline batch.
  ``frozen``
      the first production snapshot's tower applied to the user's current features, computed on read
      (no pooling, no write: the frozen model never shifts, and its output must not overwrite the
      production value). The compute deployment holds that tower beside the production one; the
      rollout keeps it across snapshots (``frozen_snapshot_*`` in the compute ``user_config``).

* :class:`ComputeCenter`: holds the production user tower (and the frozen one). Batches compute calls
  (``@serve.batch``), reads the users' current features from the online store, runs the tower and
  writes the new version through :func:`serving.store_io.write_embeddings`, which average-pools it with
  the two previous stored versions and stores fp16 values with the snapshot id and write time (the same
  write the daily batch uses). A new snapshot arrives through ``user_config`` ->
  :meth:`ComputeCenter.reconfigure`, which swaps the tower only after a successful load.

Deployment code versions are pinned to a hash of the source code and constructor settings
(:func:`build_app`), so redeploying with another ``user_config`` reconfigures the running replicas in
place instead of replacing them (Ray Serve gives every ``serve.run`` a random code version otherwise).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Literal

from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from ray import serve

from serving.store_io import MAX_USER_ID

if TYPE_CHECKING:
    from ray.serve.deployment import Application
    from ray.serve.handle import DeploymentHandle

    from sum_platform.config import Params

__all__ = [
    "MODES",
    "ComputeCenter",
    "SoapIngress",
    "api",
    "build_app",
    "compute_user_config",
    "ingress_user_config",
    "app_settings",
    "snapshot_fingerprint",
    "ComputeLauncher",
]

log = logging.getLogger("ray.serve")

MODES = ("async", "realtime", "offline", "frozen")
Mode = Literal["async", "realtime", "offline", "frozen"]
#: Keys every compute ``user_config`` must carry (others are optional, see :func:`compute_user_config`).
USER_CONFIG_KEYS = ("snapshot_dir", "snapshot_id", "workspace", "params_path")
#: How long the ingress waits for the compute deployment's snapshot id (``/version``, ``/healthz``).
VERSION_TIMEOUT_S = 5.0
#: Users per tower forward pass inside one compute batch.
TOWER_BATCH_SIZE = 512
#: Hard cap on ids in a batch request body (``serving.max_batch_users`` is the configured bound).
BATCH_HARD_MAX = 10_000
#: Lock wait of a store read on the event loop before it is retried off the loop.
READ_LOCK_TIMEOUT_S = 0.05

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def snapshot_fingerprint(snapshot_dir: str | os.PathLike) -> str | None:
    """Content identity of a snapshot: a hash of its manifest (which holds every file's sha256 and the
    export time), so a snapshot re-exported under the same id gets another fingerprint. None if the
    manifest is unreadable."""
    try:
        data = (Path(snapshot_dir) / "manifest.json").read_bytes()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()[:16]


def _open_store(workspace: str, params_path: str) -> tuple["Params", Any]:
    """Opens the workspace's feature store inside a replica (which has its own environment)."""
    from sum_platform.config import load_params
    from sum_platform.feature_store import get_store

    os.environ["SUM_WORKSPACE"] = str(workspace)
    os.environ["SUM_PARAMS"] = str(params_path)
    params = load_params(params_path)
    return params, get_store(params)


# ---------------------------------------------------------------------------------------------
# Compute center
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tower:
    tower: Any
    snapshot_id: str
    snapshot_dir: str
    fingerprint: str | None
    loaded_at: float


def _background_thread(cpu: dict, role: str) -> None:
    """``ThreadPoolExecutor`` initializer of the compute replica's worker threads: lowers the calling
    thread's CPU priority (``cpu["niceness"]``, and ``SCHED_IDLE`` when ``cpu["sched_idle"]``: the thread
    runs only on CPU time no normal thread wants) and records its native id under ``role``."""
    tid = threading.get_native_id()
    cpu["threads"][role] = tid
    cpus = _compute_cpu_set(cpu.get("cpus"))
    if cpus:  # keeps the tower's working set off the other cores' caches (who=0: this thread)
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            log.warning("could not pin the %s thread to CPUs %s: %s", role, sorted(cpus), exc)
    try:
        if cpu["niceness"] > os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, cpu["niceness"])  # who=0: this thread on Linux
        if cpu["sched_idle"] and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a platform without per-thread priorities: compute still runs, just not lower
        log.warning("could not lower the %s thread's CPU priority: %s", role, exc)


def _compute_cpu_set(spec: Any) -> set[int]:
    """The CPUs ``serving.compute_cpus`` names, among those this process may use: ``None`` or ``[]``: no
    pinning; ``"last"``: the highest-numbered allowed CPU (when there are at least two); a list of ids."""
    if not spec or not hasattr(os, "sched_getaffinity"):
        return set()
    allowed = os.sched_getaffinity(0)
    if spec == "last":
        return {max(allowed)} if len(allowed) >= 2 else set()
    wanted = {int(c) for c in spec}
    if not wanted <= allowed:
        log.warning("serving.compute_cpus %s not all allowed (allowed: %s); using the allowed ones",
                    sorted(wanted), sorted(allowed))
    return wanted & allowed


def _thread_priority(tid: int) -> dict:
    """A thread's scheduling policy and nice level, as the kernel reports them."""
    names = {getattr(os, n): n.removeprefix("SCHED_").lower() for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE")
             if hasattr(os, n)}
    try:
        policy = names.get(os.sched_getscheduler(tid), "other")
        nice = int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except (OSError, ValueError, IndexError):
        return {"tid": tid}
    cpus = sorted(os.sched_getaffinity(tid)) if hasattr(os, "sched_getaffinity") else None
    return {"tid": tid, "policy": policy, "niceness": nice, "cpus": cpus}


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
        settings: :func:`app_settings` (``torch_threads``, ``compute_niceness``, ...).
    """

    def __init__(self, settings: dict | None = None) -> None:
        import torch

        from serving.metrics import ComputeMetrics

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
        self._last_error: str | None = None
        self._frozen_error: str | None = None
        self._requested: tuple[str, str, str | None] | None = None
        self._user_config: dict = {}
        self._debug_delay_s = 0.0
        # Snapshot loads run beside compute batches (which keep using the current tower meanwhile).
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-load",
                                          initializer=_background_thread, initargs=(self._cpu, "load"))
        # One worker: feature reads, inference and writes of one batch never interleave with another's.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-compute",
                                            initializer=_background_thread, initargs=(self._cpu, "compute"))
        for pool in (self._loader, self._executor):
            pool.submit(lambda: None)  # start the threads now, so info() reports their priority at once
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
            user_config: :func:`compute_user_config`. A loaded snapshot is reloaded when its fingerprint
                changed (re-exported under the same id).

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
                self._last_error = f"loading {snapshot_id} from {snapshot_dir} failed: {type(exc).__name__}: {exc}"
                if self._prod is None:
                    log.error("%s; no tower to keep", self._last_error)
                    raise
                log.error("%s; keeping %s", self._last_error, self._prod.snapshot_id)
            else:
                self._set_loaded("production", self._prod, loaded)
                self._prod, self._store, self._store_key = loaded, store, store_key
                self._last_error = None
                log.info("compute center serves snapshot %s from %s", snapshot_id, snapshot_dir)
        await self._reconfigure_frozen(user_config, store_key)

    def _apply_knobs(self, user_config: dict) -> None:
        self._debug_delay_s = max(0.0, float(user_config.get("debug_delay_ms") or 0.0)) / 1000.0
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
                self._frozen_error = f"loading frozen {frozen_id} from {frozen_dir} failed: {type(exc).__name__}: {exc}"
                log.error("%s; frozen mode keeps %s", self._frozen_error, self._frozen and self._frozen.snapshot_id)
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
        from sum_models.snapshot import load_user_tower

        fingerprint = snapshot_fingerprint(snapshot_dir)
        tower, manifest = load_user_tower(Path(snapshot_dir))
        if manifest.get("snapshot_id") != snapshot_id:
            raise ValueError(f"snapshot at {snapshot_dir} is {manifest.get('snapshot_id')!r}, not {snapshot_id!r}")
        store = self._store if store_key == self._store_key and self._store is not None else None
        if store is None:
            _, store = _open_store(*store_key)
        return _Tower(tower.eval(), snapshot_id, snapshot_dir, fingerprint, time.time()), store

    # -- compute -------------------------------------------------------------------------------
    async def _process(self, user_ids: list[int], wait_for_write: bool) -> dict[int, dict]:
        """Computes a batch in two executor jobs: (1) features -> tower -> pooled value (a lock-free
        preview of the write), (2) the pooled write-back. Job 2 is queued right behind job 1 (the
        single-thread executor keeps batches in order), so ``wait_for_write=False`` answers after job 1
        (realtime: the write is off the critical path) and the write follows."""
        prod, store = self._prod, self._store
        if prod is None:
            raise RuntimeError("no user tower loaded")
        if self._debug_delay_s:
            await asyncio.sleep(self._debug_delay_s)  # test/benchmark knob: a slower model
        self._stats["batches"] += 1
        self._stats["requests"] += len(user_ids)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results, pending = await loop.run_in_executor(
                self._executor, _compute_pooled, prod.tower, store, prod.snapshot_id, list(user_ids), not wait_for_write
            )
        except Exception:
            self._stats["failed_batches"] += 1
            raise
        self._stats["skipped"] += len(results) - (len(pending["user_ids"]) if pending else 0)
        if not pending:
            return results
        write = loop.run_in_executor(self._executor, _write_pooled, store, prod.snapshot_id, pending)
        n_users = len(user_ids)

        def written(fut: "asyncio.Future") -> None:
            if fut.cancelled() or fut.exception() is not None:
                self._stats["failed_batches"] += 1
                log.error("write-back of %d users failed: %s", len(pending["user_ids"]), fut.exception())
                return
            self._stats["written"] += fut.result()
            self._metrics.write_backs.inc(fut.result())
            self._metrics.latency.observe(time.perf_counter() - t0 + self._debug_delay_s, tags={"tower": "production"})
            self._metrics.batch_size.observe(n_users, tags={"tower": "production"})

        write.add_done_callback(written)
        if wait_for_write:
            await write
            for u in pending["user_ids"]:
                results[u]["status"] = "written"
        return results

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def compute(self, user_ids: list[int]) -> list[dict]:
        """Realtime: recomputes and pools the users' embeddings, answers, then writes them back.

        Returns:
            Per call: ``{"user_id", "status", "snapshot_id", "written_at_ms", "pooled_versions",
            "embeddings"}``; status ``computed`` (``embeddings``: the pooled fp16 ``[K, D]``, being written
            back) or why it was skipped (``no_features``).
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
        self._metrics.latency.observe(time.perf_counter() - t0 + self._debug_delay_s, tags={"tower": "frozen"})
        self._metrics.batch_size.observe(len(user_ids), tags={"tower": "frozen"})
        return [results[int(u)] for u in user_ids]

    # -- introspection -------------------------------------------------------------------------
    def snapshot_id(self) -> str | None:
        """The id of the snapshot whose tower this replica runs."""
        return self._prod.snapshot_id if self._prod else None

    def version(self) -> dict:
        """What runs (id, fingerprint), what the latest ``user_config`` asked for, and why it does not
        run if it does not (``last_error``); the same for the frozen snapshot."""
        requested = self._requested or (None, None, None)
        prod, frozen = self._prod, self._frozen
        return {
            "snapshot_id": prod.snapshot_id if prod else None,
            "fingerprint": prod.fingerprint if prod else None,
            "requested_snapshot_id": requested[1],
            "requested_fingerprint": requested[2],
            "last_error": self._last_error,
            "frozen_snapshot_id": frozen.snapshot_id if frozen else None,
            "frozen_error": self._frozen_error,
            "cpu_priority": self._cpu_priority(),
        }

    def _cpu_priority(self) -> dict:
        return {role: _thread_priority(tid) for role, tid in self._cpu["threads"].items()}

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
            "last_error": self._last_error,
            "frozen_error": self._frozen_error,
            "user_config": dict(self._user_config),
            "max_batch_size": self.compute._get_max_batch_size(),  # type: ignore[attr-defined]
            "stats": dict(self._stats),
        }

    def check_health(self) -> None:
        """Ray Serve's health check (every few seconds): unhealthy while no production tower is loaded.
        Also refreshes the loaded-snapshot gauges (a gauge set once is not exported forever)."""
        if self._prod is None:
            raise RuntimeError(f"no user tower loaded (last error: {self._last_error})")
        self._metrics.loaded.set(1, tags={"role": "production", "snapshot_id": self._prod.snapshot_id})
        if self._frozen is not None:
            self._metrics.loaded.set(1, tags={"role": "frozen", "snapshot_id": self._frozen.snapshot_id})


def _compute_pooled(
    tower, store, snapshot_id: str, user_ids: list[int], preview: bool = True
) -> tuple[dict[int, dict], dict | None]:
    """Job 1 of a compute batch: read features -> tower (-> pooled value as the write will store it).

    Args:
        preview: Compute the pooled value now (realtime answers with it); otherwise only the tower runs
            and results carry no embeddings (async: nobody waits for them).

    Returns:
        ``(results, pending)``: per user the answer (status ``computed``, with the pooled embeddings when
        ``preview``, or a skip reason), and what job 2 writes (None if nothing).
    """
    import numpy as np

    from serving.store_io import pooled_preview, read_user_features, to_ms
    from sum_models.snapshot import embed_users

    unique = list(dict.fromkeys(int(u) for u in user_ids))
    frame, skipped = read_user_features(store, unique, tower.spec)
    results: dict[int, dict] = {
        u: {"user_id": u, "status": reason, "snapshot_id": None, "written_at_ms": None} for u, reason in skipped.items()
    }
    if not len(frame):
        return results, None
    emb = embed_users(tower, frame, tower.spec, batch_size=TOWER_BATCH_SIZE)
    written_at_ms = to_ms(None)
    ids = frame["user_id"].to_numpy()
    pending = {"user_ids": [int(u) for u in ids], "embeddings": emb, "written_at_ms": written_at_ms}
    if not preview:
        for u in pending["user_ids"]:
            results[u] = {"user_id": u, "status": "computed", "snapshot_id": snapshot_id, "written_at_ms": written_at_ms}
        return results, pending
    rows = pooled_preview(store, ids, emb, snapshot_id, written_at_ms)
    k = emb.shape[1]
    for r in rows.itertuples(index=False):
        results[int(r.user_id)] = {
            "user_id": int(r.user_id),
            "status": "computed",
            "snapshot_id": snapshot_id,
            "written_at_ms": written_at_ms,
            "pooled_versions": int(r.pooled_versions),
            "embeddings": np.stack([np.asarray(getattr(r, f"embedding_{j}")) for j in range(k)]).astype(np.float16),
        }
    return results, pending


def _write_pooled(store, snapshot_id: str, pending: dict) -> int:
    """Job 2 of a compute batch: the pooled write-back (read-modify-write under the store's lock)."""
    from serving.store_io import write_embeddings

    return write_embeddings(store, pending["user_ids"], pending["embeddings"], snapshot_id, pending["written_at_ms"])


def _compute_only(tower, store, snapshot_id: str, user_ids: list[int]) -> dict[int, dict]:
    """Blocking part of a frozen batch: read features -> tower (no pooling, no write)."""
    from serving.store_io import read_user_features, to_ms
    from sum_models.snapshot import embed_users

    unique = list(dict.fromkeys(int(u) for u in user_ids))
    frame, skipped = read_user_features(store, unique, tower.spec)
    results: dict[int, dict] = {u: {"user_id": u, "status": reason, "snapshot_id": None} for u, reason in skipped.items()}
    if len(frame):
        emb = embed_users(tower, frame, tower.spec, batch_size=TOWER_BATCH_SIZE)
        now = to_ms(None)
        for i, u in enumerate(frame["user_id"].tolist()):
            results[int(u)] = {
                "user_id": int(u),
                "status": "computed",
                "snapshot_id": snapshot_id,
                "written_at_ms": now,
                "pooled_versions": 1,
                "embeddings": emb[i],
            }
    return results


# ---------------------------------------------------------------------------------------------
# Ingress (SOAP client)
# ---------------------------------------------------------------------------------------------
class ComputeLauncher:
    """Fire-and-forget compute calls, at most ``max_inflight`` users in flight; over the bound a call is
    dropped (and counted).

    Each call runs in a task with a fresh context, detached from the HTTP request that fired it: Ray
    Serve cancels the child calls of a request whose client goes away, and the write path must not
    depend on the reader. Outcomes are counted per user (``stats``), failures logged (rate-limited).

    Args:
        max_inflight: Bound on users in flight (reserved, or in a call not yet answered).
        on_outcome: Called with ``(outcome, users)`` for each finished call (``written``, ``skipped``,
            ``computed`` or ``failed``).
    """

    def __init__(self, max_inflight: int, on_outcome: Callable[[str, int], None] | None = None) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = int(max_inflight)
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()
        self._on_outcome = on_outcome
        self.stats = {"scheduled": 0, "dropped": 0, "written": 0, "computed": 0, "skipped": 0, "failed": 0}

    @property
    def inflight(self) -> int:
        """Users reserved or in calls not answered yet."""
        return self._inflight

    def try_reserve(self, users: int = 1) -> bool:
        """Reserves room for ``users``; False (and counted as dropped) when over the bound."""
        if self._inflight + users > self.max_inflight:
            self.stats["dropped"] += users
            return False
        self._inflight += users
        self.stats["scheduled"] += users
        return True

    def start(self, make_call: Callable[[], Awaitable[Any]], reserved: int) -> "asyncio.Task":
        """Starts ``make_call()`` (call from the event loop) for ``reserved`` users reserved before."""
        task = asyncio.get_running_loop().create_task(self._run(make_call, reserved), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def fire(self, make_call: Callable[[], Awaitable[Any]], users: int = 1) -> "asyncio.Task | None":
        """Reserves and starts a call without awaiting it.

        Returns:
            The task (realtime and frozen reads await it with a budget), or None if dropped.
        """
        return self.start(make_call, users) if self.try_reserve(users) else None

    async def _run(self, make_call: Callable[[], Awaitable[Any]], reserved: int) -> Any:
        try:
            result = await make_call()
        except Exception as exc:
            self._count("failed", reserved)
            n = self.stats["failed"]
            if n <= 10 or n % 1000 == 0:
                log.warning("async compute call failed (%d so far): %s: %s", n, type(exc).__name__, exc)
            return None
        finally:
            self._inflight -= reserved
        for item in result if isinstance(result, list) else [result]:
            status = item.get("status") if isinstance(item, dict) else None
            self._count(status if status in ("written", "computed") else "skipped", 1)
        return result

    def _count(self, outcome: str, users: int) -> None:
        self.stats[outcome] += users
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome, users)
            except Exception:  # metrics must never break the write path
                pass


class ComputeCoalescer:
    """Async-mode compute calls: the users read within ``window_s`` go to the compute deployment as one
    ``compute_many`` call (a repeated user once), so the ingress makes one handle call per window
    instead of one per read, after the responses have gone out.

    Args:
        launcher: Bounds and counts users in flight (a coalesced repeat counts as scheduled, no room).
        send: ``send(user_ids)`` -> awaitable per-user results.
        window_s: How long the first user of a window waits (0: the next event-loop iteration).
        max_users: A window holding this many users is sent at once.
    """

    def __init__(
        self,
        launcher: ComputeLauncher,
        send: Callable[[list[int]], Awaitable[Any]],
        window_s: float,
        max_users: int = 64,
    ) -> None:
        self._launcher, self._send = launcher, send
        self.window_s, self.max_users = float(window_s), int(max_users)
        self._pending: dict[int, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, user_id: int) -> str:
        """Schedules a user's recompute; ``scheduled`` or ``dropped`` (the in-flight bound)."""
        if user_id in self._pending:
            self._launcher.stats["scheduled"] += 1
            return "scheduled"
        if not self._launcher.try_reserve(1):
            return "dropped"
        self._pending[user_id] = None
        if len(self._pending) >= self.max_users:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.window_s, self.flush) if self.window_s > 0 else loop.call_soon(self.flush)
        return "scheduled"

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        ids = list(self._pending)
        self._pending.clear()
        self._launcher.start(lambda: self._send(ids), reserved=len(ids))


class StoreUnavailable(RuntimeError):
    """The online store could not be read."""


def _local_metrics_url() -> str:
    """This node's Ray Prometheus endpoint (the agent listens on the node address, or every address)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://127.0.0.1:{int(node['MetricsExportPort'])}/metrics"
    raise RuntimeError("this node has no metrics export port")


def _validate_ingress_config(user_config: dict) -> dict:
    cfg = dict(user_config or {})
    if cfg.get("mode") not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.get('mode')!r}")
    for key in ("realtime_budget_ms", "frozen_timeout_ms"):
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    users = cfg.get("max_batch_users")
    if not isinstance(users, int) or isinstance(users, bool) or not 1 <= users <= BATCH_HARD_MAX:
        raise ValueError(f"max_batch_users must be an int in [1, {BATCH_HARD_MAX}], got {users!r}")
    coalesce = cfg.get("coalesce_ms", 200.0)
    if not isinstance(coalesce, (int, float)) or isinstance(coalesce, bool) or not 0 <= coalesce <= 1000:
        raise ValueError(f"coalesce_ms must be a number in [0, 1000], got {coalesce!r}")
    return {
        "mode": cfg["mode"],
        "realtime_budget_ms": float(cfg["realtime_budget_ms"]),
        "frozen_timeout_ms": float(cfg["frozen_timeout_ms"]),
        "max_batch_users": users,
        "coalesce_ms": float(coalesce),
    }


def ingress_user_config(params: "Params", **overrides: Any) -> dict:
    """The ingress ``user_config``: ``mode``, ``realtime_budget_ms``, ``frozen_timeout_ms``,
    ``max_batch_users``, ``coalesce_ms`` from ``params.serving``, with ``overrides``.

    Raises:
        ValueError: An invalid mode or bound.
    """
    s = params.serving
    cfg = {
        "mode": s.mode,
        "realtime_budget_ms": float(s.realtime_budget_ms),
        "frozen_timeout_ms": float(s.frozen_timeout_ms),
        "max_batch_users": int(s.max_batch_users),
        "coalesce_ms": float(s.compute_coalesce_ms),
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return _validate_ingress_config(cfg)


UserId = Annotated[StrictInt, Field(ge=0, le=MAX_USER_ID)]


class EmbeddingsResponse(BaseModel):
    """A user's SUM embeddings, as the mode in force answers them."""

    user_id: int
    mode: Mode = Field(description="Mode that answered.")
    source: Literal["store", "compute", "batch", "frozen"] = Field(
        description="store: the online store's pooled value; compute: the fresh pooled value (realtime); "
        "batch: the daily batch value (offline); frozen: the first snapshot's tower (frozen)."
    )
    snapshot_id: str | None = Field(description="Snapshot that computed the latest version.")
    written_at_ms: int | None = Field(description="When that version was written (computed, for frozen), Unix ms.")
    age_seconds: float | None = Field(description="Seconds since then.")
    pooled_versions: int | None = Field(description="Versions averaged into the value (paper §5.2), 1-3.")
    embeddings: list[list[float]] = Field(description="K embeddings of dimension D (fp16 values as floats).")
    compute: str = Field(
        description="Fate of the compute call: scheduled | dropped (async); completed | timeout | dropped | "
        "failed | skipped (realtime, frozen); not_requested (offline)."
    )


class BatchRequest(BaseModel):
    """Users to read (duplicates are answered once, in first-seen order)."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(
        min_length=1, max_length=BATCH_HARD_MAX, description="Non-negative int64 ids; at most serving.max_batch_users."
    )
    mode: Mode | None = Field(None, description="Mode for this request; default the deployment's mode.")


class BatchItem(BaseModel):
    user_id: int
    status: Literal["ok", "not_found", "timeout", "unavailable"] = Field(
        description="not_found: no stored value (async/realtime/offline) or no features (frozen); "
        "timeout/unavailable: frozen compute did not answer in time / is not loaded."
    )
    source: str | None = None
    snapshot_id: str | None = None
    written_at_ms: int | None = None
    age_seconds: float | None = None
    pooled_versions: int | None = None
    embeddings: list[list[float]] | None = None
    compute: str


class BatchResponse(BaseModel):
    mode: Mode
    count: int = Field(description="Distinct users answered.")
    found: int = Field(description="Users with status ok.")
    results: list[BatchItem]


class VersionResponse(BaseModel):
    """What the compute deployment runs, and the outcome of the last snapshot it was asked to load."""

    snapshot_id: str | None = Field(description="Snapshot whose user tower computes embeddings now.")
    fingerprint: str | None = Field(description="Content hash of that snapshot's manifest.")
    requested_snapshot_id: str | None = Field(description="Snapshot of the latest user_config.")
    requested_fingerprint: str | None = Field(description="Its fingerprint.")
    last_error: str | None = Field(description="Why the requested snapshot is not running (None if it is).")
    frozen_snapshot_id: str | None = Field(None, description="Snapshot frozen mode computes with.")
    frozen_error: str | None = Field(None, description="Why the requested frozen snapshot is not loaded.")
    cpu_priority: dict = Field(default_factory=dict, description="Scheduling policy and nice level of the compute "
                               "replica's worker threads (compute, load), as the kernel reports them.")
    ingress: dict = Field(default_factory=dict, description="The ingress user_config in force (mode, budgets).")


class ErrorResponse(BaseModel):
    detail: str
    user_id: int | None = None
    mode: str | None = None
    compute: str | None = None


api = FastAPI(
    title="SOAP - SUM Online Asynchronous Platform",
    description=(
        "Serves SUM user embeddings (paper §4). Modes: async (stored pooled value, async recompute), "
        "realtime (fresh value within a budget, else stored), offline (daily batch value), frozen (the first "
        "production snapshot's tower). A user with no stored value (or, in frozen mode, no features) gets "
        "404 with a reason; malformed input gets 422 (or 413 for an oversized batch); a store or compute "
        "outage gets 503."
    ),
    version="2",
)


def _json(content: Any, status_code: int = 200) -> Response:
    """A JSON response serialised once (the route's response_model documents it; FastAPI would otherwise
    validate and re-encode the K x D floats on every read)."""
    try:
        import orjson

        body = orjson.dumps(content)
    except ImportError:  # pragma: no cover - orjson ships with the lock file
        body = json.dumps(content, separators=(",", ":")).encode()
    return Response(content=body, status_code=status_code, media_type="application/json")


def _age(written_at_ms: int | None, now: float) -> float | None:
    return None if written_at_ms is None else max(0.0, now - written_at_ms / 1000.0)


@serve.deployment(
    name="SoapIngress",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=256,
    health_check_period_s=5.0,
    # A code/settings change replaces the replica: the old one serves reads until the new one is up.
    max_surge_percent=100,
)
@serve.ingress(api)
class SoapIngress:
    """The SOAP client: answers reads in the configured mode, fires compute calls asynchronously.

    Args:
        compute: Handle of the :class:`ComputeCenter` deployment.
        settings: :func:`app_settings`.
    """

    def __init__(self, compute: "DeploymentHandle", settings: dict) -> None:
        from serving.metrics import IngressMetrics
        from serving.store_io import EmbeddingReader

        self._compute = compute
        self._metrics = IngressMetrics()
        self._launcher = ComputeLauncher(int(settings["max_inflight_compute"]), on_outcome=self._count_outcome)
        self._settings = dict(settings)
        self._params, self._store = _open_store(settings["workspace"], settings["params_path"])
        self._reader = EmbeddingReader(self._store)
        # A store read takes ~0.1 ms and, in WAL mode, does not wait for writers: it runs on the event
        # loop (a thread hop would cost more than the read). One that finds the database locked
        # (rare: WAL recovery) is retried here, off the loop, with a long lock timeout.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-read")
        self._config: dict = ingress_user_config(self._params)
        self._coalescer = ComputeCoalescer(
            self._launcher, self._compute_many, window_s=self._config["coalesce_ms"] / 1000.0
        )
        self._config_error: str | None = None
        self._stats = {"requests": 0, "not_found": 0, "fallbacks": 0, "frozen_failures": 0}
        self._metrics_url: str | None = None

    def reconfigure(self, user_config: dict) -> None:
        """Mode and budgets (:func:`ingress_user_config`). An invalid config keeps the previous one and
        is reported on ``/version`` (raising would stop the replica, taking reads down)."""
        try:
            self._config = _validate_ingress_config(user_config)
            self._config_error = None
            self._coalescer.window_s = self._config["coalesce_ms"] / 1000.0
        except ValueError as exc:
            self._config_error = str(exc)
            log.error("ingress user_config rejected (%s); keeping %s", exc, self._config)

    def _count_outcome(self, outcome: str, users: int) -> None:
        self._metrics.compute_calls.inc(users, tags={"outcome": outcome})

    def _compute_many(self, user_ids: list[int]) -> Awaitable[Any]:
        return self._compute.compute_many.remote(user_ids)

    def _fire(self, method: str, user_id: int, mode: str) -> "asyncio.Task | None":
        fn = getattr(self._compute, method)
        task = self._launcher.fire(lambda: fn.remote(user_id))
        if task is None:
            self._metrics.dropped.inc(tags={"mode": mode})
        return task

    async def _read(self, user_ids: list[int], source: str) -> dict[int, dict]:
        import sqlite3

        try:
            return self._reader.embeddings(user_ids, source, READ_LOCK_TIMEOUT_S)
        except sqlite3.OperationalError:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._reader.embeddings, user_ids, source
            )

    def _observe(self, mode: str, endpoint: str, code: int, t0: float) -> None:
        self._metrics.read_latency.observe(time.perf_counter() - t0, tags={"mode": mode, "endpoint": endpoint})
        self._metrics.requests.inc(tags={"mode": mode, "endpoint": endpoint, "code": str(code)})

    async def _answer_users(self, user_ids: list[int], mode: str, t0: float) -> dict[int, dict]:
        """Answers of the users in ``mode``: ``{user_id: item}`` with ``status`` ok/not_found/timeout/
        unavailable, ``compute`` (the compute call's fate) and, when ok, the value and its provenance.

        Raises:
            StoreUnavailable: The online store read failed (async, realtime, offline).
        """
        now = time.time
        if mode == "offline":
            rows = await self._read_or_raise(user_ids, "batch")
            return {u: self._item(u, rows.get(u), "batch", "not_requested", now()) for u in user_ids}

        if mode == "frozen":
            budget = float(self._config["frozen_timeout_ms"]) / 1000.0
            tasks = {u: self._fire("compute_frozen", u, mode) for u in user_ids}
            results = await self._wait(tasks, t0 + budget)
            out = {}
            for u in user_ids:
                fate, result = results[u]
                if fate == "completed":
                    out[u] = self._item(u, result, "frozen", fate, now())
                elif fate == "skipped" and (result or {}).get("status") == "no_features":
                    out[u] = {"user_id": u, "status": "not_found", "compute": fate}
                else:
                    self._stats["frozen_failures"] += 1
                    status = "unavailable" if (result or {}).get("status") == "no_frozen_snapshot" else "timeout"
                    out[u] = {"user_id": u, "status": status, "compute": fate}
            return out

        if mode == "async":
            # The recompute is scheduled (coalesced, sent after this response); the store answers now.
            fates = {u: self._coalescer.add(u) for u in user_ids}
            for fate in fates.values():
                if fate == "dropped":
                    self._metrics.dropped.inc(tags={"mode": mode})
            rows = await self._read_or_raise(user_ids, "served")
            return {u: self._item(u, rows.get(u), "store", fates[u], now()) for u in user_ids}

        # realtime: the compute call is fired first, the store is read meanwhile.
        tasks = {u: self._fire("compute", u, mode) for u in user_ids}
        rows = await self._read_or_raise(user_ids, "served")
        budget = float(self._config["realtime_budget_ms"]) / 1000.0
        results = await self._wait(tasks, t0 + budget)
        out = {}
        for u in user_ids:
            fate, result = results[u]
            if fate == "completed":
                out[u] = self._item(u, result, "compute", fate, now())
                continue
            self._stats["fallbacks"] += 1
            self._metrics.fallbacks.inc(tags={"reason": fate})
            out[u] = self._item(u, rows.get(u), "store", fate, now())
        return out

    async def _read_or_raise(self, user_ids: list[int], source: str) -> dict[int, dict]:
        try:
            return await self._read(user_ids, source)
        except Exception as exc:
            log.error("online store read failed for %d users: %s", len(user_ids), exc)
            raise StoreUnavailable(f"online store read failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    async def _wait(tasks: dict[int, "asyncio.Task | None"], deadline: float) -> dict[int, tuple[str, dict | None]]:
        """Waits for the compute tasks until ``deadline`` (perf_counter); never cancels them.

        Returns:
            ``{user_id: (fate, result)}``, fate ``completed`` / ``skipped`` / ``failed`` / ``timeout`` /
            ``dropped``.
        """
        pending = {t for t in tasks.values() if t is not None}
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.perf_counter()))
        out: dict[int, tuple[str, dict | None]] = {}
        for u, task in tasks.items():
            if task is None:
                out[u] = ("dropped", None)
            elif not task.done():
                out[u] = ("timeout", None)
            else:
                result = task.result()
                status = (result or {}).get("status")
                if result is None:
                    out[u] = ("failed", None)
                elif status in ("written", "computed"):
                    out[u] = ("completed", result)
                else:
                    out[u] = ("skipped", result)
        return out

    def _item(self, user_id: int, row: dict | None, source: str, compute: str, now: float) -> dict:
        if row is None or row.get("embeddings") is None:
            return {"user_id": user_id, "status": "not_found", "compute": compute}
        written = row.get("written_at_ms")
        return {
            "user_id": user_id,
            "status": "ok",
            "source": source,
            "snapshot_id": row.get("snapshot_id"),
            "written_at_ms": written,
            "age_seconds": _age(written, now),
            "pooled_versions": row.get("pooled_versions"),
            "embeddings": row["embeddings"].astype("float32").tolist(),
            "compute": compute,
        }

    # -- routes --------------------------------------------------------------------------------
    @api.get(
        "/users/{user_id}/embeddings",
        response_model=EmbeddingsResponse,
        responses={
            404: {"model": ErrorResponse, "description": "No stored value for the user (cold or unknown user)."},
            422: {"description": "Malformed user id or mode."},
            503: {"model": ErrorResponse, "description": "Online store unreadable, or frozen compute unavailable."},
        },
        summary="One user's SUM embeddings, answered in the mode in force (or ?mode=)",
    )
    async def get_embeddings(
        self,
        user_id: int = PathParam(..., ge=0, le=MAX_USER_ID, description="User id (non-negative int64)."),
        mode: Mode | None = Query(None, description="Override the deployment's mode for this request."),
    ):
        t0 = time.perf_counter()
        mode = mode or self._config["mode"]
        self._stats["requests"] += 1
        try:
            item = (await self._answer_users([user_id], mode, t0))[user_id]
        except StoreUnavailable as exc:
            self._observe(mode, "user", 503, t0)
            return JSONResponse(status_code=503, content={"detail": str(exc), "user_id": user_id, "mode": mode})
        status = item.pop("status")
        if status != "ok":
            code = 404 if status == "not_found" else 503
            if code == 404:
                self._stats["not_found"] += 1
            detail = {
                "not_found": f"no embeddings for user {user_id}"
                + (" (no features)" if mode == "frozen" else " stored" if mode != "offline" else " from the daily batch"),
                "timeout": f"frozen compute did not answer within {self._config['frozen_timeout_ms']} ms",
                "unavailable": "no frozen snapshot loaded",
            }[status]
            self._observe(mode, "user", code, t0)
            return JSONResponse(
                status_code=code,
                content={"detail": detail, "user_id": user_id, "mode": mode, "compute": item["compute"]},
            )
        self._metrics.age.observe(item["age_seconds"] or 0.0, tags={"mode": mode})
        self._observe(mode, "user", 200, t0)
        return _json({"mode": mode, **item})

    @api.post(
        "/embeddings/batch",
        response_model=BatchResponse,
        responses={
            413: {"model": ErrorResponse, "description": "More users than serving.max_batch_users."},
            422: {"description": "Malformed body (non-integer, negative or out-of-range ids, unknown mode)."},
            503: {"model": ErrorResponse, "description": "Online store unreadable."},
        },
        summary="Many users' SUM embeddings in one call (per-user status)",
    )
    async def get_embeddings_batch(self, body: BatchRequest):
        t0 = time.perf_counter()
        mode = body.mode or self._config["mode"]
        ids = list(dict.fromkeys(body.user_ids))
        limit = int(self._config["max_batch_users"])
        if len(ids) > limit:
            self._observe(mode, "batch", 413, t0)
            return JSONResponse(
                status_code=413,
                content={"detail": f"{len(ids)} distinct user ids; at most {limit} per request", "mode": mode},
            )
        self._stats["requests"] += 1
        try:
            items = await self._answer_users(ids, mode, t0)
        except StoreUnavailable as exc:
            self._observe(mode, "batch", 503, t0)
            return JSONResponse(status_code=503, content={"detail": str(exc), "mode": mode})
        blank = dict.fromkeys(("source", "snapshot_id", "written_at_ms", "age_seconds", "pooled_versions", "embeddings"))
        results = [{**blank, **items[u]} for u in ids]
        for item in results:
            if item["status"] == "ok":
                self._metrics.age.observe(item["age_seconds"] or 0.0, tags={"mode": mode})
        self._observe(mode, "batch", 200, t0)
        found = sum(1 for r in results if r["status"] == "ok")
        return _json({"mode": mode, "count": len(results), "found": found, "results": results})

    async def _compute_version(self) -> tuple[dict | None, str | None]:
        try:
            return await asyncio.wait_for(self._compute.version.remote(), timeout=VERSION_TIMEOUT_S), None
        except Exception as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
            return None, reason

    @api.get(
        "/version",
        response_model=VersionResponse,
        responses={503: {"model": ErrorResponse}},
        summary="Snapshots the compute deployment runs (production and frozen) and the ingress config",
    )
    async def version(self):
        info, reason = await self._compute_version()
        if info is None:
            return JSONResponse(status_code=503, content={"detail": f"compute deployment unavailable: {reason}"})
        return {**info, "ingress": {**self._config, "config_error": self._config_error}}

    @api.get("/healthz", summary="Liveness, the loaded snapshot ids, the mode and counters")
    async def healthz(self):
        info, reason = await self._compute_version()
        compute = {f"compute_{k}": v for k, v in self._launcher.stats.items()}
        return {
            "status": "ok" if info and info.get("snapshot_id") else "degraded",
            "mode": self._config["mode"],
            "snapshot_id": (info or {}).get("snapshot_id"),
            "frozen_snapshot_id": (info or {}).get("frozen_snapshot_id"),
            "compute_error": reason or (info or {}).get("last_error"),
            **self._stats,
            "compute_inflight": self._launcher.inflight,
            **compute,
        }

    @api.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="The SOAP Prometheus metrics (ray_soap_*) exported by this node's Ray metrics agent",
    )
    async def metrics(self):
        import httpx

        from serving.metrics import filter_families

        try:
            url = self._metrics_url or await asyncio.get_running_loop().run_in_executor(None, _local_metrics_url)
            self._metrics_url = url
            async with httpx.AsyncClient(timeout=5.0) as client:
                resp = await client.get(url)
            resp.raise_for_status()
        except Exception as exc:
            self._metrics_url = None
            return PlainTextResponse(f"# Ray metrics endpoint unavailable: {type(exc).__name__}: {exc}\n", status_code=503)
        return PlainTextResponse(filter_families(resp.text), media_type="text/plain; version=0.0.4")


# ---------------------------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------------------------
def app_settings(params: "Params", params_file: str | os.PathLike | None = None) -> dict:
    """Constructor settings shared by both deployments (JSON-serialisable; a change replaces replicas)."""
    from sum_platform.config import params_path

    return {
        "workspace": str(params.workspace),
        "params_path": str(Path(params_file).resolve() if params_file else params_path()),
        "max_inflight_compute": int(params.serving.max_inflight_compute),
        "compute_niceness": int(params.serving.compute_niceness),
        "compute_sched_idle": bool(params.serving.compute_sched_idle),
        "compute_cpus": params.serving.compute_cpus,
        "torch_threads": 1,
    }


def compute_user_config(
    params: "Params",
    snapshot_dir: str | os.PathLike,
    snapshot_id: str,
    params_file: str | os.PathLike | None = None,
    *,
    frozen: tuple[str | os.PathLike, str] | None = None,
    **overrides: Any,
) -> dict:
    """The compute deployment's ``user_config`` for a snapshot.

    Args:
        params: Platform params.
        snapshot_dir: The production snapshot; its fingerprint is included, so a snapshot re-exported
            under the same id is a config change and gets reloaded.
        snapshot_id: Its id.
        params_file: The params file replicas load.
        frozen: ``(dir, id)`` of the snapshot frozen mode uses (default: the production one).
        overrides: ``max_batch_size``, ``batch_wait_ms``, ``debug_delay_ms`` (test/benchmark knob: every
            compute batch sleeps this long first, i.e. a slower model).
    """
    settings = app_settings(params, params_file)
    frozen_dir, frozen_id = frozen if frozen else (snapshot_dir, snapshot_id)
    cfg = {
        "snapshot_dir": str(Path(snapshot_dir).resolve()),
        "fingerprint": snapshot_fingerprint(snapshot_dir),
        "snapshot_id": str(snapshot_id),
        "frozen_snapshot_dir": str(Path(frozen_dir).resolve()),
        "frozen_snapshot_id": str(frozen_id),
        "frozen_fingerprint": snapshot_fingerprint(frozen_dir),
        "workspace": settings["workspace"],
        "params_path": settings["params_path"],
        "max_batch_size": int(params.serving.compute_max_batch_size),
        "batch_wait_ms": float(params.serving.compute_batch_wait_ms),
        "debug_delay_ms": 0.0,
    }
    unknown = set(overrides) - {"max_batch_size", "batch_wait_ms", "debug_delay_ms"}
    if unknown:
        raise ValueError(f"unknown compute options {sorted(unknown)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def _source_digest(*packages: str) -> str:
    digest = hashlib.sha256()
    for pkg in packages:
        for path in sorted((_PROJECT_ROOT / pkg).rglob("*.py")):
            digest.update(str(path.relative_to(_PROJECT_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version(kind: str, settings: dict) -> str:
    """Deployment code version: changes with the code a replica runs or its constructor settings,
    never with ``user_config`` (so a snapshot or mode change is an in-place reconfigure)."""
    packages = ("serving",) if kind == "ingress" else ("serving", "sum_models", "sum_platform")
    digest = hashlib.sha256()
    digest.update(_source_digest(*packages).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return f"{kind}-{digest.hexdigest()[:16]}"


def build_app(
    params: "Params",
    snapshot_dir: str | os.PathLike,
    snapshot_id: str,
    params_file: str | os.PathLike | None = None,
    *,
    frozen: tuple[str | os.PathLike, str] | None = None,
    compute_options: dict | None = None,
    ingress_options: dict | None = None,
) -> "Application":
    """Builds the SOAP application serving ``snapshot_id``.

    Args:
        params: Platform params (workspace, ``serving`` section).
        snapshot_dir: The snapshot directory the compute deployment loads.
        snapshot_id: Its id (must match its manifest).
        params_file: The params file replicas load; defaults to ``SUM_PARAMS`` / the project's file.
        frozen: ``(dir, id)`` of the snapshot frozen mode uses (default: ``snapshot_id``).
        compute_options: Overrides of the compute ``user_config`` (:func:`compute_user_config`).
        ingress_options: Overrides of the ingress ``user_config`` (:func:`ingress_user_config`).

    Returns:
        The bound application (ingress :class:`SoapIngress` -> :class:`ComputeCenter`).
    """
    settings = app_settings(params, params_file)
    user_config = compute_user_config(
        params, snapshot_dir, snapshot_id, params_file, frozen=frozen, **(compute_options or {})
    )
    ingress_config = ingress_user_config(params, **(ingress_options or {}))
    max_inflight = settings["max_inflight_compute"]
    # Per-request access log lines cost the read path CPU at every read; the metrics count requests.
    logging_config = {"enable_access_log": bool(params.serving.access_log)}
    # Pinned code versions go through Deployment.options(version=..., _internal=True): the public
    # `version` option was removed from Ray Serve, and without it every deploy replaces every replica.
    compute = ComputeCenter.options(  # type: ignore[attr-defined]
        user_config=user_config,
        # Room for every in-flight compute call of the ingress plus /version calls.
        max_ongoing_requests=max(max_inflight, int(user_config["max_batch_size"])) + 16,
        logging_config=logging_config,
    ).options(version=code_version("compute", settings), _internal=True)
    ingress = SoapIngress.options(  # type: ignore[attr-defined]
        user_config=ingress_config,
        logging_config=logging_config,
    ).options(version=code_version("ingress", settings), _internal=True)
    return ingress.bind(compute.bind(settings), settings)
