"""Rollout of a production snapshot to the SOAP application (called by the daily DAG).

``deploy`` starts the application on first use; afterwards a deploy changes only the deployments'
``user_config`` (same pinned code version), so Ray Serve calls ``reconfigure`` on the running
replicas: reads never stop, and the compute keeps its old tower until the new one has loaded. That holds for
another workspace's snapshot too (the store is part of the ``user_config``, :func:`serving.settings.store_location`).

``rollout`` = (preflight load) + deploy + verify through ``GET /version`` (snapshot id *and* content
fingerprint); on a failure (load error, timeout) it redeploys the previous snapshot, verifies it, and raises
:class:`RolloutError` saying what failed and what is served now. Either way it produces a JSON-able
*rollout record* (``result["record"]`` / ``RolloutError.record``) that the daily pipeline stores in the
snapshot registry.

The frozen snapshot (what ``frozen`` mode computes with) is kept across rollouts: the first deploy freezes
the snapshot it deploys unless told otherwise, later rollouts keep whatever the compute deployment was
configured with (the pipeline passes the first production snapshot of the registry explicitly).

``reconfigure`` changes the mode, budgets or compute knobs of the running application in place.

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

from serving.ray_cluster import ensure_ray
from serving.settings import compute_user_config, ingress_user_config, serving_token, snapshot_fingerprint
from sum_platform.config import load_params

if TYPE_CHECKING:
    from sum_platform.config import Params

__all__ = [
    "RolloutError",
    "deploy",
    "rollout",
    "reconfigure",
    "served_snapshot_id",
    "served_version",
    "served_snapshot",
    "compute_info",
    "base_url",
    "app_status",
    "auth_headers",
]

log = logging.getLogger(__name__)

_POLL_S = 0.25


class RolloutError(RuntimeError):
    """A rollout did not reach its snapshot; the message says what failed and what is served now.

    Attributes:
        record: The rollout record (``status`` ``preflight_failed`` / ``rolled_back`` /
            ``rollback_failed`` / ``failed``), for the registry.
    """

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = dict(record or {})


def _record(status: str, snapshot_id: str, t0: float, **fields: Any) -> dict[str, Any]:
    from datetime import datetime, timezone

    return {
        "status": status,
        "snapshot_id": snapshot_id,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 3),
        **fields,
    }


def base_url(params: "Params") -> str:
    """The application's HTTP base URL (a wildcard bind address is reached through loopback)."""
    host = params.serving.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    prefix = (params.serving.route_prefix or "/").rstrip("/")
    return f"http://{host}:{params.serving.port}{prefix}"


def auth_headers(params: "Params") -> dict[str, str]:
    """Headers a request to the HTTP API needs: the bearer token when ``serving.token_file`` is set."""
    token = serving_token(params)
    return {"Authorization": f"Bearer {token}"} if token else {}


def served_version(params: "Params | None" = None, timeout_s: float = 10.0) -> dict | None:
    """``GET /version`` of the running application: ``{"snapshot_id", "workspace_id", "requested_snapshot_id",
    "last_error", ...}``, or None when it does not answer 200."""
    import httpx

    params = params or load_params()
    try:
        resp = httpx.get(f"{base_url(params)}/version", headers=auth_headers(params), timeout=timeout_s)
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


def compute_info(params: "Params", timeout_s: float = 5.0) -> dict | None:
    """``ComputeCenter.info()`` of the running application (asked through Ray), None if unreachable."""
    from ray import serve

    try:
        handle = serve.get_deployment_handle("ComputeCenter", app_name=params.serving.app_name)
        return handle.info.remote().result(timeout_s=timeout_s)
    except Exception:
        return None


def served_snapshot(params: "Params", timeout_s: float = 5.0) -> tuple[Path, str] | None:
    """``(snapshot_dir, snapshot_id)`` the compute deployment runs now, asked through Ray (None if unknown)."""
    info = compute_info(params, timeout_s)
    if not info or not info.get("snapshot_id") or not info.get("snapshot_dir"):
        return None
    return Path(info["snapshot_dir"]), str(info["snapshot_id"])


def _same_workspace(info: dict | None, params: "Params") -> bool:
    cfg = (info or {}).get("user_config") or {}
    return bool(cfg.get("workspace")) and Path(cfg["workspace"]).resolve() == Path(params.workspace).resolve()


def _configured_frozen(info: dict | None, params: "Params") -> tuple[Path, str] | None:
    """The frozen snapshot the running compute deployment was configured with, when it serves this
    workspace (None otherwise)."""
    cfg = (info or {}).get("user_config") or {}
    if _same_workspace(info, params) and cfg.get("frozen_snapshot_dir") and cfg.get("frozen_snapshot_id"):
        return Path(cfg["frozen_snapshot_dir"]), str(cfg["frozen_snapshot_id"])
    return None


def deploy(
    params: "Params",
    snapshot_dir: Path,
    snapshot_id: str,
    *,
    wait: bool = True,
    timeout_s: float = 120.0,
    params_file: str | os.PathLike | None = None,
    frozen: tuple[Path, str] | None = None,
    compute_options: dict | None = None,
    ingress_options: dict | None = None,
) -> None:
    """Deploys the SOAP application serving ``snapshot_id`` (starts it, or reconfigures it in place).

    Args:
        params: Platform params.
        snapshot_dir: Snapshot directory the compute deployment loads.
        snapshot_id: Its id.
        wait: Wait until Ray Serve reports the application RUNNING (or failed).
        timeout_s: How long to wait.
        params_file: The params file replicas load (default ``SUM_PARAMS`` / the project's file).
        frozen: ``(dir, id)`` frozen mode computes with (default ``snapshot_id``).
        compute_options: Compute ``user_config`` overrides (``max_batch_size``, ``batch_wait_ms``,
            ``debug_delay_ms``).
        ingress_options: Ingress ``user_config`` overrides (``mode``, ``realtime_budget_ms``,
            ``frozen_timeout_ms``, ``max_batch_users``).

    Raises:
        RolloutError: The application failed to deploy or did not become RUNNING in time (with ``wait``).
    """
    from ray import serve
    from ray.serve.api import RunTarget

    from serving.app import build_app  # Ray Serve, FastAPI: only where an application is built

    ensure_ray(params)
    serving_token(params)  # generated here, before the replica reads it, so this process and its clients share it
    app = build_app(
        params,
        snapshot_dir,
        snapshot_id,
        params_file=params_file,
        frozen=frozen,
        compute_options=compute_options,
        ingress_options=ingress_options,
    )
    # Like serve.run(blocking=False), but without serve.run's unbounded wait for RUNNING: we bound it.
    serve.run_many(
        # No Serve route: the ingress replica serves HTTP itself (serving.http_server), Serve runs no proxy.
        [RunTarget(target=app, name=params.serving.app_name, route_prefix=None)],
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


def _running_ingress(body: dict | None) -> dict:
    """The ingress ``user_config`` in force, as ``/version`` reports it (without its ``config_error``)."""
    return {k: v for k, v in ((body or {}).get("ingress") or {}).items() if k != "config_error"}


def _serves(body: dict | None, snapshot_id: str, fingerprint: str | None) -> bool:
    if not body:
        return False
    return body.get("snapshot_id") == snapshot_id and body.get("fingerprint") == fingerprint


def _await_served(
    params: "Params", snapshot_id: str, fingerprint: str | None, timeout_s: float
) -> tuple[bool, str]:
    """Polls ``/version`` until it reports the snapshot (id and content fingerprint); stops early when
    the compute deployment reports it could not load exactly that snapshot, or the deploy failed.

    Each ``/version`` answers from one compute replica (Serve routes it): with several replicas it takes
    ``4 x serving.compute_replicas`` answers in a row, so a replica that kept its old tower is asked too
    (missed with a chance of 2 x 2^-8 for two replicas) and any replica's load error ends the wait."""
    deadline = time.monotonic() + timeout_s
    needed = 1 if params.serving.compute_replicas <= 1 else 4 * params.serving.compute_replicas
    agreeing = 0
    while True:
        body = served_version(params, timeout_s=max(1.0, min(10.0, deadline - time.monotonic()))) or {}
        served = body.get("snapshot_id")
        status, message = app_status(params)
        agreeing = agreeing + 1 if (_serves(body, snapshot_id, fingerprint) and status == "RUNNING") else 0
        if agreeing >= needed:
            return True, ""
        if agreeing:
            continue
        if (
            body.get("last_error")
            and body.get("requested_snapshot_id") == snapshot_id
            and body.get("requested_fingerprint") == fingerprint
        ):
            # /version names the snapshot and the exception type; the replica (asked through Ray) has the detail.
            detail = (compute_info(params) or {}).get("last_error") or body["last_error"]
            return False, f"the compute deployment could not load it ({detail}); it still runs {served!r}"
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
    timeout_s: float | None = None,
    *,
    preflight: bool = True,
    params_file: str | os.PathLike | None = None,
    frozen: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """Moves the application to ``snapshot_id`` and verifies it; rolls back on failure.

    Idempotent: when the running application already has exactly the configuration this rollout
    would deploy (snapshot id and content fingerprint, frozen snapshot, mode and knobs from ``params``)
    nothing is deployed; a snapshot re-exported under the same id is rolled out. Knobs changed at
    runtime with :func:`reconfigure` are reset to ``params``.

    Args:
        params: Platform params.
        snapshot_dir: The snapshot to serve.
        snapshot_id: Its id.
        previous: ``(dir, id)`` to restore on failure; defaults to whatever the compute deployment ran
            before this rollout (when known).
        timeout_s: How long the new snapshot may take to be reported by ``/version`` (and, separately,
            the rollback); default ``serving.rollout_timeout_s``.
        preflight: Load the snapshot in this process first; a snapshot that fails to load is never
            deployed (serving is not touched at all).
        params_file: The params file replicas load (default ``SUM_PARAMS`` / the project's file).
        frozen: ``(dir, id)`` frozen mode computes with; default: what the running compute deployment
            was configured with, else this snapshot (the first deploy freezes its snapshot).

    Returns:
        ``{"status": "deployed"|"unchanged", "snapshot_id", "previous_served", "seconds", "record"}``;
        ``record`` is the JSON-able rollout record for the registry.

    Raises:
        RolloutError: The snapshot failed preflight, failed to load in the compute deployment or was not
            reported in time. The message names the failure, the rollback and what ``/version`` reports
            now; ``err.record`` is the rollout record (``rolled_back`` with ``rolled_back_to``, or
            ``rollback_failed`` / ``preflight_failed`` / ``failed``).
    """
    t0 = time.monotonic()
    timeout_s = params.serving.rollout_timeout_s if timeout_s is None else timeout_s
    snapshot_dir = Path(snapshot_dir)
    ensure_ray(params)
    fingerprint = snapshot_fingerprint(snapshot_dir)
    body = served_version(params)
    before = (body or {}).get("snapshot_id")
    info = compute_info(params) if body else None
    frozen = frozen or _configured_frozen(info, params) or (snapshot_dir, snapshot_id)
    status, _ = app_status(params)
    want_compute = compute_user_config(params, snapshot_dir, snapshot_id, params_file, frozen=frozen)
    want_ingress = ingress_user_config(params)
    if (
        _serves(body, snapshot_id, fingerprint)
        and status == "RUNNING"
        and (info or {}).get("user_config") == want_compute
        and _running_ingress(body) == want_ingress
    ):
        record = _record("unchanged", snapshot_id, t0, previous_served=before, served_after=before,
                         frozen_snapshot_id=str(frozen[1]))
        return {"status": "unchanged", "snapshot_id": snapshot_id, "previous_served": before, "seconds": 0.0,
                "record": record}

    if preflight:
        try:
            _preflight(snapshot_dir, snapshot_id)
        except Exception as exc:
            record = _record("preflight_failed", snapshot_id, t0, previous_served=before, served_after=before,
                             error=f"{type(exc).__name__}: {exc}")
            raise RolloutError(
                f"snapshot {snapshot_id} at {snapshot_dir} failed to load ({exc}); not deployed, "
                f"serving unchanged: /version reports {before!r}",
                record,
            ) from exc

    # Default rollback target: what runs now, if it serves this workspace.
    fallback = previous or (served_snapshot(params) if before and _same_workspace(info, params) else None)
    failure: str
    log.info("deploying %s (serving %s now)", snapshot_id, before)
    try:
        deploy(params, snapshot_dir, snapshot_id, wait=False, params_file=params_file, frozen=frozen)
        ok, failure = _await_served(params, snapshot_id, fingerprint, timeout_s)
    except Exception as exc:  # the deploy call itself failed
        ok, failure = False, f"deploy raised {type(exc).__name__}: {exc}"
    if ok:
        seconds = round(time.monotonic() - t0, 3)
        log.info("rolled out %s (was %s) in %.1fs", snapshot_id, before, seconds)
        record = _record("deployed", snapshot_id, t0, previous_served=before, served_after=snapshot_id,
                         frozen_snapshot_id=str(frozen[1]))
        return {"status": "deployed", "snapshot_id": snapshot_id, "previous_served": before, "seconds": seconds,
                "record": record}

    message = f"rollout of {snapshot_id} from {snapshot_dir} failed: {failure}"
    log.error(message)
    if fallback is None:
        now = served_snapshot_id(params)
        record = _record("failed", snapshot_id, t0, previous_served=before, served_after=now, error=failure)
        raise RolloutError(f"{message}; no previous snapshot to roll back to; /version reports {now!r}", record)
    prev_dir, prev_id = Path(fallback[0]), str(fallback[1])
    try:
        deploy(params, prev_dir, prev_id, wait=False, params_file=params_file, frozen=frozen)
        back, why = _await_served(params, prev_id, snapshot_fingerprint(prev_dir), timeout_s)
    except Exception as exc:
        back, why = False, f"deploy raised {type(exc).__name__}: {exc}"
    now = served_snapshot_id(params)
    if back:
        record = _record("rolled_back", snapshot_id, t0, previous_served=before, served_after=now,
                         rolled_back_to=prev_id, error=failure)
        raise RolloutError(f"{message}; rolled back to {prev_id}; /version reports {now!r}", record)
    record = _record("rollback_failed", snapshot_id, t0, previous_served=before, served_after=now,
                     rolled_back_to=prev_id, error=failure, rollback_error=why)
    raise RolloutError(f"{message}; rollback to {prev_id} failed too ({why}); /version reports {now!r}", record)


def reconfigure(
    params: "Params",
    *,
    mode: str | None = None,
    realtime_budget_ms: float | None = None,
    frozen_timeout_ms: float | None = None,
    max_batch_users: int | None = None,
    compute_options: dict | None = None,
    params_file: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Changes the running application's mode, budgets or compute knobs in place (same snapshots).

    What is not given keeps its running value. Lasts until the next :func:`rollout`, which deploys the
    configuration of ``params`` (change ``params.yaml`` ``serving`` for a lasting switch).

    Args:
        params: Platform params.
        mode: ``async`` / ``realtime`` / ``offline`` / ``frozen``.
        realtime_budget_ms: Realtime latency budget.
        frozen_timeout_ms: Frozen mode's compute deadline.
        max_batch_users: Bound of the batch endpoint.
        compute_options: ``max_batch_size``, ``batch_wait_ms``, ``debug_delay_ms``, ``pool_unit``.
        params_file: The params file replicas load.
        timeout_s: How long to wait until ``/version`` reports the change.

    Returns:
        ``{"ingress": {...}, "compute": {...}}``: the configuration in force afterwards.

    Raises:
        RolloutError: Nothing is running, or the change was not applied in time.
    """
    ensure_ray(params)
    info = compute_info(params)
    body = served_version(params)
    if not info or not info.get("user_config") or not body:
        raise RolloutError("no running SOAP application to reconfigure")
    cfg = info["user_config"]
    ingress = _running_ingress(body)
    ingress.update({k: v for k, v in {"mode": mode, "realtime_budget_ms": realtime_budget_ms,
                                       "frozen_timeout_ms": frozen_timeout_ms,
                                       "max_batch_users": max_batch_users}.items() if v is not None})
    knobs = {k: cfg.get(k) for k in ("max_batch_size", "batch_wait_ms", "write_coalesce_ms", "debug_delay_ms",
                                     "pool_unit")}
    knobs.update(compute_options or {})
    frozen = _configured_frozen(info, params)
    want_ingress = ingress_user_config(params, **ingress)  # validates before anything is deployed
    want_compute = compute_user_config(params, cfg["snapshot_dir"], cfg["snapshot_id"], params_file,
                                       frozen=frozen, **knobs)
    deploy(params, Path(cfg["snapshot_dir"]), str(cfg["snapshot_id"]), wait=True, params_file=params_file,
           frozen=frozen, compute_options=knobs, ingress_options=want_ingress)
    deadline = time.monotonic() + timeout_s
    while True:
        body = served_version(params) or {}
        now_ingress = _running_ingress(body)
        now_compute = (compute_info(params) or {}).get("user_config")
        if now_ingress == want_ingress and now_compute == want_compute:
            return {"ingress": now_ingress, "compute": now_compute}
        if time.monotonic() > deadline:
            raise RolloutError(f"reconfigure not applied after {timeout_s:.0f}s: ingress {now_ingress}, compute {now_compute}")
        time.sleep(_POLL_S)
