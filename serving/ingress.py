"""The SOAP ingress deployment (paper §4): the HTTP read path, served from its own replica with no proxy hop.

:class:`SoapIngress` is a Ray Serve deployment that holds a :class:`serving.client.SoapClient` (the one read
path: modes, store reads, coalesced fire-and-forget compute calls) and serves the SOAP API
(:func:`serving.http_app.build_http_app`) on ``serving.host:serving.port`` with uvicorn on the replica's event
loop (:class:`serving.http_server.HttpServer`). Ray Serve still runs the deployment - placement, health checks,
restarts, ``user_config`` reconfigures and surge replacement - but no request crosses its HTTP proxy (Serve
starts none: ``proxy_location="Disabled"``, see :func:`serving.ray_cluster.ensure_ray`). Measured on two cores
(``benchmarks/serving_bench.py``): Serve's proxy cost ~6 ms a read at c=1 and capped at ~220 reads/s; the
replica's own server answers in a fraction of that.

Modes are described in :mod:`serving.client`; the routes' contract in :mod:`serving.api`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ray import serve

from serving.client import SoapClient, StoreUnavailable
from serving.http_app import FastUserReads, build_http_app
from serving.http_guard import RequestGuard
from serving.http_server import HttpServer
from serving.metrics import DeferredMetrics, IngressMetrics
from serving.settings import check_access, ingress_user_config, load_token, open_store

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from sum_platform.config import Params

__all__ = ["SoapIngress", "StoreUnavailable"]

log = logging.getLogger("ray.serve")

#: Seconds a replaced replica keeps answering its open connections (with ``Connection: close``).
DRAIN_GRACE_S = 2.0


@serve.deployment(
    name="SoapIngress",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.1},
    health_check_period_s=5.0,
    graceful_shutdown_timeout_s=DRAIN_GRACE_S + 10.0,
    # A code/settings change replaces the replica: the new one listens on the port (SO_REUSEPORT) before the
    # old one drains, so reads never stop.
    max_surge_percent=100,
)
class SoapIngress:
    """The SOAP read path: an HTTP server in this replica answering through a :class:`SoapClient`.

    Args:
        compute: Handle of the :class:`serving.compute.ComputeCenter` deployment.
        settings: :func:`serving.settings.app_settings` (with ``host`` and ``port``); the store comes with the
            ``user_config`` (:meth:`reconfigure`).
    """

    async def __init__(self, compute: "DeploymentHandle", settings: dict) -> None:
        self._settings = dict(settings)
        # Never beyond loopback without a token (the driver checks too: serving.settings.app_settings).
        check_access(settings["host"], settings.get("token_file"))
        self._token = load_token(settings["token_file"]) if settings.get("token_file") else None
        self._compute = compute
        # Recorded once a second off the response path (a Ray metric record is ~10 us of the loop, three a read).
        self._metrics = DeferredMetrics(IngressMetrics())
        self._metrics.start(asyncio.get_running_loop())
        # The store comes with the user_config (serving.settings.store_location), which Serve applies right after
        # this constructor, before the replica counts as started: the first reconfigure opens it and starts the
        # HTTP server (not earlier: a surge replica must not answer before it has a store).
        self.client: SoapClient | None = None
        self._server: HttpServer | None = None
        self._store_key: tuple[str, str] | None = None

    async def _start(self, params: "Params", store: Any) -> None:
        """Builds the read path on ``store`` and starts listening (the first reconfigure)."""
        settings = self._settings
        client = SoapClient(store, self._compute, ingress_user_config(params),
                            max_inflight=int(settings["max_inflight_compute"]), metrics=self._metrics)
        client.bind_loop(asyncio.get_running_loop())
        app = FastUserReads(build_http_app(client, metrics=self._metrics))
        prefix = str(settings.get("route_prefix") or "/").rstrip("/")
        if prefix:  # serving.route_prefix: the API under a path
            from starlette.applications import Starlette
            from starlette.routing import Mount

            app = Starlette(routes=[Mount(prefix, app=app)])
        app = RequestGuard(app, max_request_bytes=int(settings["max_request_bytes"]), token=self._token,
                           open_paths=(f"{prefix}/healthz",))
        self.client = client
        self._server = HttpServer(app, settings["host"], int(settings["port"]))
        await self._server.start()

    async def reconfigure(self, user_config: dict) -> None:
        """The store to read (``workspace``, ``params_path``: :func:`serving.settings.store_location`), then mode and
        budgets (:func:`serving.settings.ingress_user_config`).

        Another store is opened off the event loop and swapped in once open. An invalid config, or a store that does
        not open while one is in use, keeps the previous one and is reported on ``/version`` (``config_error``;
        raising would stop the replica, taking reads down); the compute deployment opens the same store and fails
        the rollout. Without a store yet (starting up) a failure raises: Serve marks the deploy failed.

        Raises:
            ValueError: The ``user_config`` names no store.
        """
        cfg = dict(user_config or {})
        store_key = (str(cfg.pop("workspace", "") or ""), str(cfg.pop("params_path", "") or ""))
        if not all(store_key):
            raise ValueError(f"ingress user_config lacks workspace/params_path; got {sorted(user_config or {})}")
        store_error = None
        if store_key != self._store_key:
            try:
                params, store = await asyncio.get_running_loop().run_in_executor(None, open_store, *store_key)
            except Exception as exc:
                if self.client is None:
                    raise
                log.error("opening the online store of %s failed: %s: %s; reads stay on %s", store_key[0],
                          type(exc).__name__, exc, self._store_key and self._store_key[0])
                store_error = f"opening the requested workspace's online store failed ({type(exc).__name__})"
            else:
                if self.client is None:
                    await self._start(params, store)
                else:
                    self.client.use_store(store)
                    log.info("reads now from the online store of %s", store_key[0])
                self._store_key = store_key
        assert self.client is not None
        try:
            self.client.reconfigure(cfg)
        except ValueError as exc:
            log.error("ingress user_config rejected (%s); keeping %s", exc, self.client.config)
        if store_error:
            self.client.config_error = store_error

    def check_health(self) -> None:
        """Ray Serve's health check: unhealthy when the HTTP server stopped (Serve then replaces the replica). A
        replaced online store file (a rebuild) is reopened here."""
        if self.client is None or self._server is None or self._store_key is None:
            raise RuntimeError("SOAP ingress not configured yet (no store, no HTTP server)")
        store_key = self._store_key
        try:
            self.client.reopen_store_if_replaced(lambda: open_store(*store_key)[1])
        except Exception as exc:  # reads answer 503 with the reason meanwhile; the server itself is fine
            log.warning("could not check or reopen the online store: %s", exc)
        failure = self._server.failure()
        if failure:
            raise RuntimeError(f"SOAP HTTP server on {self._server.host}:{self._server.port} {failure}")

    async def __del__(self) -> None:
        # Serve calls this before the replica stops (a replacement, a scale-down, serve.delete).
        if self._server is not None:
            await self._server.drain(DRAIN_GRACE_S)
        self._metrics.flush()
