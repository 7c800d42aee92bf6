"""Rollout of a production snapshot to the SOAP application (called by the daily DAG).

``deploy`` starts the application on first use; afterwards a deploy changes only the compute
deployment's ``user_config`` (same pinned code version), so Ray Serve calls ``reconfigure`` on the running
replica: reads never stop, and the compute keeps its old tower until the new one has loaded.

``rollout`` = (preflight load) + deploy + verify through ``GET /version`` (snapshot id *and* content
fingerprint); on a failure (load error, timeout) it redeploys the previous snapshot, verifies it, and raises
:class:`RolloutError` saying what failed and what is served now.

Failure modes:

* the snapshot does not load here (preflight): nothing is deployed, serving is untouched;
* it does not load in the running compute replica: the replica keeps its tower and reports the error on
  ``/version``; the rollback is an in-place reconfigure back to the previous snapshot (no outage);
* it does not load in a fresh replica (first start, or a code change): Ray Serve marks the deploy
  DEPLOY_FAILED (with surge, the old replica keeps running); the rollback redeploys the previous snapshot.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sum_platform.config import Params

__all__ = ["RolloutError", "deploy", "rollout", "served_snapshot_id", "served_version", "served_snapshot", "base_url", "app_status"]

log = logging.getLogger(__name__)

_POLL_S = 0.25


class RolloutError(RuntimeError):
    """A rollout did not reach its snapshot; the message says what failed and what is served now."""


def base_url(params: "Params") -> str:
    """The application's HTTP base URL (a wildcard bind address is reached through loopback)."""
    host = params.serving.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    prefix = (params.serving.route_prefix or "/").rstrip("/")
    return f"http://{host}:{params.serving.port}{prefix}"


def served_version(params: "Params | None" = None, timeout_s: float = 10.0) -> dict | None:
    """``GET /version`` of the running application: ``{"snapshot_id", "requested_snapshot_id",
    "last_error"}``, or None when it does not answer 200."""
    import httpx

    from sum_platform.config import load_params

    params = params or load_params()
    try:
        resp = httpx.get(f"{base_url(params)}/version", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def served_snapshot_id(params: "Params | None" = None, timeout_s: float = 10.0) -> str | None:
    """The snapshot id the running application reports on ``GET /version``; None if it cannot tell.

    Args:
        params: Platform params; defaults to the params in force.
        timeout_s: HTTP timeout.
    """
    body = served_version(params, timeout_s)
    value = body.get("snapshot_id") if body else None
    return str(value) if value else None


def app_status(params: "Params") -> tuple[str | None, str]:
    """``(status, message)`` of the application in Ray Serve (status None if it is not deployed)."""
    from ray import serve

    app = serve.status().applications.get(params.serving.app_name)
    if app is None:
        return None, ""
    details = "; ".join(
        f"{name}: {d.status.value if hasattr(d.status, 'value') else d.status} {d.message}".strip()
        for name, d in app.deployments.items()
        if d.message
    )
    status = app.status.value if hasattr(app.status, "value") else str(app.status)
    return status, " | ".join(x for x in (app.message, details) if x)


def served_snapshot(params: "Params", timeout_s: float = 5.0) -> tuple[Path, str] | None:
    """``(snapshot_dir, snapshot_id)`` the compute deployment runs now, asked through Ray (None if unknown)."""
    from ray import serve

    try:
        handle = serve.get_deployment_handle("ComputeCenter", app_name=params.serving.app_name)
        info = handle.info.remote().result(timeout_s=timeout_s)
    except Exception:
        return None
    if not info or not info.get("snapshot_id") or not info.get("snapshot_dir"):
        return None
    return Path(info["snapshot_dir"]), str(info["snapshot_id"])


def deploy(
    params: "Params",
    snapshot_dir: Path,
    snapshot_id: str,
    *,
    wait: bool = True,
    timeout_s: float = 120.0,
    params_file: str | os.PathLike | None = None,
) -> None:
    """Deploys the SOAP application serving ``snapshot_id`` (starts it, or reconfigures it in place).

    Args:
        params: Platform params.
        snapshot_dir: Snapshot directory the compute deployment loads.
        snapshot_id: Its id.
        wait: Wait until Ray Serve reports the application RUNNING (or failed).
        timeout_s: How long to wait.
        params_file: The params file replicas load (default ``SUM_PARAMS`` / the project's file).

    Raises:
        RolloutError: The application failed to deploy or did not become RUNNING in time (with ``wait``).
    """
    from ray import serve
    from ray.serve.api import RunTarget

    from serving.app import build_app
    from serving.ray_cluster import ensure_ray

    ensure_ray(params)
    app = build_app(params, snapshot_dir, snapshot_id, params_file=params_file)
    # Like serve.run(blocking=False), but without serve.run's unbounded wait for RUNNING: we bound it.
    serve.run_many(
        [RunTarget(target=app, name=params.serving.app_name, route_prefix=params.serving.route_prefix)],
        wait_for_ingress_deployment_creation=True,
        wait_for_applications_running=False,
    )
    if wait:
        _wait_running(params, timeout_s)


def _wait_running(params: "Params", timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status, message = app_status(params)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RolloutError(f"application {params.serving.app_name!r} failed to deploy: {message}")
        if time.monotonic() > deadline:
            raise RolloutError(
                f"application {params.serving.app_name!r} not RUNNING after {timeout_s:.0f}s "
                f"(status {status}: {message})"
            )
        time.sleep(_POLL_S)


def _serves(body: dict | None, snapshot_id: str, fingerprint: str | None) -> bool:
    if not body:
        return False
    return body.get("snapshot_id") == snapshot_id and body.get("fingerprint") == fingerprint


def _await_served(
    params: "Params", snapshot_id: str, fingerprint: str | None, timeout_s: float
) -> tuple[bool, str]:
    """Polls ``/version`` until it reports the snapshot (id and content fingerprint); stops early when
    the compute deployment reports it could not load exactly that snapshot, or the deploy failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = served_version(params, timeout_s=max(1.0, min(10.0, deadline - time.monotonic()))) or {}
        served = body.get("snapshot_id")
        status, message = app_status(params)
        if _serves(body, snapshot_id, fingerprint) and status == "RUNNING":
            return True, ""
        if (
            body.get("last_error")
            and body.get("requested_snapshot_id") == snapshot_id
            and body.get("requested_fingerprint") == fingerprint
        ):
            return False, f"the compute deployment could not load it ({body['last_error']}); it still runs {served!r}"
        if status == "DEPLOY_FAILED":
            return False, f"Ray Serve reports DEPLOY_FAILED: {message}"
        if time.monotonic() > deadline:
            return False, f"/version still reports {served!r} after {timeout_s:.0f}s (status {status}: {message})"
        time.sleep(_POLL_S)


def _preflight(snapshot_dir: Path, snapshot_id: str) -> None:
    from sum_models.snapshot import load_user_tower

    _, manifest = load_user_tower(Path(snapshot_dir))
    if manifest.get("snapshot_id") != snapshot_id:
        raise ValueError(f"manifest names snapshot {manifest.get('snapshot_id')!r}, not {snapshot_id!r}")


def rollout(
    params: "Params",
    snapshot_dir: Path,
    snapshot_id: str,
    previous: tuple[Path, str] | None = None,
    timeout_s: float = 60.0,
    *,
    preflight: bool = True,
    params_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Moves the application to ``snapshot_id`` and verifies it; rolls back on failure.

    Idempotent: when ``/version`` already reports ``snapshot_id`` with the same content fingerprint
    (the same export) nothing is deployed; a snapshot re-exported under the same id is rolled out.

    Args:
        params: Platform params.
        snapshot_dir: The snapshot to serve.
        snapshot_id: Its id.
        previous: ``(dir, id)`` to restore on failure; defaults to whatever the compute deployment ran
            before this rollout (when known).
        timeout_s: How long the new snapshot may take to be reported by ``/version`` (and, separately,
            the rollback).
        preflight: Load the snapshot in this process first; a snapshot that fails to load is never
            deployed (serving is not touched at all).
        params_file: The params file replicas load (default ``SUM_PARAMS`` / the project's file).

    Returns:
        ``{"status": "deployed"|"unchanged", "snapshot_id", "previous_served", "seconds"}``.

    Raises:
        RolloutError: The snapshot failed preflight, failed to load in the compute deployment or was not
            reported in time. The message names the failure, the rollback and what ``/version`` reports now.
    """
    from serving.app import snapshot_fingerprint
    from serving.ray_cluster import ensure_ray

    t0 = time.monotonic()
    snapshot_dir = Path(snapshot_dir)
    ensure_ray(params)
    fingerprint = snapshot_fingerprint(snapshot_dir)
    body = served_version(params)
    before = (body or {}).get("snapshot_id")
    status, _ = app_status(params)
    if _serves(body, snapshot_id, fingerprint) and status == "RUNNING":
        return {"status": "unchanged", "snapshot_id": snapshot_id, "previous_served": before, "seconds": 0.0}

    if preflight:
        try:
            _preflight(snapshot_dir, snapshot_id)
        except Exception as exc:
            raise RolloutError(
                f"snapshot {snapshot_id} at {snapshot_dir} failed to load ({exc}); not deployed, "
                f"serving unchanged: /version reports {before!r}"
            ) from exc

    fallback = previous or (served_snapshot(params) if before else None)
    failure: str
    try:
        deploy(params, snapshot_dir, snapshot_id, wait=False, params_file=params_file)
        ok, failure = _await_served(params, snapshot_id, fingerprint, timeout_s)
    except Exception as exc:  # the deploy call itself failed
        ok, failure = False, f"deploy raised {type(exc).__name__}: {exc}"
    if ok:
        log.info("rolled out %s (was %s) in %.1fs", snapshot_id, before, time.monotonic() - t0)
        return {
            "status": "deployed",
            "snapshot_id": snapshot_id,
            "previous_served": before,
            "seconds": round(time.monotonic() - t0, 3),
        }

    message = f"rollout of {snapshot_id} from {snapshot_dir} failed: {failure}"
    log.error(message)
    if fallback is None:
        now = served_snapshot_id(params)
        raise RolloutError(f"{message}; no previous snapshot to roll back to; /version reports {now!r}")
    prev_dir, prev_id = Path(fallback[0]), str(fallback[1])
    try:
        deploy(params, prev_dir, prev_id, wait=False, params_file=params_file)
        back, why = _await_served(params, prev_id, snapshot_fingerprint(prev_dir), timeout_s)
    except Exception as exc:
        back, why = False, f"deploy raised {type(exc).__name__}: {exc}"
    now = served_snapshot_id(params)
    if back:
        raise RolloutError(f"{message}; rolled back to {prev_id}; /version reports {now!r}")
    raise RolloutError(f"{message}; rollback to {prev_id} failed too ({why}); /version reports {now!r}")
