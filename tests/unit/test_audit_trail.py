"""The pieces of the audit trail that need no git or DVC: the registry's online backup and restore, and the
file-by-file mirror of the working-state folders (the whole flow is tests/integration/test_restore.py)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from sum_platform.audit_trail import _mirror
from sum_platform.registry import Registry, RegistryError


@pytest.fixture()
def registry(tmp_path):
    reg = Registry(tmp_path / "registry" / "registry.db")
    reg.register_candidate("sum-2026-01-01", "2026-01-01", None, {"ne": 0.8})
    reg.record_verdict("sum-2026-01-01", True, {"blessed": True, "reasons": []})
    reg.promote("sum-2026-01-01", actor="alice", reason="first")
    return reg


def test_a_backup_restores_the_same_lineage_and_events(registry, tmp_path):
    backup = registry.backup(tmp_path / "audit" / "registry.sqlite")
    registry.promote("sum-2026-01-01", actor="bob")  # a no-op promotion after the backup changes nothing
    registry.register_candidate("sum-2026-01-02", "2026-01-02", "sum-2026-01-01", {})  # after the backup
    restored = Registry.restore(backup, tmp_path / "restored" / "registry.db")
    assert [r.to_dict() for r in restored.list()] == [registry.get("sum-2026-01-01").to_dict()]
    assert restored.events() == registry.events()[:3]
    assert [e["actor"] for e in restored.events()][-1] == "alice"
    assert not list(backup.parent.glob(".*.tmp"))


def test_restore_never_overwrites_a_registry_and_names_a_file_that_is_not_one(registry, tmp_path):
    backup = registry.backup(tmp_path / "registry.sqlite")
    with pytest.raises(RegistryError, match="existing registry"):
        Registry.restore(backup, registry.path)
    assert registry.production().snapshot_id == "sum-2026-01-01"
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(RegistryError, match="not a registry backup"):
        Registry.restore(other, tmp_path / "new" / "registry.db")
    assert not (tmp_path / "new" / "registry.db").exists()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RegistryError, match="not a readable registry backup"):
        Registry.restore(garbage, tmp_path / "new" / "registry.db")
    assert not (tmp_path / "new" / "registry.db").exists()


def test_the_mirror_copies_what_changed_and_drops_what_vanished(tmp_path):
    src, dst = tmp_path / "runs", tmp_path / "audit" / "runs"
    (src / "2026-01-01").mkdir(parents=True)
    (src / "2026-01-01" / "gate.json").write_text('{"verdict": "blessed"}')
    (src / "2026-01-01" / ".gate.json.1234.tmp").write_text("half")  # a writer's temporary: never copied
    (src / "2026-01-02").mkdir()
    (src / "2026-01-02" / "gate.json").write_text('{"verdict": "held"}')
    assert _mirror(src, dst) == {"files": 2, "copied": 2, "removed": 0}
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "2026-01-01/gate.json", "2026-01-02/gate.json"]

    assert _mirror(src, dst) == {"files": 2, "copied": 0, "removed": 0}  # unchanged: nothing copied
    (src / "2026-01-02" / "gate.json").write_text('{"verdict": "blessed"}')  # a rerun replaced it
    os.utime(src / "2026-01-02" / "gate.json", ns=(1, 1))
    (src / "2026-01-01" / "gate.json").unlink()  # gone from the working state (the tmp file stays, unversioned)
    assert _mirror(src, dst) == {"files": 1, "copied": 1, "removed": 1}
    assert (dst / "2026-01-02" / "gate.json").read_text() == '{"verdict": "blessed"}'
    assert not (dst / "2026-01-01").exists()
