"""Connection to Ray and Ray Serve for the SOAP application.

``params.serving.ray_address`` chooses the cluster:

* ``"stack"`` (default): attach to the long-lived Ray head of the workspace's deployed stack, whose
  address and token file ``sumctl up`` records in ``<workspace>/stack/ray.json``. No record, or a head that
  does not answer, is an error naming ``sumctl up``: never an in-process Ray that dies with the task.
* ``"local"``: start a local in-process Ray (the tests and ``sumctl run --inline`` use this). It lives
  only as long as the process that started it, and the Serve application it runs stops with it.
* ``"host:port"`` / ``"ray://..."``: attach to that cluster; failing to reach it is an error.

``SUM_RAY_ADDRESS`` overrides the params (the stack sets it to ``stack`` for its components and tasks).

The stack's Ray runs with token authentication (``RAY_AUTH_MODE=token``): a process attaching to it
authenticates with the token file of the record (``RAY_AUTH_TOKEN_PATH``). Its nodes run with the node IP
127.0.0.1, so every server of theirs listens on loopback only (:func:`keep_loopback`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from sum_platform.config import Params, load_params
from sum_platform.files import read_json, write_json
from sum_platform.workspace import Workspace

__all__ = ["ClusterRecord", "NoClusterError", "cluster_record", "connect_ray", "ensure_ray", "is_loopback",
           "keep_loopback", "record_cluster", "shutdown", "started_local", "token_env"]

log = logging.getLogger(__name__)

#: CPUs of a local Ray started here (the project's machines are small and shared).
LOCAL_NUM_CPUS = 2

_state: dict[str, Any] = {"started_local": False}


class NoClusterError(RuntimeError):
    """The workspace's stack has no reachable Ray cluster."""


class ClusterRecord(dict):
    """``{"address": "host:port", "token_path": str, "dashboard": "http://host:port"}`` of a stack's Ray."""

    @property
    def address(self) -> str:
        return str(self["address"])

    @property
    def token_path(self) -> Path:
        return Path(self["token_path"])


def _record_path(ws: Workspace) -> Path:
    return ws.stack_dir / "ray.json"


def record_cluster(ws: Workspace, address: str, token_path: Path, dashboard: str) -> None:
    """Records the stack's Ray head for every later process (tasks, ``sumctl``)."""
    write_json(_record_path(ws), {"address": address, "token_path": str(token_path), "dashboard": dashboard})
    _record_path(ws).chmod(0o600)


def forget_cluster(ws: Workspace) -> None:
    _record_path(ws).unlink(missing_ok=True)


def cluster_record(ws: Workspace) -> ClusterRecord | None:
    """The stack's Ray head as ``sumctl up`` recorded it, or None."""
    path = _record_path(ws)
    return ClusterRecord(read_json(path)) if path.exists() else None


def token_env(token_path: Path) -> dict[str, str]:
    """The environment a process needs to authenticate with a token-protected Ray."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def keep_loopback() -> None:
    """Makes this process's Ray take a loopback address (``ray start --node-ip-address``, ``--address``,
    ``ray.init(address=...)``) as given.

    Ray 2.60 replaces a loopback host by the machine's network address before using it
    (``ray._private.services.resolve_ip_for_localhost``, "so that other nodes can reach it"): a node started with
    ``--node-ip-address=127.0.0.1`` gets the host's address, and its GCS, raylet, agents, Ray Client server and
    Prometheus exporters bind that address or every interface. No flag or variable turns that off on Linux, so the
    stack's nodes (:mod:`serving.ray_node`) and every process attaching to them (:func:`_attach`) call this first:
    the node IP is then 127.0.0.1 and every server of the node listens on loopback only. Other hosts are resolved as
    Ray does. Idempotent.
    """
    from ray._private import services

    resolve = services.resolve_ip_for_localhost
    if getattr(resolve, "keeps_loopback", False):
        return

    def keeping_loopback(host: str) -> str:
        if host == "localhost":
            return "127.0.0.1"
        return host if is_loopback(host) else resolve(host)

    keeping_loopback.keeps_loopback = True  # type: ignore[attr-defined]
    services.resolve_ip_for_localhost = keeping_loopback


def started_local() -> bool:
    """Whether this process started the Ray instance it is connected to."""
    return bool(_state["started_local"])


def _init_local(num_cpus: int, worker_niceness: int = 0) -> None:
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        # Ray renices workers to 15 by default; the SOAP ingress (the read path, with its HTTP server) is a
        # worker, and the compute threads lower their own priority (serving.compute_sched_idle).
        _system_config={"worker_niceness": int(worker_niceness)},
        include_dashboard=False,
        namespace="sum",
        log_to_driver=os.environ.get("SUM_RAY_LOG_TO_DRIVER", "1") != "0",
    )
    _state["started_local"] = True
    log.info("started a local Ray instance (%d CPUs)", num_cpus)


def _attach(address: str) -> None:
    import ray

    keep_loopback()  # the stack's head listens on 127.0.0.1 only: Ray must not swap that for the host's address
    # configure_logging=False: Ray's driver records go to this process's logging setup (a file for sumctl, the
    # task log for a task), not straight to the terminal.
    ray.init(address=address, namespace="sum", log_to_driver=False, configure_logging=False)
    _state["started_local"] = False
    log.info("attached to the Ray cluster at %s", address)


def _refresh_ray_config() -> None:
    """Makes an already imported Ray see the token environment (Ray reads RAY_AUTH_MODE once, at import;
    its own ``ray start`` path refreshes it the same way)."""
    import sys

    if "ray" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def _attach_stack(ws: Workspace) -> None:
    import socket

    record = cluster_record(ws)
    hint = f"start the deployed stack with `sumctl up` (workspace {ws.root})"
    if record is None:
        raise NoClusterError(f"no Ray cluster recorded in {_record_path(ws)}: {hint}")
    host, _, port = record.address.rpartition(":")
    try:  # fail in a second, not after ray.init's long connection retries
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        raise NoClusterError(f"the stack's Ray head at {record.address} does not answer ({exc}): {hint}") from exc
    os.environ.update(token_env(record.token_path))
    _refresh_ray_config()
    _attach(record.address)


def _connect_ray(params: Params, num_cpus: int) -> None:
    # The stack's components set SUM_RAY_ADDRESS=stack: their tasks attach to the stack's head whatever
    # the params file says (a test's params ask for a local Ray).
    address = os.environ.get("SUM_RAY_ADDRESS") or params.serving.ray_address
    if address == "local":
        _init_local(num_cpus, params.serving.ray_worker_niceness)
    elif address == "stack":
        _attach_stack(Workspace(params.workspace))
    else:
        _attach(address)


def connect_ray(params: "Params | None" = None, num_cpus: int = LOCAL_NUM_CPUS) -> None:
    """Connects this process to the configured Ray cluster (a no-op when already connected); no Serve.

    Raises:
        NoClusterError: ``ray_address`` is ``stack`` and the workspace's stack has no reachable Ray.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        _connect_ray(params or load_params(), num_cpus)


def ensure_ray(params: "Params | None" = None, num_cpus: int = LOCAL_NUM_CPUS) -> dict[str, Any]:
    """Makes sure this process is connected to Ray and Ray Serve runs on it (with no HTTP proxy: the SOAP
    ingress replica listens on ``serving.host:serving.port`` itself).

    Idempotent: when Ray is already initialised in this process it is reused, and when Serve already
    runs on the cluster it is reused.

    Args:
        params: Platform params (``serving.ray_address``, ``serving.host``, ``serving.port``);
            defaults to the params in force.
        num_cpus: CPUs of a local Ray, when one is started.

    Returns:
        ``{"started_local": bool, "http": "host:port"}``.

    Raises:
        NoClusterError: ``ray_address`` is ``stack`` and the workspace's stack has no reachable Ray.
    """
    from ray import serve

    params = params or load_params()
    cfg = params.serving
    connect_ray(params, num_cpus)
    # No Serve HTTP proxy: the SOAP ingress replica is the HTTP server (serving.http_server), one hop less
    # (Serve's proxy cost ~6 ms a read and capped at ~220 reads/s on two cores).
    serve.start(proxy_location="Disabled")
    return {"started_local": started_local(), "http": f"{cfg.host}:{cfg.port}"}


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
