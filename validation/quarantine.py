"""Quarantine of a day's partitions that failed the data gate: moved aside, never deleted.

Layout::

    <ws>/quarantine/ds=YYYY-MM-DD/<stamp>/events/*.parquet   the day's events partition as it arrived
    <ws>/quarantine/ds=YYYY-MM-DD/<stamp>/users/*.parquet    the day's users partition as it arrived
    <ws>/quarantine/ds=YYYY-MM-DD/<stamp>/reason.json        why (failed checks), when, what moved where

``<stamp>`` is the UTC time of the quarantine (``YYYYMMDDTHHMMSS.ffffffZ``), so every failed attempt of a
date keeps its own folder. A partition is moved with a rename (atomic on one filesystem): the data folder
of the date is then absent, which is what lets a rerun of the date ingest a fixed partition (see
``sum_pipeline.tasks.ingest``). ``reason.json`` is written before anything moves (``status: moving``)
and completed after (``status: quarantined``), so an interrupted quarantine is visible and a second call
simply moves whatever is still in place into a new folder: quarantining is rerun-safe and loses nothing.

:func:`release_partition` moves a quarantined pair back (an operator's override of a false alarm).
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from sum_platform.files import read_json, write_json
from sum_platform.workspace import Workspace, ds_str

log = logging.getLogger(__name__)

KINDS = ("events", "users")
REASON_FILE = "reason.json"


def _workspace(ws: Workspace | str | os.PathLike) -> Workspace:
    return ws if isinstance(ws, Workspace) else Workspace(Path(ws))


def _partition_dir(ws: Workspace, kind: str, ds: str) -> Path:
    return ws.events_dir(ds) if kind == "events" else ws.users_dir(ds)


def _new_folder(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder, n = base / stamp, 1
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1
            folder = base / f"{stamp}-{n}"


def _files(folder: Path) -> list[dict[str, Any]]:
    return [{"name": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def reason_from_error(err: Any) -> dict[str, Any]:
    """The ``reason`` of a :class:`validation.data_checks.DataValidationError`: failed checks per partition."""
    reports = getattr(err, "reports", None) or []
    docs = next((r.data_docs_index for r in reports if getattr(r, "data_docs_index", None)), None)
    return {
        "summary": "data validation failed",
        "failed_checks": {r.kind: list(r.failed) for r in reports if not r.success},
        "warnings": {r.kind: list(r.warnings) for r in reports if getattr(r, "warnings", None)},
        "data_docs": docs,
        "message": str(err),
    }


def quarantine_partition(ws: Workspace | str | os.PathLike, ds: str, reason: str | Mapping[str, Any]) -> Path:
    """Moves the day's events and users partitions to ``ws.quarantine_dir(ds)/<stamp>/`` with a ``reason.json``.

    Nothing is deleted. Partitions that are absent (e.g. a missing users folder, itself the failure) are
    listed under ``absent``. Rerun-safe: calling it again moves whatever is still in place into a new
    stamped folder and never touches an earlier quarantine.

    Args:
        ws: The workspace (or its root path).
        ds: The logical date.
        reason: Why: a message, or a mapping (e.g. :func:`reason_from_error`: failed checks per partition).

    Returns:
        The new quarantine folder.
    """
    ws, ds = _workspace(ws), ds_str(ds)
    folder = _new_folder(ws.quarantine_dir(ds))
    record: dict[str, Any] = {
        "ds": ds,
        "quarantined_at": datetime.now(timezone.utc).isoformat(),
        "status": "moving",
        "reason": dict(reason) if isinstance(reason, Mapping) else {"summary": str(reason)},
        "moved": {},
        "absent": [],
    }
    write_json(folder / REASON_FILE, record)
    for kind in KINDS:
        source = _partition_dir(ws, kind, ds)
        if not source.exists():
            record["absent"].append(kind)
            continue
        target = folder / kind
        shutil.move(str(source), str(target))  # a rename on the same filesystem
        record["moved"][kind] = {"from": str(source.relative_to(ws.root)), "to": str(target.relative_to(ws.root)),
                                 "files": _files(target)}
    record["status"] = "quarantined"
    write_json(folder / REASON_FILE, record)
    log.warning("ds=%s quarantined to %s (moved: %s; absent: %s)", ds, folder, sorted(record["moved"]) or "none",
                record["absent"] or "none")
    return folder


def quarantined(ws: Workspace | str | os.PathLike, ds: str | None = None) -> list[dict[str, Any]]:
    """The quarantine records (``reason.json`` plus ``folder``) of one date or of all dates, oldest first."""
    ws = _workspace(ws)
    base = ws.root / "quarantine"
    pattern = f"ds={ds_str(ds)}/*/{REASON_FILE}" if ds else f"ds=*/*/{REASON_FILE}"
    out = []
    for path in sorted(base.glob(pattern)):
        try:
            record = read_json(path)
        except (OSError, ValueError) as err:
            record = {"status": f"unreadable reason.json: {err}"}
        out.append(record | {"folder": str(path.parent)})
    return out


def release_partition(
    ws: Workspace | str | os.PathLike,
    ds: str,
    folder: str | os.PathLike | None = None,
    actor: str = "operator",
    reason: str = "",
) -> Path:
    """Moves a quarantined pair back into place (an operator's decision that the data is good after all).

    Args:
        ws: The workspace.
        ds: The logical date.
        folder: The quarantine folder to release (default: the latest of ``ds``).
        actor: Who released it (recorded).
        reason: Why (recorded).

    Returns:
        The released quarantine folder (left in place, with ``released_at`` in its ``reason.json``).

    Raises:
        FileExistsError: A partition of ``ds`` is in place already (nothing is overwritten).
        LookupError: No quarantine of ``ds``.
    """
    ws, ds = _workspace(ws), ds_str(ds)
    if folder is None:
        records = [r for r in quarantined(ws, ds) if r.get("status") == "quarantined"]
        if not records:
            raise LookupError(f"no quarantined partitions for ds={ds} (released ones are not released again)")
        folder = records[-1]["folder"]
    folder = Path(folder)
    moves = [(folder / kind, _partition_dir(ws, kind, ds)) for kind in KINDS if (folder / kind).exists()]
    if not moves:
        raise LookupError(f"{folder} holds no partition to release")
    for _, target in moves:
        if target.exists():
            raise FileExistsError(f"{target} exists; move it away before releasing {folder}")
    for source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
    reason_path = folder / REASON_FILE
    record = read_json(reason_path) if reason_path.exists() else {}
    record["released_at"] = datetime.now(timezone.utc).isoformat()
    record["released_by"], record["release_reason"] = actor, reason
    record["status"] = "released"
    write_json(reason_path, record)
    log.warning("ds=%s released from quarantine %s", ds, folder)
    return folder
