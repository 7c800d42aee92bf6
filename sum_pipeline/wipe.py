"""Deleting a workspace (``--fresh``) only when nothing is lost by it.

A folder is deleted only when it is a SUM workspace (its marker, :data:`sum_platform.workspace.MARKER`) or
empty, and only when it holds no promotion (the registry's promoted snapshots, GTO's promotion tags) and no
stack runs from it, unless the command made the workspace for itself (its marker's purpose: ``demo`` for
``make run``, ``soak`` for ``sumctl soak``; that command may stop the stack and recreate it) or the operator
says ``--force-wipe``. A local DVC remote goes with the workspace only when its record
(:data:`sum_platform.workspace.REMOTE_MARKER`) says it was created for this workspace and no other live
workspace uses it; every other remote is kept, and said so. Nothing is deleted with errors ignored: what
could not be deleted is reported.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sum_pipeline.stack import Stack
from sum_platform.config import Params
from sum_platform.versioning import VersioningError, list_promotions
from sum_platform.workspace import REMOTE_MARKER, Workspace, is_local, remote_claims

#: The flag that deletes a workspace which holds promotions or runs a stack.
FORCE_FLAG = "--force-wipe"


class WipeRefused(RuntimeError):
    """The workspace is not deleted; the message names it, what it holds and what overrides."""


class WipeIncomplete(RuntimeError):
    """Some files could not be deleted; the message lists each with its error."""


@dataclass
class Holdings:
    """What deleting a workspace would lose or pull from under a running process."""

    promoted: list[str] = field(default_factory=list)  # registry: every snapshot that has been production
    production: str | None = None
    tags: list[str] = field(default_factory=list)  # GTO's version tags of promoted snapshots
    processes: list[psutil.Process] = field(default_factory=list)  # the workspace's live stack
    unreadable: list[str] = field(default_factory=list)  # what could not be checked (counts as held)

    @property
    def empty(self) -> bool:
        return not (self.promoted or self.production or self.tags or self.processes or self.unreadable)

    def describe(self) -> str:
        """E.g. ``3 promotions (production sum-2026-01-03), 3 GTO promotion tags; a running stack: 12 processes``."""
        parts = []
        if self.promoted or self.production:
            n = len(self.promoted)
            parts.append(f"{n} promotion{'s' if n != 1 else ''} (production {self.production or 'none'})")
        if self.tags:
            parts.append(f"{len(self.tags)} GTO promotion tag{'s' if len(self.tags) != 1 else ''} "
                         f"({', '.join(self.tags[-3:])})")
        held = ", ".join(parts)
        if self.processes:
            held += ("; " if held else "") + f"a running stack: {len(self.processes)} processes " \
                    f"(pids {', '.join(str(p.pid) for p in sorted(self.processes, key=lambda q: q.pid)[:8])}" \
                    f"{', ...' if len(self.processes) > 8 else ''})"
        if self.unreadable:
            held += ("; " if held else "") + "unchecked: " + "; ".join(self.unreadable)
        return held or "nothing"


def _registry_promotions(db: Path) -> tuple[list[str], str | None]:
    """Promoted snapshots and the production one, read without writing a byte (SQLite read-only)."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT snapshot_id, stage FROM snapshots "
                           "WHERE promoted_at IS NOT NULL OR stage = 'production' ORDER BY promoted_at").fetchall()
    finally:
        con.close()
    return [r[0] for r in rows], next((r[0] for r in rows if r[1] == "production"), None)


def holdings(p: Params, ws: Workspace) -> Holdings:
    """The workspace's promotions (registry and GTO tags) and its stack's live processes; reads only."""
    held = Holdings()
    if ws.registry_db.is_file():
        try:
            held.promoted, held.production = _registry_promotions(ws.registry_db)
        except sqlite3.Error as exc:
            held.unreadable.append(f"registry {ws.registry_db}: {exc}")
    if (ws.root / ".git").exists():
        try:
            held.tags = [promo.tag for promo in list_promotions(ws.root)]
        except VersioningError as exc:
            held.unreadable.append(f"GTO tags in {ws.root}: {exc}")
    held.processes = Stack(p, ws).live_processes()
    return held


def guard(p: Params, ws: Workspace, *, own: str, wiping: bool, force: bool = False) -> Holdings:
    """Checks that a command may delete (``wiping``) or drive its drills in ``ws``; returns what it holds.

    Args:
        own: The marker purpose of the workspaces this command makes for itself (``demo``, ``soak``): one of
            those is recreated (its stack stopped first) without ``--force-wipe``.
        wiping: The command deletes the workspace (``--fresh``); else it only runs in it (``soak``).
        force: ``--force-wipe``: delete a workspace that holds promotions or runs a stack.

    Raises:
        WipeRefused: The folder is not a SUM workspace and not empty, or it holds a promotion or a running
            stack (the message names the folder, what it holds and the flag that overrides).
    """
    root = ws.root
    if not root.exists():
        return Holdings()
    if not root.is_dir():
        raise WipeRefused(f"{root} is a file, not a workspace folder")
    if ws.identity() is None:
        if not any(root.iterdir()):
            return Holdings()
        raise WipeRefused(f"{root} is not a SUM workspace (no {ws.marker.name}) and is not empty: sumctl deletes "
                          f"or writes into only a folder it can name. Choose another --workspace, or move the "
                          f"folder away yourself if it is yours.")
    held = holdings(p, ws)
    if held.empty or ws.purpose() == own or (wiping and force):
        return held
    what = held.describe()
    if wiping:
        raise WipeRefused(f"refusing to delete the workspace {root} ({ws.purpose()}): it holds {what}. "
                          + (f"`sumctl down --workspace {root}` stops the stack; " if held.processes else "")
                          + f"{FORCE_FLAG} deletes it anyway" + (" (stopping the stack first)" if held.processes else "")
                          + ", or choose another --workspace.")
    raise WipeRefused(f"refusing to run in the workspace {root} ({ws.purpose()}): it holds {what}. This command "
                      f"runs only in a workspace of its own (marker purpose {own!r}) or one that holds nothing; "
                      f"leave out --workspace for its default one.")


def _remote_kept(remote: str, ws: Workspace) -> str | None:
    """Why the local remote ``remote`` stays when ``ws`` is deleted, or None: it goes with ``ws``."""
    if not is_local(remote):
        return f"kept the DVC remote {remote}: not a local folder"
    folder = Path(remote).resolve()
    if not folder.exists() or folder.is_relative_to(ws.root.resolve()):
        return None
    claims, ident = remote_claims(str(folder)), ws.identity()
    if not claims:
        return f"kept the DVC remote {folder}: no {REMOTE_MARKER} says it was created for this workspace"
    if claims.get("created_for") != ident:
        return f"kept the DVC remote {folder}: it was not created for this workspace ({REMOTE_MARKER})"
    others = sorted(root for other, root in (claims.get("workspaces") or {}).items()
                    if other != ident and Workspace(Path(root)).identity() == other)
    if others:
        return f"kept the DVC remote {folder}: also used by {', '.join(others)}"
    return None


def _delete(path: Path, failures: list[str]) -> None:
    def failed(_func, where, exc_info) -> None:
        failures.append(f"{where}: {exc_info[1]}")

    shutil.rmtree(path, onerror=failed)


def wipe(p: Params, ws: Workspace) -> list[str]:
    """Deletes the workspace and the local DVC remotes created for it alone (after :func:`guard`).

    The remotes considered are the one the workspace's DVC config names and the one the params give it.

    Returns:
        One line per thing deleted or kept (and why).

    Raises:
        WipeIncomplete: Files that could not be deleted, each with its error.
    """
    remotes = list(dict.fromkeys(r for r in (ws.dvc_remote(), p.dvc_remote) if r))
    verdicts = [(r, _remote_kept(r, ws)) for r in remotes]  # decided while the workspace's marker exists
    failures: list[str] = []
    done = []
    if ws.root.exists():
        _delete(ws.root, failures)
        if failures:  # a workspace half deleted keeps its remotes: they may be all that is left of it
            raise WipeIncomplete(_listed(failures) + "\n(its DVC remotes were left alone)")
        done.append(f"deleted the workspace {ws.root}")
    for remote, kept in verdicts:
        if kept:
            done.append(kept)
        elif Path(remote).exists():
            _delete(Path(remote), failures)
            done.append(f"deleted its DVC remote {remote}")
    if failures:
        raise WipeIncomplete(_listed(failures))
    return done


def _listed(failures: list[str]) -> str:
    return ("could not delete:\n  " + "\n  ".join(failures[:50])
            + (f"\n  ... and {len(failures) - 50} more" if len(failures) > 50 else ""))
