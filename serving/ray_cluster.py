"""Connection to Ray and Ray Serve for the SOAP application.

``params.serving.ray_address`` chooses the cluster:

* ``"auto"`` (default): attach to a running Ray cluster on this machine (the one ``sumctl run`` or a
  ``ray start --head`` started; ``RAY_ADDRESS`` also counts); if none is reachable, start a local
  in-process Ray.
* ``"local"``: always start a local in-process Ray (the tests use this, so they never attach to some
  other Ray on the machine).
* ``"host:port"`` / ``"ray://..."``: attach to that cluster; failing to reach it is an error (a silent
  local fallback would serve from a Ray that dies with this process).

A local in-process Ray lives only as long as the process that started it: the Serve application it
runs stops with it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sum_platform.config import Params, load_params

__all__ = ["ensure_ray", "shutdown", "started_local"]

log = logging.getLogger(__name__)

#: CPUs of a local Ray started here (the project's machines are small and shared).
LOCAL_NUM_CPUS = 2

_state: dict[str, Any] = {"started_local": False}


def started_local() -> bool:
    """Whether this process started the Ray instance it is connected to."""
    return bool(_state["started_local"])


def _init_local(num_cpus: int, worker_niceness: int = 0) -> None:
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        # Ray renices workers to 15 by default; the Serve proxy and the SOAP ingress (the read path) are
        # workers, and the compute threads lower their own priority (serving.compute_sched_idle).
        _system_config={"worker_niceness": int(worker_niceness)},
        include_dashboard=False,
        namespace="sum",
        log_to_driver=os.environ.get("SUM_RAY_LOG_TO_DRIVER", "1") != "0",
    )
    _state["started_local"] = True
    log.info("started a local Ray instance (%d CPUs)", num_cpus)


def _connect_ray(address: str, num_cpus: int, worker_niceness: int = 0) -> None:
    import ray

    if address == "local":
        _init_local(num_cpus, worker_niceness)
        return
    if address == "auto":
        try:
            ray.init(address="auto", namespace="sum")
            _state["started_local"] = False
            log.info("attached to the running Ray cluster")
            return
        except ConnectionError as exc:
            log.info("no running Ray cluster to attach to (%s); starting a local one", exc)
        if ray.is_initialized():  # a half-made connection
            ray.shutdown()
        _init_local(num_cpus, worker_niceness)
        return
    ray.init(address=address, namespace="sum")
    _state["started_local"] = False


def ensure_ray(params: "Params | None" = None, num_cpus: int = LOCAL_NUM_CPUS) -> dict[str, Any]:
    """Makes sure this process is connected to Ray and Ray Serve listens on the configured address.

    Idempotent: when Ray is already initialised in this process it is reused, and when Serve already
    runs on the cluster it is reused (its HTTP options cannot change while it runs).

    Args:
        params: Platform params (``serving.ray_address``, ``serving.host``, ``serving.port``);
            defaults to the params in force.
        num_cpus: CPUs of a local Ray, when one is started.

    Returns:
        ``{"started_local": bool, "http": "host:port"}``.

    Raises:
        RuntimeError: Serve already runs on the cluster with another HTTP host/port.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    params = params or load_params()
    cfg = params.serving
    if not ray.is_initialized():
        _connect_ray(cfg.ray_address, num_cpus, cfg.ray_worker_niceness)
    serve.start(http_options={"host": cfg.host, "port": int(cfg.port)})
    host, port = _serve_http_address()
    if host is not None and port is not None and (str(host), int(port)) != (str(cfg.host), int(cfg.port)):
        raise RuntimeError(
            f"Ray Serve on this cluster already listens on {host}:{port}, params ask for "
            f"{cfg.host}:{cfg.port}; HTTP options cannot change while Serve runs (serve.shutdown() first)"
        )
    return {"started_local": started_local(), "http": f"{cfg.host}:{cfg.port}"}


def _serve_http_address() -> tuple[str | None, int | None]:
    """The host and port the running Serve proxies use (None, None if unknown)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config  # type: ignore[union-attr]
        return http.host, http.port
    except Exception:  # private API: only a sanity check, never fatal
        return None, None


def shutdown(stop_serve: bool | None = None) -> None:
    """Disconnects from Ray; stops Serve first when asked.

    Args:
        stop_serve: Delete every Serve application and stop Serve's actors. Defaults to True only when
            this process started the local Ray (whose Serve stops with it anyway); a shared cluster
            keeps serving unless asked explicitly.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        _state["started_local"] = False
        return
    if stop_serve is None:
        stop_serve = started_local()
    if stop_serve:
        try:
            serve.shutdown()
        except Exception as exc:  # already gone
            log.warning("serve.shutdown failed: %s", exc)
    ray.shutdown()
    _state["started_local"] = False
