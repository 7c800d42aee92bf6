"""SOAP (paper §4): the SUM Online Asynchronous Platform as a Ray Serve application.

Two deployments:

* :class:`SoapIngress` (the client): ``GET /users/{user_id}/embeddings`` answers at once with the user's
  embeddings as stored in the online store, and fires an asynchronous call to the compute deployment
  without waiting for it (at most ``serving.max_inflight_compute`` calls in flight; more are dropped and
  counted). The read path never waits for inference.
* :class:`ComputeCenter`: holds the production user tower. Batches compute calls, reads the users'
  current features from the online store, runs the tower and writes the fp16 result back with its
  snapshot id and write time (:func:`serving.store_io.write_embeddings`, the same write the daily batch
  uses). A new snapshot arrives through ``user_config`` -> :meth:`ComputeCenter.reconfigure`, which swaps
  the tower only after a successful load.

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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from serving.store_io import MAX_USER_ID

if TYPE_CHECKING:
    from ray.serve.deployment import Application
    from ray.serve.handle import DeploymentHandle

    from sum_platform.config import Params

__all__ = [
    "ComputeCenter",
    "SoapIngress",
    "api",
    "build_app",
    "compute_user_config",
    "app_settings",
    "snapshot_fingerprint",
    "ComputeLauncher",
]

log = logging.getLogger("ray.serve")

#: Keys every compute ``user_config`` must carry (plus the optional ``fingerprint``).
USER_CONFIG_KEYS = ("snapshot_dir", "snapshot_id", "workspace", "params_path")
#: How long the ingress waits for the compute deployment's snapshot id (``/version``).
VERSION_TIMEOUT_S = 5.0
#: Compute batching (``@serve.batch``).
COMPUTE_MAX_BATCH_SIZE = 32
COMPUTE_BATCH_WAIT_S = 0.02
#: Users per tower forward pass inside one compute batch.
TOWER_BATCH_SIZE = 512

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
    """Runs the production user tower and writes fresh embeddings back to the online store.

    Args:
        settings: :func:`app_settings` (``torch_threads``, ...).
    """

    def __init__(self, settings: dict | None = None) -> None:
        import torch

        settings = dict(settings or {})
        torch.set_num_threads(int(settings.get("torch_threads", 1)))
        self._tower = None
        self._snapshot_id: str | None = None
        self._snapshot_dir: str | None = None
        self._fingerprint: str | None = None
        self._loaded_at: float | None = None
        self._store = None
        self._store_key: tuple[str, str] | None = None
        self._last_error: str | None = None
        self._requested: tuple[str, str, str | None] | None = None
        # Snapshot loads run beside compute batches (which keep using the current tower meanwhile).
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-load")
        # One worker: feature reads, inference and writes of one batch never interleave with another's.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-compute")
        self._stats = {"batches": 0, "requests": 0, "written": 0, "skipped": 0, "failed_batches": 0}

    async def reconfigure(self, user_config: dict) -> None:
        """Loads the snapshot named by ``user_config`` and swaps it in only after a successful load.

        On a load failure a replica that already runs a tower keeps it and records the error, which
        ``/version`` reports (``last_error`` for ``requested_snapshot_id``) so the rollout sees it and
        rolls back. It does not raise there: Ray Serve 2.60 stops a replica whose ``reconfigure`` raises
        and retries fresh replicas with the bad config, which would take compute down until the rollback
        finished. A replica with no tower yet (starting up) raises, so Serve marks the deploy failed.

        Args:
            user_config: ``{"snapshot_dir", "snapshot_id", "workspace", "params_path", "fingerprint"}``
                (:func:`compute_user_config`). A loaded snapshot is reloaded when its fingerprint changed
                (re-exported under the same id).

        Raises:
            ValueError: Missing keys (always), or the manifest names another snapshot id (no tower yet).
            sum_models.snapshot.SnapshotError: Missing or corrupt snapshot files (no tower yet).
        """
        missing = [k for k in USER_CONFIG_KEYS if not (user_config or {}).get(k)]
        if missing:
            raise ValueError(f"compute user_config lacks {missing}; got {sorted(user_config or {})}")
        snapshot_dir, snapshot_id = str(user_config["snapshot_dir"]), str(user_config["snapshot_id"])
        store_key = (str(user_config["workspace"]), str(user_config["params_path"]))
        wanted_fp = user_config.get("fingerprint") or snapshot_fingerprint(snapshot_dir)
        self._requested = (snapshot_dir, snapshot_id, wanted_fp)
        if (
            self._tower is not None
            and (snapshot_dir, snapshot_id, wanted_fp) == (self._snapshot_dir, self._snapshot_id, self._fingerprint)
            and store_key == self._store_key
        ):
            self._last_error = None
            return
        try:
            tower, store, fingerprint = await asyncio.get_running_loop().run_in_executor(
                self._loader, self._load, snapshot_dir, snapshot_id, store_key
            )
        except Exception as exc:
            self._last_error = f"loading {snapshot_id} from {snapshot_dir} failed: {type(exc).__name__}: {exc}"
            if self._tower is None:
                log.error("%s; no tower to keep", self._last_error)
                raise
            log.error("%s; keeping %s", self._last_error, self._snapshot_id)
            return
        self._tower, self._store, self._store_key = tower, store, store_key
        self._snapshot_dir, self._snapshot_id, self._fingerprint = snapshot_dir, snapshot_id, fingerprint
        self._loaded_at = time.time()
        self._last_error = None
        log.info("compute center serves snapshot %s from %s", snapshot_id, snapshot_dir)

    def _load(self, snapshot_dir: str, snapshot_id: str, store_key: tuple[str, str]):
        from sum_models.snapshot import load_user_tower

        fingerprint = snapshot_fingerprint(snapshot_dir)
        tower, manifest = load_user_tower(Path(snapshot_dir))
        if manifest.get("snapshot_id") != snapshot_id:
            raise ValueError(
                f"snapshot at {snapshot_dir} is {manifest.get('snapshot_id')!r}, not {snapshot_id!r}"
            )
        store = self._store if store_key == self._store_key and self._store is not None else None
        if store is None:
            _, store = _open_store(*store_key)
        return tower.eval(), store, fingerprint

    @serve.batch(max_batch_size=COMPUTE_MAX_BATCH_SIZE, batch_wait_timeout_s=COMPUTE_BATCH_WAIT_S)
    async def compute(self, user_ids: list[int]) -> list[dict]:
        """Recomputes and writes back the embeddings of a batch of users (one call per user id).

        Returns:
            Per call: ``{"user_id", "status", "snapshot_id", "written_at_ms"}`` with status ``written``
            or the reason it was skipped (``no_features``, ``missing_dense_features``).
        """
        tower, store, snapshot_id = self._tower, self._store, self._snapshot_id
        if tower is None:
            raise RuntimeError("no user tower loaded")
        self._stats["batches"] += 1
        self._stats["requests"] += len(user_ids)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, _compute_and_write, tower, store, snapshot_id, list(user_ids)
            )
        except Exception:
            self._stats["failed_batches"] += 1
            raise
        out = [results[int(u)] for u in user_ids]
        self._stats["written"] += sum(1 for r in results.values() if r["status"] == "written")
        self._stats["skipped"] += sum(1 for r in results.values() if r["status"] != "written")
        return out

    def snapshot_id(self) -> str | None:
        """The id of the snapshot whose tower this replica runs."""
        return self._snapshot_id

    def version(self) -> dict:
        """What runs (id, fingerprint), what the latest ``user_config`` asked for, and why it does not
        run if it does not (``last_error``)."""
        requested = self._requested or (None, None, None)
        return {
            "snapshot_id": self._snapshot_id,
            "fingerprint": self._fingerprint,
            "requested_snapshot_id": requested[1],
            "requested_fingerprint": requested[2],
            "last_error": self._last_error,
        }

    def info(self) -> dict:
        """Loaded snapshot, load time, last load error and counters."""
        return {
            "snapshot_id": self._snapshot_id,
            "snapshot_dir": self._snapshot_dir,
            "fingerprint": self._fingerprint,
            "pid": os.getpid(),
            "loaded_at": self._loaded_at,
            "requested": list(self._requested) if self._requested else None,
            "last_error": self._last_error,
            "stats": dict(self._stats),
        }

    def check_health(self) -> None:
        """Ray Serve's health check: unhealthy while no tower is loaded."""
        if self._tower is None:
            raise RuntimeError(f"no user tower loaded (last error: {self._last_error})")


def _compute_and_write(tower, store, snapshot_id: str, user_ids: list[int]) -> dict[int, dict]:
    """Blocking part of a compute batch: read features -> tower -> fp16 -> write back."""
    from serving.store_io import read_user_features, to_ms, write_embeddings
    from sum_models.snapshot import embed_users

    unique = list(dict.fromkeys(int(u) for u in user_ids))
    frame, skipped = read_user_features(store, unique, tower.spec)
    results: dict[int, dict] = {
        u: {"user_id": u, "status": reason, "snapshot_id": None, "written_at_ms": None}
        for u, reason in skipped.items()
    }
    if len(frame):
        emb = embed_users(tower, frame, tower.spec, batch_size=TOWER_BATCH_SIZE)
        written_at_ms = to_ms(None)
        write_embeddings(store, frame["user_id"].to_numpy(), emb, snapshot_id, written_at_ms)
        for u in frame["user_id"].tolist():
            results[int(u)] = {
                "user_id": int(u),
                "status": "written",
                "snapshot_id": snapshot_id,
                "written_at_ms": written_at_ms,
            }
    return results


# ---------------------------------------------------------------------------------------------
# Ingress (SOAP client)
# ---------------------------------------------------------------------------------------------
class ComputeLauncher:
    """Fire-and-forget compute calls, at most ``max_inflight`` at once; over the bound a call is dropped.

    Each call runs in a task with a fresh context, detached from the HTTP request that fired it: Ray
    Serve cancels the child calls of a request whose client goes away, and the write path must not
    depend on the reader. Outcomes are counted (``stats``), failures logged (rate-limited).

    Args:
        max_inflight: Bound on calls in flight.
    """

    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = int(max_inflight)
        self._inflight: set[asyncio.Task] = set()
        self.stats = {"scheduled": 0, "dropped": 0, "written": 0, "skipped": 0, "failed": 0}

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def fire(self, make_call: Callable[[], Awaitable[dict]]) -> "asyncio.Task | None":
        """Starts ``make_call()`` without awaiting it (call from the event loop).

        Returns:
            The task (a later mode may await it with a latency budget), or None if dropped.
        """
        if len(self._inflight) >= self.max_inflight:
            self.stats["dropped"] += 1
            return None
        task = asyncio.get_running_loop().create_task(self._run(make_call), context=contextvars.Context())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        self.stats["scheduled"] += 1
        return task

    async def _run(self, make_call: Callable[[], Awaitable[dict]]) -> dict | None:
        try:
            result = await make_call()
        except Exception as exc:
            self.stats["failed"] += 1
            n = self.stats["failed"]
            if n <= 10 or n % 1000 == 0:
                log.warning("async compute call failed (%d so far): %s: %s", n, type(exc).__name__, exc)
            return None
        status = result.get("status") if isinstance(result, dict) else None
        self.stats["written" if status == "written" else "skipped"] += 1
        return result


class EmbeddingsResponse(BaseModel):
    """A user's stored SUM embeddings."""

    user_id: int
    snapshot_id: str | None = Field(description="Snapshot that computed the stored embeddings.")
    written_at_ms: int | None = Field(description="When they were written, Unix ms (UTC).")
    age_seconds: float | None = Field(description="Seconds since they were written.")
    embeddings: list[list[float]] = Field(description="K embeddings of dimension D (fp16 values).")
    compute: str = Field(description="Fate of the async recompute: 'scheduled' or 'dropped'.")


class VersionResponse(BaseModel):
    """What the compute deployment runs, and the outcome of the last snapshot it was asked to load."""

    snapshot_id: str | None = Field(description="Snapshot whose user tower computes embeddings now.")
    fingerprint: str | None = Field(description="Content hash of that snapshot's manifest.")
    requested_snapshot_id: str | None = Field(description="Snapshot of the latest user_config.")
    requested_fingerprint: str | None = Field(description="Its fingerprint.")
    last_error: str | None = Field(description="Why the requested snapshot is not running (None if it is).")


class ErrorResponse(BaseModel):
    detail: str
    user_id: int | None = None


api = FastAPI(
    title="SOAP - SUM Online Asynchronous Platform",
    description="Serves SUM user embeddings from the online store; recomputes them asynchronously.",
    version="1",
)


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
    """The SOAP client: reads from the online store at once, fires the compute call asynchronously.

    Args:
        compute: Handle of the :class:`ComputeCenter` deployment.
        settings: :func:`app_settings`.
    """

    def __init__(self, compute: "DeploymentHandle", settings: dict) -> None:
        self._compute = compute
        self._launcher = ComputeLauncher(int(settings["max_inflight_compute"]))
        self._settings = dict(settings)
        self._params, self._store = _open_store(settings["workspace"], settings["params_path"])
        # Store reads run here, off the event loop, one at a time (a SQLite connection is not
        # meant for concurrent use from many threads).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soap-read")
        self._stats = {"requests": 0, "not_found": 0}

    def _fire_compute(self, user_id: int) -> str:
        """Fires the async recompute of a user; returns ``scheduled`` or ``dropped``."""
        task = self._launcher.fire(lambda: self._compute.compute.remote(user_id))
        return "dropped" if task is None else "scheduled"

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- routes --------------------------------------------------------------------------------
    @api.get(
        "/users/{user_id}/embeddings",
        response_model=EmbeddingsResponse,
        responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
        summary="A user's SUM embeddings (stored value; triggers an async recompute)",
    )
    async def get_embeddings(
        self,
        user_id: int = PathParam(..., ge=0, le=MAX_USER_ID, description="User id (non-negative int64)."),
    ):
        from serving.store_io import read_embeddings

        self._stats["requests"] += 1
        try:
            rows = await self._run(read_embeddings, self._store, [user_id])
        except Exception as exc:
            log.error("online store read failed for user %s: %s", user_id, exc)
            return JSONResponse(
                status_code=503, content={"detail": f"online store read failed: {exc}", "user_id": user_id}
            )
        compute = self._fire_compute(user_id)
        row = rows.get(user_id)
        if row is None:
            self._stats["not_found"] += 1
            return JSONResponse(
                status_code=404,
                content={"detail": f"no embeddings stored for user {user_id}", "user_id": user_id, "compute": compute},
            )
        written_at_ms = row["written_at_ms"]
        age = None if written_at_ms is None else max(0.0, time.time() - written_at_ms / 1000.0)
        return {
            "user_id": user_id,
            "snapshot_id": row["snapshot_id"],
            "written_at_ms": written_at_ms,
            "age_seconds": age,
            "embeddings": row["embeddings"].astype("float32").tolist(),
            "compute": compute,
        }

    @api.get(
        "/version",
        response_model=VersionResponse,
        responses={503: {"model": ErrorResponse}},
        summary="Snapshot the compute deployment runs",
    )
    async def version(self):
        try:
            info = await asyncio.wait_for(self._compute.version.remote(), timeout=VERSION_TIMEOUT_S)
        except Exception as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
            return JSONResponse(status_code=503, content={"detail": f"compute deployment unavailable: {reason}"})
        return info

    @api.get("/healthz", summary="Liveness of the SOAP client, with async-compute counters")
    async def healthz(self):
        compute = {f"compute_{k}": v for k, v in self._launcher.stats.items()}
        return {"status": "ok", **self._stats, "compute_inflight": self._launcher.inflight, **compute}


# ---------------------------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------------------------
def app_settings(params: "Params", params_file: str | os.PathLike | None = None) -> dict:
    """Constructor settings shared by both deployments (JSON-serialisable)."""
    from sum_platform.config import params_path

    return {
        "workspace": str(params.workspace),
        "params_path": str(Path(params_file).resolve() if params_file else params_path()),
        "max_inflight_compute": int(params.serving.max_inflight_compute),
        "torch_threads": 1,
    }


def compute_user_config(
    params: "Params", snapshot_dir: str | os.PathLike, snapshot_id: str, params_file: str | os.PathLike | None = None
) -> dict:
    """The compute deployment's ``user_config`` for a snapshot (its fingerprint included, so a snapshot
    re-exported under the same id is a config change and gets reloaded)."""
    settings = app_settings(params, params_file)
    return {
        "snapshot_dir": str(Path(snapshot_dir).resolve()),
        "fingerprint": snapshot_fingerprint(snapshot_dir),
        "snapshot_id": str(snapshot_id),
        "workspace": settings["workspace"],
        "params_path": settings["params_path"],
    }


def _source_digest(*packages: str) -> str:
    digest = hashlib.sha256()
    for pkg in packages:
        for path in sorted((_PROJECT_ROOT / pkg).rglob("*.py")):
            digest.update(str(path.relative_to(_PROJECT_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version(kind: str, settings: dict) -> str:
    """Deployment code version: changes with the code a replica runs or its constructor settings,
    never with ``user_config`` (so a snapshot change is an in-place reconfigure)."""
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
) -> "Application":
    """Builds the SOAP application serving ``snapshot_id``.

    Args:
        params: Platform params (workspace, ``serving`` section).
        snapshot_dir: The snapshot directory the compute deployment loads.
        snapshot_id: Its id (must match its manifest).
        params_file: The params file replicas load; defaults to ``SUM_PARAMS`` / the project's file.

    Returns:
        The bound application (ingress :class:`SoapIngress` -> :class:`ComputeCenter`).
    """
    settings = app_settings(params, params_file)
    user_config = compute_user_config(params, snapshot_dir, snapshot_id, params_file)
    max_inflight = settings["max_inflight_compute"]
    # Pinned code versions go through Deployment.options(version=..., _internal=True): the public
    # `version` option was removed from Ray Serve, and without it every deploy replaces every replica.
    compute = ComputeCenter.options(  # type: ignore[attr-defined]
        user_config=user_config,
        # Room for every in-flight compute call of the ingress plus /version calls.
        max_ongoing_requests=max_inflight + 16,
    ).options(version=code_version("compute", settings), _internal=True)
    ingress = SoapIngress.options(  # type: ignore[attr-defined]
        version=code_version("ingress", settings), _internal=True
    )
    return ingress.bind(compute.bind(settings), settings)
