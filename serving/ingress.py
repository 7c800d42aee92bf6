"""The SOAP client (paper §4): the ingress deployment answering reads of users' embeddings over HTTP.

:class:`SoapIngress` answers in one of four modes (``serving.mode``, switchable by ``reconfigure`` or
per request with ``?mode=``):

``async`` (default)
    the stored, average-pooled embeddings from the online store at once; fires the compute call without
    awaiting it (coalesced, at most ``serving.max_inflight_compute`` users in flight; more are dropped
    and counted). The read never waits for inference.
``realtime``
    fires the compute call and waits for its pooled result up to ``serving.realtime_budget_ms`` (the
    read of the store runs meanwhile); past the budget it answers from the store and counts a fallback,
    while the compute still finishes and writes back.
``offline``
    the last daily batch value (``batch_embedding_k``), no compute call: the paper's offline batch.
``frozen``
    the first production snapshot's tower applied to the user's current features, computed on read (no
    pooling, no write: the frozen model never shifts, and its output must not overwrite the production
    value).

The routes' contract lives in :mod:`serving.api`, the fire-and-forget dispatch in :mod:`serving.dispatch`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Awaitable

import ray
from fastapi import Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from serving.api import (
    BatchRequest,
    BatchResponse,
    EmbeddingsResponse,
    ErrorResponse,
    VersionResponse,
    api,
    json_response,
)
from serving.dispatch import ComputeCoalescer, ComputeLauncher
from serving.metrics import IngressMetrics, filter_families
from serving.settings import Mode, ingress_user_config, open_store, validate_ingress_config
from serving.store_io import MAX_USER_ID, EmbeddingReader

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

__all__ = ["SoapIngress", "StoreUnavailable"]

log = logging.getLogger("ray.serve")

#: How long the ingress waits for the compute deployment's snapshot id (``/version``, ``/healthz``).
VERSION_TIMEOUT_S = 5.0
#: Lock wait of a store read on the event loop before it is retried off the loop.
READ_LOCK_TIMEOUT_S = 0.05


class StoreUnavailable(RuntimeError):
    """The online store could not be read."""


def _local_metrics_url() -> str:
    """This node's Ray Prometheus endpoint (the agent listens on the node address, or every address)."""

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://127.0.0.1:{int(node['MetricsExportPort'])}/metrics"
    raise RuntimeError("this node has no metrics export port")


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
        compute: Handle of the :class:`serving.compute.ComputeCenter` deployment.
        settings: :func:`serving.settings.app_settings`.
    """

    def __init__(self, compute: "DeploymentHandle", settings: dict) -> None:
        self._compute = compute
        self._metrics = IngressMetrics()
        self._launcher = ComputeLauncher(int(settings["max_inflight_compute"]), on_outcome=self._count_outcome)
        self._settings = dict(settings)
        self._params, self._store = open_store(settings["workspace"], settings["params_path"])
        self._reader = EmbeddingReader(self._store)
        # A store read takes ~0.1 ms and, in WAL mode, does not wait for writers: it runs on the event
        # loop (a thread hop would cost more than the read). One that finds the database locked
        # (rare: WAL recovery) is retried here, off the loop, with a long lock timeout.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-read")
        self._config: dict = ingress_user_config(self._params)
        self._coalescer = ComputeCoalescer(
            self._launcher,
            self._compute_many,
            window_s=self._config["coalesce_ms"] / 1000.0,
            max_users=self._config["coalesce_max_users"],
        )
        self._config_error: str | None = None
        self._stats = {"requests": 0, "not_found": 0, "fallbacks": 0, "frozen_failures": 0}
        self._metrics_url: str | None = None

    def reconfigure(self, user_config: dict) -> None:
        """Mode and budgets (:func:`serving.settings.ingress_user_config`). An invalid config keeps the previous one and
        is reported on ``/version`` (raising would stop the replica, taking reads down)."""
        try:
            self._config = validate_ingress_config(user_config)
            self._config_error = None
            self._coalescer.window_s = self._config["coalesce_ms"] / 1000.0
            self._coalescer.max_users = self._config["coalesce_max_users"]
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
        return json_response({"mode": mode, **item})

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
        return json_response({"mode": mode, "count": len(results), "found": found, "results": results})

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
