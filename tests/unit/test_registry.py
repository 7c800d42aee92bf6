"""Snapshot registry: stages, atomic promotion, reruns and the audit log."""

import sqlite3

import pytest

from sum_platform.registry import Registry, RegistryError


@pytest.fixture()
def reg(tmp_path):
    return Registry(tmp_path / "registry.db")


def test_promotion_retires_the_previous_production(reg):
    reg.register_candidate("s1", "2026-01-01", None, {"a": 1})
    reg.promote("s1")
    reg.register_candidate("s2", "2026-01-02", "s1", {})
    reg.record_verdict("s2", True, {"verdict": "blessed"})
    reg.promote("s2", actor="alice", reason="daily")
    assert reg.production().snapshot_id == "s2"
    assert reg.get("s1").stage == "retired"
    assert reg.get("s2").promoted_by == "alice"
    assert [e["action"] for e in reg.events("s2")] == ["register", "bless", "promote"]


def test_held_snapshot_cannot_be_promoted_without_force(reg):
    reg.register_candidate("s1", "2026-01-01", None, {})
    reg.record_verdict("s1", False, {"reasons": ["embedding_0.mean_cosine = 0.1"]})
    assert reg.get("s1").stage == "held"
    with pytest.raises(RegistryError, match="held"):
        reg.promote("s1")
    reg.promote("s1", actor="bob", reason="incident override", force=True)
    assert reg.production().snapshot_id == "s1"
    assert reg.events("s1")[-1]["detail"] == {"reason": "incident override", "force": True, "from_stage": "held"}


def test_rerun_of_a_promoted_snapshot_keeps_its_stage(reg):
    reg.register_candidate("s1", "2026-01-01", None, {"n": 1})
    reg.promote("s1")
    reg.register_candidate("s1", "2026-01-01", None, {"n": 2})
    reg.record_verdict("s1", True, {})
    assert reg.get("s1").stage == "production"
    assert reg.get("s1").record["n"] == 2


def test_at_most_one_production_even_on_direct_writes(reg):
    reg.register_candidate("s1", "2026-01-01", None, {})
    reg.register_candidate("s2", "2026-01-02", None, {})
    reg.promote("s1")
    db = sqlite3.connect(reg.path)
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE snapshots SET stage = 'production' WHERE snapshot_id = 's2'")


def test_failed_promotion_rolls_back_entirely(reg, monkeypatch):
    reg.register_candidate("s1", "2026-01-01", None, {})
    reg.promote("s1")
    reg.register_candidate("s2", "2026-01-02", "s1", {})

    def boom(*args, **kwargs):
        raise RuntimeError("crash between the two updates")

    monkeypatch.setattr(Registry, "_log", staticmethod(boom))
    with pytest.raises(RuntimeError):
        reg.promote("s2")
    assert reg.production().snapshot_id == "s1"
    assert reg.get("s2").stage == "candidate"


def test_unknown_snapshot_is_refused(reg):
    with pytest.raises(RegistryError, match="unknown"):
        reg.promote("nope")
