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
from typing import TYPE_CHECKING

from ray import serve

from serving.client import SoapClient, StoreUnavailable
from serving.http_app import FastUserReads, build_http_app
from serving.http_guard import RequestGuard
from serving.http_server import HttpServer
from serving.metrics import DeferredMetrics, IngressMetrics
from serving.settings import check_access, ingress_user_config, load_token, open_store

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

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
        settings: :func:`serving.settings.app_settings` (with ``host`` and ``port``).
    """

    async def __init__(self, compute: "DeploymentHandle", settings: dict) -> None:
        self._settings = dict(settings)
        # Never beyond loopback without a token (the driver checks too: serving.settings.app_settings).
        check_access(settings["host"], settings.get("token_file"))
        token = load_token(settings["token_file"]) if settings.get("token_file") else None
        params, store = open_store(settings["workspace"], settings["params_path"])
        # Recorded once a second off the response path (a Ray metric record is ~10 us of the loop, three a read).
        self._metrics = DeferredMetrics(IngressMetrics())
        self._metrics.start(asyncio.get_running_loop())
        self.client = SoapClient(store, compute, ingress_user_config(params),
                                 max_inflight=int(settings["max_inflight_compute"]), metrics=self._metrics)
        self.client.bind_loop(asyncio.get_running_loop())
        app = FastUserReads(build_http_app(self.client, metrics=self._metrics))
        prefix = str(settings.get("route_prefix") or "/").rstrip("/")
        if prefix:  # serving.route_prefix: the API under a path
            from starlette.applications import Starlette
            from starlette.routing import Mount

            app = Starlette(routes=[Mount(prefix, app=app)])
        app = RequestGuard(app, max_request_bytes=int(settings["max_request_bytes"]), token=token,
                           open_paths=(f"{prefix}/healthz",))
        self._server = HttpServer(app, settings["host"], int(settings["port"]))
        await self._server.start()

    def reconfigure(self, user_config: dict) -> None:
        """Mode and budgets (:func:`serving.settings.ingress_user_config`). An invalid config keeps the previous one and
        is reported on ``/version`` (raising would stop the replica, taking reads down)."""
        try:
            self.client.reconfigure(user_config)
        except ValueError as exc:
            log.error("ingress user_config rejected (%s); keeping %s", exc, self.client.config)

    def check_health(self) -> None:
        """Ray Serve's health check: unhealthy when the HTTP server stopped (Serve then replaces the replica). A
        replaced online store file (a rebuild) is reopened here."""
        try:
            self.client.reopen_store_if_replaced(
                lambda: open_store(self._settings["workspace"], self._settings["params_path"])[1])
        except Exception as exc:  # reads answer 503 with the reason meanwhile; the server itself is fine
            log.warning("could not check or reopen the online store: %s", exc)
        failure = self._server.failure()
        if failure:
            raise RuntimeError(f"SOAP HTTP server on {self._server.host}:{self._server.port} {failure}")

    async def __del__(self) -> None:
        # Serve calls this before the replica stops (a replacement, a scale-down, serve.delete).
        await self._server.drain(DRAIN_GRACE_S)
        self._metrics.flush()
