"""The SOAP client (paper §4): users' embeddings straight from the online store, recomputes scheduled
without waiting. The one read path of the platform.

The paper's SOAP client lives in the downstream model's server and reads the feature store directly; the
model never waits for inference. :class:`SoapClient` is that client. It answers in one of four modes
(``serving.mode``, or per call):

``async`` (default)
    the stored, average-pooled embeddings at once; the user's recompute is scheduled (coalesced into one
    ``compute_many`` call per ``serving.compute_coalesce_ms`` window, at most ``serving.max_inflight_compute``
    users in flight; more are dropped and counted). The read never waits for inference.
``realtime``
    fires the compute call and waits for its pooled result up to ``serving.realtime_budget_ms`` (the store
    is read meanwhile); past the budget it answers from the store and counts a fallback, while the compute
    still finishes and writes back.
``offline``
    the last daily batch value (``batch_embedding_k``), no compute call.
``frozen``
    the first production snapshot's tower applied to the user's current features, computed on read (no
    pooling, no write).

Two ways to hold one:

* the HTTP service (:mod:`serving.http_app`, run by the :class:`serving.ingress.SoapIngress` replica) answers
  every request through a client on its event loop (:meth:`SoapClient.answer`);
* a downstream model written in Python opens its own (:meth:`SoapClient.connect`) and calls
  :meth:`SoapClient.get` - no network hop for the read; compute calls go to the compute deployment through
  its Ray Serve handle, from a background event loop the client owns.

Example::

    from serving.client import SoapClient

    with SoapClient.connect() as soap:             # the platform's Ray, store and compute deployment
        items = soap.get([17, 42])                 # {17: {"status": "ok", "embeddings": float16 [K, D], ...}, ...}
        fresh = soap.get([17], mode="realtime")
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Awaitable, Sequence

from serving.dispatch import ComputeCoalescer, ComputeLauncher
from serving.metrics import DeferredMetrics, IngressMetrics
from serving.ray_cluster import connect_ray
from serving.settings import MODES, ingress_user_config, validate_ingress_config
from serving.store_io import EmbeddingReader
from sum_platform.config import load_params
from sum_platform.feature_store import get_store

if TYPE_CHECKING:
    from feast import FeatureStore

    from sum_platform.config import Params

__all__ = ["NoMetrics", "SoapClient", "StoreUnavailable", "log_store_failure"]

log = logging.getLogger("ray.serve")

#: Lock wait of a store read on the event loop before it is retried off the loop.
READ_LOCK_TIMEOUT_S = 0.05
#: How long :meth:`SoapClient.compute_version` waits for the compute deployment.
VERSION_TIMEOUT_S = 5.0


class StoreUnavailable(RuntimeError):
    """The online store could not be read: ``str(exc)`` is the detail (the exception's text: store host, file state),
    :attr:`reason` what an HTTP caller may see (the exception's type)."""

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason


class NoMetrics:
    """Stands in for :class:`serving.metrics.IngressMetrics` where no Ray metrics are wanted."""

    class _Sink:
        def inc(self, *args: Any, **kwargs: Any) -> None: ...

        def observe(self, *args: Any, **kwargs: Any) -> None: ...

    def __getattr__(self, name: str) -> "NoMetrics._Sink":
        return NoMetrics._Sink()


#: Why the compute deployment gives no embedding for a user: no stored features, a non-finite feature, or an
#: embedding that overflows fp16 (the user is skipped, the other users of its batch are computed).
SKIP_REASONS = {"no_features": "no features", "nonfinite_features": "a non-finite feature value",
                "nonfinite_embedding": "an embedding overflowing fp16"}


def _over_grpc(compute: Any) -> Any:
    """A Serve handle whose calls go over the replicas' inter-deployment gRPC servers (each Serve replica runs
    one, token-authenticated like Ray's own ports; Serve's throughput-optimised mode uses them) instead of Ray
    actor calls: ~1.3 vs ~2.5 ms for a no-op call between two replicas on the 2-core machine. Results come back by
    value, which is all the compute calls return."""
    from ray.serve.handle import DeploymentHandle

    return compute.options(_by_reference=False) if isinstance(compute, DeploymentHandle) else compute


def _source(mode: str) -> str:
    return "batch" if mode == "offline" else "served"


def _age(written_at_ms: int | None, now: float) -> float | None:
    return None if written_at_ms is None else max(0.0, now - written_at_ms / 1000.0)


class _ThrottledError:
    """An error logged at most once per ``every_s`` with the count of the ones left out: a damaged store fails every
    read, hundreds a second, and the replica's log should say so, not drown in it. Given request ids, the line
    names the first and the last left out (generated ids count up, so the range holds every one in between)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self.last, self.left_out = every_s, float("-inf"), 0
        self.left_out_ids: tuple[str, str] | None = None  # (first, last)

    def log(self, msg: str, *args: Any, request_id: str | None = None) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.left_out += 1
            if request_id is not None:
                self.left_out_ids = ((self.left_out_ids or (request_id,))[0], request_id)
            return
        if self.left_out:
            ids = f", request ids {self.left_out_ids[0]} .. {self.left_out_ids[1]}" if self.left_out_ids else ""
            msg += f" (and {self.left_out} more in the last {now - self.last:.0f} s{ids})"
        log.error(msg, *args)
        self.last, self.left_out, self.left_out_ids = now, 0, None


_STORE_ERRORS = _ThrottledError()


def log_store_failure(exc: StoreUnavailable, request_id: str) -> None:
    """A failed store read in the replica's log with the request id its caller was given (throttled)."""
    _STORE_ERRORS.log("request %s: %s", request_id, exc, request_id=request_id)


class SoapClient:
    """Reads users' SUM embeddings in a mode and schedules their recompute (see the module docstring).

    Args:
        store: The open feature store (definitions applied).
        compute: The compute deployment's handle (``serve.get_deployment_handle("ComputeCenter", app)``), or any
            object whose ``compute_many`` / ``compute`` / ``compute_frozen`` / ``version`` have a ``remote``
            returning an awaitable.
        config: The ingress configuration (:func:`serving.settings.ingress_user_config`).
        max_inflight: Users in compute calls in flight before new ones are dropped (``serving.max_inflight_compute``).
        metrics: :class:`serving.metrics.IngressMetrics` (None: counters only, in :attr:`stats`).
    """

    def __init__(
        self, store: "FeatureStore", compute: Any, config: dict, *, max_inflight: int, metrics: Any = None
    ) -> None:
        self.config = validate_ingress_config(config)
        self.config_error: str | None = None
        self.store = store
        self._reader = EmbeddingReader(store)
        self._compute = compute
        # Calls somebody waits for (realtime, frozen) take the shorter hop; the fire-and-forget compute_many calls
        # stay Ray actor calls, submitted by Ray's C++ core worker rather than by gRPC on this client's loop.
        self._compute_waited = _over_grpc(compute)
        self._metrics = metrics if metrics is not None else NoMetrics()
        self.launcher = ComputeLauncher(int(max_inflight), on_outcome=self._count_outcome)
        self.coalescer = ComputeCoalescer(
            self.launcher,
            self._compute_many,
            window_s=self.config["coalesce_ms"] / 1000.0,
            max_users=self.config["coalesce_max_users"],
        )
        #: Reads answered, users not found, realtime fallbacks, frozen failures.
        self.stats = {"requests": 0, "not_found": 0, "fallbacks": 0, "frozen_failures": 0}
        # A store read takes ~0.05 ms and, in WAL mode, does not wait for writers: it runs on the caller's
        # thread (a thread hop would cost more than the read). On the event loop, one that finds the database
        # locked (rare: WAL recovery) is retried on this executor's thread with a long lock timeout.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-read")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    # -- construction for a downstream process --------------------------------------------------
    @classmethod
    def connect(
        cls,
        params: "Params | None" = None,
        *,
        mode: str | None = None,
        metrics: bool = True,
        **overrides: Any,
    ) -> "SoapClient":
        """A client in this process for the platform's SOAP application.

        Connects to the platform's Ray (``serving.ray_address``: the stack's head by default), takes the compute
        deployment's handle, opens the workspace's online store and starts the client's event loop thread.

        Args:
            params: Platform params (default: the params in force).
            mode: Default mode of :meth:`get` (default ``serving.mode``).
            metrics: Record the ``ray_soap_*`` read metrics from this process too.
            overrides: Other ingress settings (``realtime_budget_ms``, ``coalesce_ms``, ...).
        """
        from ray import serve

        params = params or load_params()
        connect_ray(params)
        handle = serve.get_deployment_handle("ComputeCenter", app_name=params.serving.app_name)
        sink = DeferredMetrics(IngressMetrics()) if metrics else None
        client = cls(
            get_store(params),
            handle,
            ingress_user_config(params, mode=mode, **overrides),
            max_inflight=int(params.serving.max_inflight_compute),
            metrics=sink,
        )
        loop = client.start_loop()
        if sink is not None:
            sink.start(loop)
        return client

    def start_loop(self) -> asyncio.AbstractEventLoop:
        """Starts the event loop thread compute calls run on (for :meth:`get`; the HTTP service uses its own)."""
        if self._loop is not None:
            return self._loop
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop_thread = threading.Thread(target=run, name="soap-client-loop", daemon=True)
        self._loop_thread.start()
        ready.wait()
        self.bind_loop(loop)
        return loop

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Makes ``loop`` the one compute calls are launched on (the HTTP service binds its server's loop)."""
        self._loop = loop
        self.coalescer.loop = loop

    def close(self) -> None:
        """Stops the client's own loop thread; compute calls still in flight are cancelled (their write-backs may
        still land: the compute deployment does not hear of the cancellation)."""
        loop, self._loop = self._loop, None
        if loop is not None and self._loop_thread is not None:

            async def cancel_inflight() -> None:
                tasks = self.launcher.cancel_all()
                if tasks:
                    await asyncio.wait(tasks, timeout=5)

            try:
                asyncio.run_coroutine_threadsafe(cancel_inflight(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                self._loop_thread.join(timeout=5)
                self._loop_thread = None
        self._executor.shutdown(wait=False)

    def __enter__(self) -> "SoapClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- configuration --------------------------------------------------------------------------
    def reopen_store_if_replaced(self, open_store: Any) -> bool:
        """Reopens the online store when its file was replaced (``sumctl rebuild-online``); ``open_store()`` gives
        the new store. Returns whether it did. Called from the serving replica's health check."""
        if not self._reader.replaced():
            return False
        self.use_store(open_store())
        log.warning("online store file replaced: reopened %s", self._reader.path)
        return True

    def use_store(self, store: "FeatureStore") -> None:
        """Reads from ``store`` from now on (a reopened file, or another workspace's store)."""
        self.store = store
        self._reader = EmbeddingReader(store)

    def reconfigure(self, config: dict) -> None:
        """Mode, budgets and coalescing (:func:`serving.settings.ingress_user_config`).

        Raises:
            ValueError: An invalid config (the previous one stays in force, and :attr:`config_error` says why).
        """
        try:
            cfg = validate_ingress_config(config)
        except ValueError as exc:
            self.config_error = str(exc)
            raise
        self.config, self.config_error = cfg, None
        self.coalescer.window_s = cfg["coalesce_ms"] / 1000.0
        self.coalescer.max_users = cfg["coalesce_max_users"]

    # -- the sync API ---------------------------------------------------------------------------
    def get(self, user_ids: Sequence[int] | int, mode: str | None = None) -> dict[int, dict]:
        """Users' embeddings in ``mode`` (default: the configured one), from any thread.

        Returns:
            ``{user_id: item}``: ``status`` ``ok`` / ``not_found`` / ``timeout`` / ``unavailable``; ``compute``,
            the fate of the user's compute call (``scheduled`` / ``dropped`` in async mode; ``completed`` /
            ``timeout`` / ``dropped`` / ``failed`` / ``skipped`` in realtime and frozen; ``not_requested``
            offline); when ok, ``embeddings`` (float16 ``[K, D]``), ``source``, ``snapshot_id``,
            ``written_at_ms``, ``age_seconds``, ``pooled_versions``.

        Raises:
            StoreUnavailable: The online store could not be read.
            ValueError: An unknown mode.
        """
        ids = [int(user_ids)] if isinstance(user_ids, int) else [int(u) for u in user_ids]
        mode = self._mode(mode)
        t0 = time.perf_counter()
        if mode in ("async", "offline"):
            # No compute answer to wait for: the read runs on this thread, the recompute is handed to the loop.
            if mode == "async" and self._loop is None:
                raise RuntimeError("the client has no event loop for compute calls: SoapClient.connect() or start_loop()")
            unique = list(dict.fromkeys(ids))
            items = self._stored_items(unique, mode, self._read_blocking(unique, _source(mode)))
        else:
            if self._loop is None:
                raise RuntimeError("the client has no event loop for compute calls: SoapClient.connect() or start_loop()")
            fut = asyncio.run_coroutine_threadsafe(self.answer(ids, mode, t0), self._loop)
            items = fut.result()
        self.account(items, mode)
        return items

    # -- the async API (on the loop compute calls run on) ---------------------------------------
    async def answer(self, user_ids: Sequence[int], mode: str | None = None, t0: float | None = None) -> dict[int, dict]:
        """Like :meth:`get`, on the client's event loop (the HTTP service's); counting the read (:meth:`account`) is
        left to the caller.

        Raises:
            StoreUnavailable: The online store read failed (async, realtime, offline).
        """
        mode = self._mode(mode)
        t0 = time.perf_counter() if t0 is None else t0
        ids = list(dict.fromkeys(int(u) for u in user_ids))
        if mode in ("async", "offline"):
            return self._stored_items(ids, mode, await self._read_on_loop(ids, _source(mode)))
        if mode == "frozen":
            return await self._answer_frozen(ids, t0)
        return await self._answer_realtime(ids, t0)

    def _mode(self, mode: str | None) -> str:
        mode = mode or self.config["mode"]
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return mode

    def account(self, items: dict[int, dict], mode: str) -> None:
        """Counts one answered read (and its users not found) and observes the ages answered."""
        self.stats["requests"] += 1
        self.stats["not_found"] += sum(1 for i in items.values() if i["status"] == "not_found")
        for item in items.values():
            if item["status"] == "ok":
                self._metrics.age.observe(item["age_seconds"] or 0.0, tags={"mode": mode})

    def _schedule(self, ids: list[int], mode: str) -> dict[int, str]:
        fates = {u: self.coalescer.add(u) for u in ids}
        dropped = sum(1 for f in fates.values() if f == "dropped")
        if dropped:
            self._metrics.dropped.inc(dropped, tags={"mode": mode})
        return fates

    def _stored_items(self, ids: list[int], mode: str, rows: dict[int, dict]) -> dict[int, dict]:
        """Async and offline answers from the rows read; async schedules the users' recompute."""
        now = time.time()
        if mode == "offline":
            return {u: self._item(u, rows.get(u), "batch", "not_requested", now) for u in ids}
        fates = self._schedule(ids, mode)
        return {u: self._item(u, rows.get(u), "store", fates[u], now) for u in ids}

    async def _answer_frozen(self, ids: list[int], t0: float) -> dict[int, dict]:
        budget = float(self.config["frozen_timeout_ms"]) / 1000.0
        tasks = {u: self._fire("compute_frozen", u, "frozen") for u in ids}
        results = await self._wait(tasks, t0 + budget)
        out = {}
        now = time.time()
        for u in ids:
            fate, result = results[u]
            if fate == "completed":
                out[u] = self._item(u, result, "frozen", fate, now)
            elif fate == "skipped" and (reason := (result or {}).get("status")) in SKIP_REASONS:
                out[u] = {"user_id": u, "status": "not_found", "compute": fate, "reason": reason}
            else:
                self.stats["frozen_failures"] += 1
                status = "unavailable" if (result or {}).get("status") == "no_frozen_snapshot" else "timeout"
                out[u] = {"user_id": u, "status": status, "compute": fate}
        return out

    async def _answer_realtime(self, ids: list[int], t0: float) -> dict[int, dict]:
        # The compute call is fired first, the store is read meanwhile.
        tasks = {u: self._fire("compute", u, "realtime") for u in ids}
        rows = await self._read_on_loop(ids, "served")
        budget = float(self.config["realtime_budget_ms"]) / 1000.0
        results = await self._wait(tasks, t0 + budget)
        out = {}
        now = time.time()
        for u in ids:
            fate, result = results[u]
            if fate == "completed":
                out[u] = self._item(u, result, "compute", fate, now)
                continue
            self.stats["fallbacks"] += 1
            self._metrics.fallbacks.inc(tags={"reason": fate})
            out[u] = self._item(u, rows.get(u), "store", fate, now)
        return out

    # -- store reads ----------------------------------------------------------------------------
    async def _read_on_loop(self, ids: list[int], source: str) -> dict[int, dict]:
        """The read on the event loop with a short lock wait; a locked file is read again off the loop."""
        try:
            return self._read_raise_locked(ids, source)
        except _Locked:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._read_blocking, ids, source)

    def _read_raise_locked(self, ids: list[int], source: str) -> dict[int, dict]:
        """The read with a short lock wait (on the event loop); :class:`_Locked` when the file is locked."""
        try:
            return self._reader.embeddings(ids, source, READ_LOCK_TIMEOUT_S)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise _Locked() from exc
            raise self._unavailable(ids, exc) from exc
        except Exception as exc:
            raise self._unavailable(ids, exc) from exc

    def _read_blocking(self, ids: list[int], source: str) -> dict[int, dict]:
        try:
            return self._reader.embeddings(ids, source)
        except Exception as exc:
            raise self._unavailable(ids, exc) from exc

    @staticmethod
    def _unavailable(ids: list[int], exc: BaseException) -> StoreUnavailable:
        """The failure as the caller gets it; who answers it logs it (the HTTP layer with the request id,
        :func:`log_store_failure`)."""
        return StoreUnavailable(f"online store read failed for {len(ids)} users: {type(exc).__name__}: {exc}",
                                f"online store read failed ({type(exc).__name__})")

    # -- compute calls --------------------------------------------------------------------------
    def _count_outcome(self, outcome: str, users: int) -> None:
        self._metrics.compute_calls.inc(users, tags={"outcome": outcome})

    def _compute_many(self, user_ids: list[int]) -> Awaitable[Any]:
        return self._compute.compute_many.remote(user_ids)

    def _fire(self, method: str, user_id: int, mode: str) -> "asyncio.Task | None":
        fn = getattr(self._compute_waited, method)
        task = self.launcher.fire(lambda: fn.remote(user_id))
        if task is None:
            self._metrics.dropped.inc(tags={"mode": mode})
        return task

    @staticmethod
    async def _wait(tasks: dict[int, "asyncio.Task | None"], deadline: float) -> dict[int, tuple[str, dict | None]]:
        """Waits for the compute tasks until ``deadline`` (perf_counter); never cancels them.

        Returns:
            ``{user_id: (fate, result)}``, fate ``completed`` / ``skipped`` / ``failed`` / ``timeout`` / ``dropped``.
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

    async def compute_version(self) -> tuple[dict | None, str | None, str | None]:
        """``(ComputeCenter.version(), None, None)``, or ``(None, reason, detail)`` when it does not answer in time
        (the reason is the exception's type, the detail its text: for the log)."""
        try:
            return await asyncio.wait_for(self._compute.version.remote(), timeout=VERSION_TIMEOUT_S), None, None
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError):
                return None, f"no answer within {VERSION_TIMEOUT_S:.0f} s", None
            return None, type(exc).__name__, f"{type(exc).__name__}: {exc}"

    def health(self) -> dict:
        """Counters of the read path and its compute calls."""
        return {
            **self.stats,
            "compute_inflight": self.launcher.inflight,
            **{f"compute_{k}": v for k, v in self.launcher.stats.items()},
        }

    @staticmethod
    def _item(user_id: int, row: dict | None, source: str, compute: str, now: float) -> dict:
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
            "embeddings": row["embeddings"],
            "compute": compute,
        }


class _Locked(Exception):
    """The SQLite file was locked past the event loop's short wait."""
