"""``sumctl restore``: rebuilds a lost workspace from its git history and the DVC remote.

Every promotion and rollback pushes the audit trail (:mod:`sum_platform.audit_trail`) to the DVC remote and the
workspace's git history (``main``, the GTO tags, the committed identity marker) to its backup, by default a bare
repository inside a local remote (``<remote>/workspaces/<identity>.git``). So the remote folder alone is enough:

1. ``git clone`` the history (the remote's backup, or ``--git <url>``: any clone of the workspace's repository)
   into a hidden sibling of the workspace folder (which must be absent or empty); steps 2-4 run there and the
   folder is renamed into place at the end, so a failed restore leaves nothing half-done;
2. :func:`~sum_platform.versioning.init_workspace_repo`: the local git identity, the DVC remote in force (a remote
   that moved is re-pointed and committed), the ignores; the marker keeps the workspace's identity;
3. ``dvc pull``: partitions, promoted snapshots and ``audit/``;
4. the registry from ``audit/registry.sqlite``, the day records and the quarantine copied back;
5. the online store (a cache): the last daily batch is embedded again with the production snapshot (online and
   into the offline log, so every user the batch wrote has a row: the offline log of served rows,
   ``data/embeddings``, is not versioned and pooling over versions restarts there), then ``rebuild-online``
   refills every day's features. The day records stay exactly as audited. ``online=False`` skips this and names
   the commands instead.

Not restored (rebuilt by the commands that own them): the Airflow DB and logs (``airflow/``, run history),
GX's Data Docs (``gx/``), the stack's state (``stack/``: ``sumctl up`` starts a new stack). What happened after
the last promotion or rollback (a hold, a later quarantine) was on the lost disk only.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from sum_pipeline import tasks
from sum_pipeline.online_rebuild import rebuild_online_store
from sum_platform.audit_trail import restore_working_state
from sum_platform.context import Context, context
from sum_platform.feature_store import apply_definitions
from sum_platform.files import replace_atomically
from sum_platform.versioning import (BACKUPS_DIR, backup_marker, clone_workspace, init_workspace_repo, list_backups,
                                     pull_all)
from sum_platform.workspace import Workspace

__all__ = ["RestoreError", "find_backup", "restore_workspace"]

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
    """The restore cannot start (no backup, several, a folder in the way) or a step failed; says which."""


def find_backup(remote_url: str, identity: str | None = None) -> str:
    """The bare repository of the workspace to restore, among those backed up in a local DVC remote.

    Raises:
        RestoreError: None there, ``identity`` not among them, or several and no ``identity`` (each is named
            with the folder it was made in).
    """
    backups = list_backups(remote_url)
    if identity is not None:
        if identity not in backups:
            raise RestoreError(f"no workspace {identity} backed up in {remote_url}/{BACKUPS_DIR}; backed up: "
                               f"{_describe(backups) or 'none'}")
        return str(backups[identity])
    if not backups:
        where = f"{remote_url}/{BACKUPS_DIR}" if "://" not in remote_url else remote_url
        raise RestoreError(f"no workspace history backed up in {where}: give the workspace's git with --git <url> "
                           "(a URL remote keeps none: add a `sum-backup` git remote to the workspace)")
    if len(backups) > 1:
        raise RestoreError(f"{len(backups)} workspaces are backed up in {remote_url}/{BACKUPS_DIR}: choose one with "
                           f"--identity: {_describe(backups)}")
    return str(next(iter(backups.values())))


def _describe(backups: dict[str, Path]) -> str:
    """``<identity> (made at <root>, <purpose>)`` per backup, read from each one's committed marker."""
    out = []
    for identity, repo in backups.items():
        marker = backup_marker(repo)
        out.append(f"{identity} (made at {marker.get('root', '?')}, {marker.get('purpose', '?')})")
    return "; ".join(out)


def restore_workspace(ctx: Context, *, source: str | None = None, identity: str | None = None,
                      online: bool = True) -> dict[str, Any]:
    """Rebuilds the workspace of ``ctx`` (absent or empty) from its git history and the DVC remote (see the
    module docstring for the steps).

    Args:
        ctx: The params in force and the workspace to rebuild; ``context()`` must name the same workspace (the
            online repair runs the daily tasks, which read it).
        source: A git URL or path of the workspace's history; default: its backup in the DVC remote.
        identity: Which workspace, when the remote backs up several.
        online: Rebuild the online store and the last daily batch (else the report names the commands).

    Returns:
        What was restored: the source, identity, commit, restored counts, the online repair and the seconds taken.

    Raises:
        RestoreError: See :func:`find_backup`; the folder is not empty; the history has no audit trail.
        VersioningError: git or ``dvc pull`` failed (an object missing from the remote is named).
    """
    start = time.perf_counter()
    root = ctx.ws.root
    if online and context().ws.root != root:
        raise RestoreError(f"the workspace in force ({context().ws.root}) is not {root}: set SUM_WORKSPACE")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise RestoreError(f"cannot restore into {root}: it exists and is not empty (a restore writes only into a "
                           "folder it creates; move it aside first)")
    remote_url = ctx.params.dvc_remote
    source = source or find_backup(remote_url, identity)
    log.info("restoring %s from %s and the DVC remote %s", root, source, remote_url)
    # Built in a hidden sibling and renamed into place: a failed restore (a remote that lacks an object) leaves the
    # target as it was and removes only the folder it made (a killed one leaves that hidden sibling behind).
    staging = Workspace(root.with_name(f".{root.name}.restoring-{uuid.uuid4().hex[:8]}"))
    try:
        clone_workspace(source, staging.root)
        init_workspace_repo(staging.root, remote_url)
        restored_identity = staging.identity()
        if identity is not None and restored_identity != identity:
            raise RestoreError(f"{source} holds workspace {restored_identity}, not {identity}")
        pull_all(staging.root)
        try:
            state = restore_working_state(staging)
        except (FileNotFoundError, FileExistsError) as exc:
            raise RestoreError(str(exc)) from exc
        if root.exists():
            root.rmdir()  # empty, checked above
        staging.root.rename(root)
    except BaseException:
        shutil.rmtree(staging.root, ignore_errors=True)
        raise
    prod = ctx.registry.production()
    out: dict[str, Any] = {"workspace": str(root), "source": source, "identity": restored_identity,
                           "production": prod.snapshot_id if prod else None, "restored": state}
    out["online"] = _repair_online(ctx) if online else {"skipped": True, "next": _online_commands(ctx)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    log.info("workspace restored: %s", out)
    return out


def _last_batch(ctx: Context) -> tuple[Path, str] | None:
    """The last daily batch's record and its date (what doctor compares the online rows with)."""
    records = sorted(ctx.ws.root.glob("runs/*/materialize.json"))
    if not records:
        return None
    return records[-1], json.loads(records[-1].read_text())["ds"]


def _online_commands(ctx: Context) -> list[str]:
    batch = _last_batch(ctx)
    commands = ["sumctl rebuild-online"]
    if batch is not None:
        commands.append(f"sumctl stage materialize_embeddings --ds {batch[1]}")
    return commands


def _repair_online(ctx: Context) -> dict[str, Any]:
    """Embeds the last batch's users again with the production snapshot (online and into the offline log), then
    refills the online store from the offline store (every day's features, the rows just logged); the day's record
    is put back as audited (the repair is reported here, not in the history)."""
    out: dict[str, Any] = {}
    batch = _last_batch(ctx)
    if batch is not None and ctx.registry.production() is not None:
        record, ds = batch
        audited = record.read_bytes()
        apply_definitions(ctx.params)
        try:
            out["batch"] = tasks.materialize_embeddings(ds)
        finally:
            with replace_atomically(record) as tmp:
                tmp.write_bytes(audited)
    try:
        out["rebuilt"] = rebuild_online_store(ctx)
    except FileNotFoundError as exc:  # no users partition: nothing was ever served from this workspace
        out["rebuilt"] = {"skipped": str(exc)}
    return out
