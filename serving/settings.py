"""What the SOAP deployments are configured with, built from ``params.serving`` in one place.

* constructor settings (:func:`app_settings`: a change replaces replicas) and their pinned code version
  (:func:`code_version`);
* the compute ``user_config`` (:func:`compute_user_config`: snapshots and batching knobs) and the ingress
  ``user_config`` (:func:`ingress_user_config`: mode, budgets, coalescing), both applied in place by
  ``reconfigure``;
* the store both deployments read (:func:`store_location`: workspace and params file), in both ``user_config`` s:
  another workspace is a reconfigure too (replacing both replicas cost ~30-50 s on two cores: new processes
  importing torch and Feast), and a workspace's token file, when relative, still changes the settings;
* a snapshot's content identity (:func:`snapshot_fingerprint`) and the store a replica opens
  (:func:`open_store`);
* who may call the HTTP API (:func:`check_access`: a token beyond loopback; :func:`serving_token`).

No Ray, FastAPI or torch import: the rollout and the CLI build configurations without them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from sum_platform.config import BATCH_HARD_MAX, Mode, load_params, params_path
from sum_platform.feature_store import get_store
from sum_platform.files import owner_only_secret
from sum_platform.workspace import Workspace

if TYPE_CHECKING:
    from sum_platform.config import Params

__all__ = [
    "BATCH_HARD_MAX",
    "MODES",
    "Mode",
    "USER_CONFIG_KEYS",
    "app_settings",
    "check_access",
    "code_version",
    "compute_user_config",
    "ingress_user_config",
    "is_loopback",
    "load_token",
    "open_store",
    "serving_token",
    "snapshot_fingerprint",
    "store_location",
    "token_path",
    "validate_ingress_config",
]

#: The read modes of the ingress (paper §4), as ``serving.mode`` declares them.
MODES: tuple[str, ...] = get_args(Mode)
#: Keys every compute ``user_config`` must carry (others are optional, see :func:`compute_user_config`).
USER_CONFIG_KEYS = ("snapshot_dir", "snapshot_id", "workspace", "params_path", "pool_unit")

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` counts; any other name does not: it may resolve wider)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(host: str, token_file: str | os.PathLike | None) -> None:
    """Refuses an HTTP API reachable beyond loopback without a token (anyone who reaches it could read every
    user's embeddings and load the compute replica).

    Raises:
        ValueError: ``host`` is not loopback and no ``serving.token_file`` is configured.
    """
    if not token_file and not is_loopback(host):
        raise ValueError(
            f"serving.host {host!r} is not a loopback address and serving.token_file is not set: SOAP does not "
            "listen beyond loopback without a token. Set serving.token_file (e.g. stack/soap-token, generated "
            "once, mode 0600); every request but /healthz then needs 'Authorization: Bearer <token>'"
        )


def token_path(params: "Params") -> Path | None:
    """The API token's file (``serving.token_file``, relative to the workspace), None when no token is configured."""
    if not params.serving.token_file:
        return None
    path = Path(params.serving.token_file).expanduser()
    return path if path.is_absolute() else Path(params.workspace) / path


def load_token(path: str | os.PathLike) -> str:
    """The bearer token in ``path``, generated there first if missing (mode 0600, atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return owner_only_secret(path, lambda: secrets.token_urlsafe(32))


def serving_token(params: "Params") -> str | None:
    """The API's bearer token (``serving.token_file``, generated once); None when none is configured."""
    path = token_path(params)
    return None if path is None else load_token(path)


def open_store(workspace: str, params_path: str) -> tuple["Params", Any]:
    """Opens the workspace's feature store inside a replica (which has its own environment)."""
    os.environ["SUM_WORKSPACE"] = str(workspace)
    os.environ["SUM_PARAMS"] = str(params_path)
    params = load_params(params_path)
    return params, get_store(params)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def validate_ingress_config(user_config: dict) -> dict:
    """The ingress ``user_config`` checked and normalised (every key required: the values come from
    ``params.serving`` through :func:`ingress_user_config`, never from a default here).

    Raises:
        ValueError: A missing or invalid mode or bound.
    """
    cfg = dict(user_config or {})
    if cfg.get("mode") not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.get('mode')!r}")
    for key in ("realtime_budget_ms", "frozen_timeout_ms"):
        if not _positive_number(cfg.get(key)):
            raise ValueError(f"{key} must be a positive number, got {cfg.get(key)!r}")
    users = cfg.get("max_batch_users")
    if not isinstance(users, int) or isinstance(users, bool) or not 1 <= users <= BATCH_HARD_MAX:
        raise ValueError(f"max_batch_users must be an int in [1, {BATCH_HARD_MAX}], got {users!r}")
    coalesce = cfg.get("coalesce_ms")
    if not isinstance(coalesce, (int, float)) or isinstance(coalesce, bool) or not 0 <= coalesce <= 1000:
        raise ValueError(f"coalesce_ms must be a number in [0, 1000], got {coalesce!r}")
    window_users = cfg.get("coalesce_max_users")
    if not isinstance(window_users, int) or isinstance(window_users, bool) or window_users < 1:
        raise ValueError(f"coalesce_max_users must be an int >= 1, got {window_users!r}")
    return {
        "mode": cfg["mode"],
        "realtime_budget_ms": float(cfg["realtime_budget_ms"]),
        "frozen_timeout_ms": float(cfg["frozen_timeout_ms"]),
        "max_batch_users": users,
        "coalesce_ms": float(coalesce),
        "coalesce_max_users": window_users,
    }


def ingress_user_config(params: "Params", **overrides: Any) -> dict:
    """The ingress ``user_config``: ``mode``, ``realtime_budget_ms``, ``frozen_timeout_ms``,
    ``max_batch_users``, ``coalesce_ms``, ``coalesce_max_users`` from ``params.serving``, with
    ``overrides``.

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
        "coalesce_max_users": int(s.compute_coalesce_max_users),
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return validate_ingress_config(cfg)


def store_location(params: "Params", params_file: str | os.PathLike | None = None) -> dict:
    """Where a replica opens the online store (:func:`open_store`): ``{"workspace", "params_path"}``. Part of both
    deployments' ``user_config`` (not of their constructor settings), so serving another workspace reconfigures the
    running replicas instead of replacing them."""
    return {
        "workspace": str(params.workspace),
        "params_path": str(Path(params_file).resolve() if params_file else params_path()),
    }


def app_settings(params: "Params") -> dict:
    """Constructor settings shared by both deployments (JSON-serialisable; a change replaces replicas). The token
    itself is not among them (Serve shows deployment settings): the ingress reads it from ``token_file``. The store
    is not among them either (:func:`store_location`: it travels in the ``user_config`` s).

    Raises:
        ValueError: ``serving.host`` is not loopback and no token is configured (:func:`check_access`).
    """
    check_access(params.serving.host, params.serving.token_file)
    token_file = token_path(params)
    return {
        "host": str(params.serving.host),
        "port": int(params.serving.port),
        "token_file": str(token_file.resolve()) if token_file else None,
        "max_request_bytes": int(params.serving.max_request_bytes),
        "route_prefix": str(params.serving.route_prefix or "/"),
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
    workspace_id: str | None = None,
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
        workspace_id: Identity of the workspace the snapshot belongs to (default: the marker of
            ``params.workspace``, :meth:`sum_platform.workspace.Workspace.identity`).
        overrides: ``max_batch_size``, ``batch_wait_ms``, ``write_coalesce_ms``, ``debug_delay_ms`` (test/benchmark knob: every
            compute batch sleeps this long first, i.e. a slower model), ``pool_unit`` (``snapshot`` | ``write``).
    """
    check_access(params.serving.host, params.serving.token_file)
    location = store_location(params, params_file)
    frozen_dir, frozen_id = frozen if frozen else (snapshot_dir, snapshot_id)
    cfg = {
        "snapshot_dir": str(Path(snapshot_dir).resolve()),
        "fingerprint": snapshot_fingerprint(snapshot_dir),
        "snapshot_id": str(snapshot_id),
        "frozen_snapshot_dir": str(Path(frozen_dir).resolve()),
        "frozen_snapshot_id": str(frozen_id),
        "frozen_fingerprint": snapshot_fingerprint(frozen_dir),
        "workspace": location["workspace"],
        # Whose snapshot this is: /version reports it, so `sumctl doctor` tells its own app from another workspace's.
        "workspace_id": workspace_id if workspace_id is not None else Workspace(Path(params.workspace)).identity(),
        "params_path": location["params_path"],
        "max_batch_size": int(params.serving.compute_max_batch_size),
        "batch_wait_ms": float(params.serving.compute_batch_wait_ms),
        "write_coalesce_ms": float(params.serving.compute_write_coalesce_ms),
        "pool_unit": str(params.serving.pool_unit),  # what the write-backs pool (sum_platform.embedding_row)
        "debug_delay_ms": 0.0,
    }
    unknown = set(overrides) - {"max_batch_size", "batch_wait_ms", "write_coalesce_ms", "debug_delay_ms", "pool_unit"}
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
