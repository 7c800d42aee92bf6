"""SOAP (paper §4): the SUM Online Asynchronous Platform as a Ray Serve application.

:func:`build_app` binds the two deployments: the ingress :class:`serving.ingress.SoapIngress` (the HTTP
server of the read path, in four modes, with fire-and-forget compute calls) and :class:`serving.compute.ComputeCenter` (the production
and frozen user towers, the pooled write-back), configured from ``params.serving`` by
:mod:`serving.settings`.

Deployment code versions are pinned to a hash of the source code and constructor settings
(:func:`serving.settings.code_version`), so redeploying with another ``user_config`` reconfigures the
running replicas in place instead of replacing them (Ray Serve gives every ``serve.run`` a random code
version otherwise). The store the replicas read (:func:`serving.settings.store_location`) is part of both
``user_config`` s, so serving another workspace (or params file) is such a reconfigure as well.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from serving.compute import ComputeCenter
from serving.ingress import SoapIngress
from serving.settings import app_settings, code_version, compute_user_config, ingress_user_config, store_location

if TYPE_CHECKING:
    from ray.serve.deployment import Application

    from sum_platform.config import Params

__all__ = ["build_app"]


def build_app(
    params: "Params",
    snapshot_dir: str | os.PathLike,
    snapshot_id: str,
    params_file: str | os.PathLike | None = None,
    *,
    frozen: tuple[str | os.PathLike, str] | None = None,
    compute_options: dict | None = None,
    ingress_options: dict | None = None,
) -> "Application":
    """Builds the SOAP application serving ``snapshot_id``.

    Args:
        params: Platform params (workspace, ``serving`` section).
        snapshot_dir: The snapshot directory the compute deployment loads.
        snapshot_id: Its id (must match its manifest).
        params_file: The params file replicas load; defaults to ``SUM_PARAMS`` / the project's file.
        frozen: ``(dir, id)`` of the snapshot frozen mode uses (default: ``snapshot_id``).
        compute_options: Overrides of the compute ``user_config`` (:func:`serving.settings.compute_user_config`).
        ingress_options: Overrides of the ingress ``user_config`` (:func:`serving.settings.ingress_user_config`).

    Returns:
        The bound application (ingress :class:`serving.ingress.SoapIngress` -> :class:`serving.compute.ComputeCenter`).
    """
    settings = app_settings(params)
    user_config = compute_user_config(
        params, snapshot_dir, snapshot_id, params_file, frozen=frozen, **(compute_options or {})
    )
    # The ingress opens the same store as the compute (SoapIngress.reconfigure); /version reports the rest.
    ingress_config = {**ingress_user_config(params, **(ingress_options or {})), **store_location(params, params_file)}
    max_inflight = settings["max_inflight_compute"]
    # Per-request access log lines cost the read path CPU at every read; the metrics count requests.
    logging_config = {"enable_access_log": bool(params.serving.access_log)}
    # Pinned code versions go through Deployment.options(version=..., _internal=True): the public
    # `version` option was removed from Ray Serve, and without it every deploy replaces every replica.
    placement = _placement(params)
    compute = ComputeCenter.options(  # type: ignore[attr-defined]
        user_config=user_config,
        **placement["compute"],
        # Room for every in-flight compute call of the ingress plus /version calls.
        max_ongoing_requests=max(max_inflight, int(user_config["max_batch_size"])) + 16,
        logging_config=logging_config,
    ).options(version=code_version("compute", settings), _internal=True)
    ingress = SoapIngress.options(  # type: ignore[attr-defined]
        user_config=ingress_config,
        **placement["ingress"],
        logging_config=logging_config,
    ).options(version=code_version("ingress", settings), _internal=True)
    return ingress.bind(compute.bind(settings), settings)


#: Ray's resource of the head node (one per cluster): what keeps the ingress (the HTTP listener) there.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def _placement(params: "Params") -> dict[str, dict]:
    """Replica counts and placement of the two deployments.

    ``serving.compute_replicas`` compute replicas; on a cluster with worker nodes (``ray.worker_nodes``) at most
    one per node, so they spread over the hosts (paper §6: the compute runs on other hosts than the read path),
    and the ingress, whose replica is the HTTP server, stays on the head (the address ``serving.host`` names).
    """
    compute: dict = {"num_replicas": int(params.serving.compute_replicas)}
    ingress: dict = {}
    if params.ray.worker_nodes > 0:
        compute["max_replicas_per_node"] = 1
        own = dict(SoapIngress.ray_actor_options or {})
        ingress["ray_actor_options"] = {**own, "resources": {**own.get("resources", {}), HEAD_NODE_RESOURCE: 0.001}}
    return {"compute": compute, "ingress": ingress}
