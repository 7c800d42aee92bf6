"""Snapshot registry: each snapshot's stage and lineage record, in one SQLite file of the workspace.

Stages: ``candidate`` (trained, not judged or judged and awaiting promotion), ``held`` (the gate refused
it), ``production`` (at most one), ``retired`` (was production). Promotion is one SQLite transaction
(retire the old production, promote the new, append to the audit log), so a crash leaves either the old
or the new state, never both or neither. Every change is appended to ``events`` (who, when, why).
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

STAGES = ("candidate", "held", "production", "retired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id TEXT PRIMARY KEY,
    ds          TEXT NOT NULL,
    stage       TEXT NOT NULL CHECK (stage IN ('candidate', 'held', 'production', 'retired')),
    parent_id   TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    promoted_at TEXT,
    promoted_by TEXT,
    record      TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS one_production ON snapshots(stage) WHERE stage = 'production';
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    snapshot_id TEXT NOT NULL,
    action      TEXT NOT NULL,
    actor       TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '{}'
);
"""


class RegistryError(RuntimeError):
    """An operation the registry refuses (unknown snapshot, wrong stage)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SnapshotRecord:
    """One row of the registry."""

    snapshot_id: str
    ds: str
    stage: str
    parent_id: str | None
    created_at: str
    updated_at: str
    promoted_at: str | None
    promoted_by: str | None
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Registry:
    """The snapshot registry of one workspace.

    Args:
        path: The SQLite file (created with its folder when missing).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.executescript(_SCHEMA)  # idempotent; executescript manages its own transaction
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @staticmethod
    def _row(row: sqlite3.Row | None) -> SnapshotRecord | None:
        if row is None:
            return None
        d = dict(row)
        d["record"] = json.loads(d["record"] or "{}")
        return SnapshotRecord(**d)

    @staticmethod
    def _log(db: sqlite3.Connection, snapshot_id: str, action: str, actor: str, detail: dict) -> None:
        db.execute(
            "INSERT INTO events(at, snapshot_id, action, actor, detail) VALUES (?, ?, ?, ?, ?)",
            (_now(), snapshot_id, action, actor, json.dumps(detail, default=str)),
        )

    # ---- backup ------------------------------------------------------------------------------
    def backup(self, dest: Path) -> Path:
        """Writes a consistent copy of the registry to ``dest`` (SQLite's online backup, taken while other
        processes may write; a temporary sibling renamed into place, so ``dest`` is whole or as before)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        src = sqlite3.connect(self.path, timeout=30)
        try:
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)
            finally:
                out.close()
            os.replace(tmp, dest)
        finally:
            src.close()
            tmp.unlink(missing_ok=True)
        return dest

    @classmethod
    def restore(cls, backup: Path, path: Path) -> "Registry":
        """A registry at ``path`` rebuilt from a :meth:`backup` file (refused if ``path`` exists: a restore never
        overwrites a registry).

        Raises:
            RegistryError: ``path`` exists, or ``backup`` is not a registry.
        """
        path = Path(path)
        if path.exists():
            raise RegistryError(f"will not restore over the existing registry {path} (move it aside first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(f"file:{Path(backup).resolve()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"snapshots", "events"} <= tables:
                raise RegistryError(f"{backup} is not a registry backup (tables: {sorted(tables)})")
            out = sqlite3.connect(path)
            try:
                src.backup(out)
            finally:
                out.close()
        except sqlite3.DatabaseError as exc:
            path.unlink(missing_ok=True)
            raise RegistryError(f"{backup} is not a readable registry backup: {exc}") from exc
        finally:
            src.close()
        return cls(path)

    # ---- reads -------------------------------------------------------------------------------
    def get(self, snapshot_id: str) -> SnapshotRecord | None:
        with self._tx() as db:
            return self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())

    def production(self) -> SnapshotRecord | None:
        """The snapshot in production, or None before the first promotion."""
        with self._tx() as db:
            return self._row(db.execute("SELECT * FROM snapshots WHERE stage = 'production'").fetchone())

    def promoted_history(self) -> list[SnapshotRecord]:
        """Every snapshot that has been production, most recently promoted first."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM snapshots WHERE promoted_at IS NOT NULL ORDER BY promoted_at DESC, updated_at DESC"
            ).fetchall()
        return [self._row(r) for r in rows]

    def list(self) -> list[SnapshotRecord]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM snapshots ORDER BY ds, snapshot_id").fetchall()
        return [self._row(r) for r in rows]

    def events(self, snapshot_id: str | None = None) -> list[dict[str, Any]]:
        with self._tx() as db:
            if snapshot_id:
                rows = db.execute("SELECT * FROM events WHERE snapshot_id = ? ORDER BY id", (snapshot_id,))
            else:
                rows = db.execute("SELECT * FROM events ORDER BY id")
            return [dict(r) | {"detail": json.loads(r["detail"])} for r in rows.fetchall()]

    # ---- writes ------------------------------------------------------------------------------
    def register_candidate(
        self, snapshot_id: str, ds: str, parent_id: str | None, record: dict[str, Any], actor: str = "pipeline"
    ) -> SnapshotRecord:
        """Adds (or, on a rerun, refreshes) a candidate. A promoted snapshot keeps its stage.

        Args:
            snapshot_id: The candidate's id.
            ds: The date it was trained on.
            parent_id: The snapshot it warm-started from.
            record: Lineage fields to store (merged over any existing record).
            actor: Who registered it.

        Returns:
            The stored record.
        """
        now = _now()
        with self._tx() as db:
            old = self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())
            if old is None:
                db.execute(
                    "INSERT INTO snapshots(snapshot_id, ds, stage, parent_id, created_at, updated_at, record)"
                    " VALUES (?, ?, 'candidate', ?, ?, ?, ?)",
                    (snapshot_id, ds, parent_id, now, now, json.dumps(record, default=str)),
                )
            else:
                stage = old.stage if old.stage in ("production", "retired") else "candidate"
                db.execute(
                    "UPDATE snapshots SET stage = ?, parent_id = ?, updated_at = ?, record = ? WHERE snapshot_id = ?",
                    (stage, parent_id, now, json.dumps(record, default=str), snapshot_id),
                )
            self._log(db, snapshot_id, "register", actor, {"parent_id": parent_id})
            return self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())

    def update_record(self, snapshot_id: str, fields: dict[str, Any]) -> SnapshotRecord:
        """Merges ``fields`` into the snapshot's lineage record."""
        with self._tx() as db:
            row = self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())
            if row is None:
                raise RegistryError(f"unknown snapshot {snapshot_id!r}")
            merged = row.record | fields
            db.execute(
                "UPDATE snapshots SET record = ?, updated_at = ? WHERE snapshot_id = ?",
                (json.dumps(merged, default=str), _now(), snapshot_id),
            )
            return self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())

    def record_verdict(self, snapshot_id: str, blessed: bool, verdict: dict[str, Any], actor: str = "gate") -> SnapshotRecord:
        """Stores the gate's verdict; a refused candidate becomes ``held``. A promoted one keeps its stage."""
        with self._tx() as db:
            row = self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())
            if row is None:
                raise RegistryError(f"unknown snapshot {snapshot_id!r}")
            stage = row.stage
            if stage in ("candidate", "held"):
                stage = "candidate" if blessed else "held"
            merged = row.record | {"verdict": verdict}
            db.execute(
                "UPDATE snapshots SET stage = ?, record = ?, updated_at = ? WHERE snapshot_id = ?",
                (stage, json.dumps(merged, default=str), _now(), snapshot_id),
            )
            self._log(db, snapshot_id, "bless" if blessed else "hold", actor, {"reasons": verdict.get("reasons", [])})
            return self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())

    def promote(self, snapshot_id: str, actor: str = "pipeline", reason: str = "", force: bool = False) -> SnapshotRecord:
        """Makes ``snapshot_id`` the production snapshot, atomically.

        Args:
            snapshot_id: A blessed candidate (or any known snapshot with ``force``).
            actor: Who promotes (recorded).
            reason: Why (recorded; required in spirit for ``force``).
            force: Promote even a held or retired snapshot (manual override).

        Returns:
            The promoted record. Promoting the current production snapshot is a no-op.
        """
        with self._tx() as db:
            row = self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())
            if row is None:
                raise RegistryError(f"unknown snapshot {snapshot_id!r}")
            if row.stage == "production":
                return row
            if row.stage != "candidate" and not force:
                raise RegistryError(f"snapshot {snapshot_id!r} is {row.stage}; only a blessed candidate can be promoted")
            now = _now()
            db.execute("UPDATE snapshots SET stage = 'retired', updated_at = ? WHERE stage = 'production'", (now,))
            db.execute(
                "UPDATE snapshots SET stage = 'production', promoted_at = ?, promoted_by = ?, updated_at = ?"
                " WHERE snapshot_id = ?",
                (now, actor, now, snapshot_id),
            )
            self._log(db, snapshot_id, "promote", actor, {"reason": reason, "force": force, "from_stage": row.stage})
            return self._row(db.execute("SELECT * FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone())
