"""The audit trail, versioned with the workspace: who promoted what and why survives the loss of the disk.

The registry (lineage, stages, approvals, the events log), the day records (``runs/``) and the quarantine
(partitions moved aside, with their ``reason.json``) are working state, written all day by tasks and
operators. At every promotion and rollback (:mod:`sum_pipeline.promotion`, under its lock) they are copied into
``audit/`` - the registry as a consistent SQLite backup, the two folders mirrored file by file - and ``audit`` is
``dvc add``-ed, ``dvc push``-ed and its ``audit.dvc`` committed like any partition; then the workspace's git
history goes to its backup (:func:`sum_platform.versioning.push_backup`). Unchanged files are neither copied nor
uploaded again (DVC stores a folder file by file), so a promotion pays for what changed since the last one.

Layout (``audit/`` is DVC-tracked; the working state is where the platform reads it)::

    audit/registry.sqlite   <- registry/registry.db  (Registry.backup)
    audit/runs/...          <- runs/...              (the day records)
    audit/quarantine/...    <- quarantine/...        (partitions moved aside and their reasons)

:func:`restore_working_state` puts them back (``sumctl restore``, :mod:`sum_pipeline.restore`). What happened
after the last promotion or rollback (a hold, a quarantine of a later day) is in the next one's push.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sum_platform.registry import Registry
from sum_platform.versioning import push_backup, track_paths
from sum_platform.workspace import Workspace

__all__ = ["AUDIT_DIR", "MIRRORED", "REGISTRY_BACKUP", "restore_working_state", "save_audit_trail"]

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"
REGISTRY_BACKUP = "registry.sqlite"
MIRRORED = ("runs", "quarantine")
"""Working-state folders copied whole into ``audit/``."""


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by relative path, leaving out hidden ones (a writer's temporary files)."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _mirror(src: Path, dst: Path) -> dict[str, int]:
    """Makes ``dst`` hold exactly the files of ``src``: changed ones copied (temporary + rename), vanished ones
    removed from the copy (their earlier versions stay in the history of ``audit.dvc``)."""
    have, want = _files(dst), _files(src)
    copied = removed = 0
    for rel, path in want.items():
        target = dst / rel
        if rel in have and filecmp.cmp(path, target, shallow=True):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            shutil.copy2(path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        copied += 1
    for rel in sorted(set(have) - set(want)):
        (dst / rel).unlink()
        removed += 1
    for folder in sorted((p for p in dst.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return {"files": len(want), "copied": copied, "removed": removed}


def save_audit_trail(ws: Workspace, message: str) -> dict[str, Any]:
    """Copies the registry, the day records and the quarantine into ``audit/``, versions and pushes it, and
    pushes the workspace's git history to its backup. Rerun-safe: nothing changed, nothing committed (the pushes
    still run, so a previous failed one is completed).

    Call it under the promotion lock, after the registry changed: the copy is the registry as promoted.

    Returns:
        ``{"commit": sha or None, "registry": events count, "runs"|"quarantine": mirror counts, "backup": url}``.

    Raises:
        VersioningError: ``dvc add``/``push`` or the git push failed (a full disk says so, with where and the free
            space); what was pushed before stays.
    """
    audit = ws.root / AUDIT_DIR
    audit.mkdir(parents=True, exist_ok=True)
    for stale in audit.rglob(".*.tmp"):  # a copy killed half-way: ours, and never to be versioned
        stale.unlink()
    out: dict[str, Any] = {}
    if ws.registry_db.exists():
        registry = Registry(ws.registry_db)
        registry.backup(audit / REGISTRY_BACKUP)
        out["registry"] = len(registry.events())
    for name in MIRRORED:
        out[name] = _mirror(ws.root / name, audit / name)
    out["commit"] = track_paths(ws.root, [audit], message)
    out["backup"] = push_backup(ws.root)
    log.info("audit trail saved: %s", out)
    return out


def restore_working_state(ws: Workspace) -> dict[str, Any]:
    """Puts ``audit/`` (checked out from the workspace's history and the remote) back where the platform reads
    it: the registry from its backup, the day records and the quarantine copied back. Writes only into folders
    that are absent or empty (a restore never overwrites working state).

    Raises:
        FileNotFoundError: ``audit/`` holds no registry backup (the history predates the audit trail).
        FileExistsError: A target already holds files.
    """
    audit = ws.root / AUDIT_DIR
    backup = audit / REGISTRY_BACKUP
    if not backup.exists():
        raise FileNotFoundError(f"{backup} is missing: this workspace's history has no audit trail to restore "
                                "(it was last promoted before the audit trail was versioned)")
    targets = [ws.registry_db, *(ws.root / name for name in MIRRORED)]
    occupied = [str(t) for t in targets if t.exists() and (t.is_file() or any(t.iterdir()))]
    if occupied:
        raise FileExistsError(f"will not overwrite working state: {occupied} already exist (move them aside first)")
    registry = Registry.restore(backup, ws.registry_db)
    out: dict[str, Any] = {"snapshots": len(registry.list()), "events": len(registry.events())}
    for name in MIRRORED:
        out[name] = _mirror(audit / name, ws.root / name)["files"]
    log.info("working state restored from %s: %s", audit, out)
    return out
