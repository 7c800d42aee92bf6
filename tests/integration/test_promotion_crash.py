"""Promotion interrupted between any two of its steps leaves a consistent registry, and rerunning the
promotion completes it (real git, DVC and GTO in a temporary workspace)."""

from __future__ import annotations

import json
import os

import pytest

from sum_pipeline import promotion
from sum_platform import versioning
from sum_platform.context import context
from sum_platform.registry import Registry

pytestmark = pytest.mark.slow

STEPS = ["track_paths", "tag_promotion", "update_record"]


class Interrupted(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


@pytest.fixture()
def ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("SUM_DVC_REMOTE", str(tmp_path / "remote"))
    from sum_platform.versioning import init_workspace_repo

    c = context()
    init_workspace_repo(c.ws.root, c.params.dvc_remote)
    for i, sid in enumerate(("sum-2026-01-01", "sum-2026-01-02")):
        snap = c.ws.snapshot_dir(sid)
        snap.mkdir(parents=True)
        (snap / "user_tower.safetensors").write_bytes(os.urandom(64))
        (snap / "manifest.json").write_text(json.dumps({"snapshot_id": sid}))
        c.registry.register_candidate(sid, f"2026-01-0{i + 1}", None, {})
        c.registry.record_verdict(sid, True, {"blessed": True, "verdict": "blessed"})
    promotion.promote_snapshot(c, "sum-2026-01-01", actor="test", reason="first")
    return c


@pytest.mark.parametrize("step", STEPS)
def test_interrupted_promotion_keeps_registry_consistent_and_rerun_completes(ctx, step, monkeypatch):
    target = Registry.update_record if step == "update_record" else getattr(versioning, step)

    def crash_after(*args, **kwargs):
        target(*args, **kwargs)
        raise Interrupted(step)

    if step == "update_record":
        monkeypatch.setattr(Registry, "update_record", crash_after)
    else:
        monkeypatch.setattr(promotion, step, crash_after)  # the name promotion calls
    with pytest.raises(Interrupted):
        promotion.promote_snapshot(ctx, "sum-2026-01-02", actor="test", reason="daily")
    monkeypatch.undo()

    # Consistent: exactly one production snapshot, still the old one; the candidate is still a candidate.
    stages = {r.snapshot_id: r.stage for r in ctx.registry.list()}
    assert stages == {"sum-2026-01-01": "production", "sum-2026-01-02": "candidate"}

    out = promotion.promote_snapshot(ctx, "sum-2026-01-02", actor="test", reason="daily (retried)")
    assert out["stage"] == "production"
    assert {r.snapshot_id: r.stage for r in ctx.registry.list()} == {
        "sum-2026-01-01": "retired", "sum-2026-01-02": "production"}
    assert versioning.tag_for_snapshot(ctx.ws.root, "sum-2026-01-02") == out["tag"]
    assert versioning.production_snapshot(ctx.ws.root) == "sum-2026-01-02"


def test_unblessed_candidate_needs_force(ctx):
    ctx.registry.register_candidate("sum-2026-01-03", "2026-01-03", None, {})
    snap = ctx.ws.snapshot_dir("sum-2026-01-03")
    snap.mkdir(parents=True)
    (snap / "user_tower.safetensors").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="not blessed"):
        promotion.promote_snapshot(ctx, "sum-2026-01-03", actor="test", reason="")
    out = promotion.promote_snapshot(ctx, "sum-2026-01-03", actor="alice", reason="incident 42", force=True)
    assert out["stage"] == "production"
    event = ctx.registry.events("sum-2026-01-03")[-1]
    assert event["actor"] == "alice" and event["detail"]["reason"] == "incident 42" and event["detail"]["force"]


def test_a_manual_promotion_racing_the_daily_one_leaves_one_production_and_both_in_the_audit_log(ctx):
    """The daily run promotes sum-2026-01-02 while an operator force-promotes sum-2026-01-03: whichever lands
    last is production in the registry and in GTO's prod alike, and both promotions are in the audit log."""
    import threading

    ctx.registry.register_candidate("sum-2026-01-03", "2026-01-03", None, {})
    snap = ctx.ws.snapshot_dir("sum-2026-01-03")
    snap.mkdir(parents=True)
    (snap / "user_tower.safetensors").write_bytes(os.urandom(64))
    (snap / "manifest.json").write_text(json.dumps({"snapshot_id": "sum-2026-01-03"}))
    errors: list[BaseException] = []

    def run(sid: str, actor: str, force: bool) -> None:
        try:
            promotion.promote_snapshot(context(), sid, actor=actor, reason="race", force=force)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("sum-2026-01-02", "pipeline", False)),
               threading.Thread(target=run, args=("sum-2026-01-03", "operator", True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    productions = [r.snapshot_id for r in ctx.registry.list() if r.stage == "production"]
    assert len(productions) == 1 and productions[0] in ("sum-2026-01-02", "sum-2026-01-03")
    assert versioning.production_snapshot(ctx.ws.root) == productions[0]
    actors = {(e["snapshot_id"], e["actor"]) for e in ctx.registry.events() if e["action"] == "promote"}
    assert {("sum-2026-01-02", "pipeline"), ("sum-2026-01-03", "operator")} <= actors
