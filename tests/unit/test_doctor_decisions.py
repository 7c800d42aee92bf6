"""doctor's decisions: serving is compared only with this workspace's own app, a busy SQLite store is not damage,
and its shell repairs quote the workspace path.

Whose app answered is a pure function of the served ``/version`` payload and the workspace's identity; the
deployed-stack test proves it end to end."""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from sum_pipeline.doctor import _busy, _in_ws, serving_owner

MINE = "3f0c-mine"


def test_the_app_of_this_workspace_is_compared():
    assert serving_owner({"snapshot_id": "sum-2026-01-02", "workspace_id": MINE}, MINE) is None


@pytest.mark.parametrize("body, identity, says", [
    ({"snapshot_id": "sum-2026-01-02", "workspace_id": "9a9a-theirs"}, MINE, "belongs to another workspace (9a9a-theirs)"),
    ({"snapshot_id": "sum-2026-01-02"}, MINE, "reports no workspace identity"),
    ({"snapshot_id": "sum-2026-01-02", "workspace_id": None}, MINE, "reports no workspace identity"),
    ({"snapshot_id": "sum-2026-01-02", "workspace_id": ""}, MINE, "reports no workspace identity"),
    ({"snapshot_id": "sum-2026-01-02", "workspace_id": MINE}, None, "this workspace has no identity"),
    ({"snapshot_id": "sum-2026-01-02"}, None, "this workspace has no identity"),
])
def test_an_app_of_another_workspace_or_without_an_identity_is_named_and_not_compared(body, identity, says):
    remark = serving_owner(body, identity)
    assert remark is not None and says in remark, remark


def test_a_repair_runs_in_a_workspace_whose_path_has_spaces_and_shell_characters(tmp_path):
    root = tmp_path / "my ws; touch INJECTED $(touch INJECTED2)"
    root.mkdir()
    ctx = SimpleNamespace(ws=SimpleNamespace(root=root))
    line = _in_ws(ctx, "pwd")
    assert shlex.split(line)[:2] == ["cd", str(root)]
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(done.stdout.strip()) == root
    assert not list(tmp_path.glob("INJECTED*")) and not list(root.glob("INJECTED*"))


def test_a_locked_store_is_busy_and_a_truncated_one_is_damage(tmp_path):
    db = tmp_path / "online_store.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # another process's write transaction
    try:
        with pytest.raises(sqlite3.OperationalError) as locked:
            sqlite3.connect(db, timeout=0).execute("SELECT * FROM t").fetchall()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert _busy(locked.value), locked.value
    with open(db, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(sqlite3.DatabaseError) as damaged:
        sqlite3.connect(db).execute("SELECT * FROM t").fetchall()
    assert not _busy(damaged.value), damaged.value
