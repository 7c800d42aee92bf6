"""The whole daily loop through the real Airflow DAG (dag.test), with real GX, torch, Feast, Ray Serve
over HTTP and DVC: promotion, the gate holding a very different candidate, and a corrupted partition
stopping the run at validation while production, the online store and serving stay unchanged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.rollout import served_snapshot_id
from sum_pipeline import airflow_env, promotion
from sum_platform.config import load_params
from sum_platform.context import context
from sum_platform.files import write_partition
from sum_platform.simulate import simulate_day

pytestmark = pytest.mark.slow

DAY1, DAY2, DAY3, DAY4, DAY5 = (f"2026-01-0{i}" for i in range(1, 6))
WATCHED_USERS = list(range(1, 41))  # user 0 is the one verify_serving reads (and so recomputes)


WORKSPACE_NAME = "dag-workspace"


@pytest.fixture(scope="module")
def runs(module_workspace: Path, airflow_db, ray_serve, stored_rows):
    """Runs the DAG for five dates; returns the per-date results plus observations between runs."""

    params = load_params()
    ctx = context()
    out: dict = {}
    for ds in (DAY1, DAY2, DAY3):
        out[ds] = airflow_env.run_date(ds)
        out[f"{ds}/production"] = ctx.registry.production().snapshot_id
        out[f"{ds}/served"] = served_snapshot_id(params)

    # DAY4: a candidate with re-initialised weights must be held.
    out[DAY4] = airflow_env.run_date(DAY4, {"candidate_fault": "reinit"})
    out[f"{DAY4}/production"] = ctx.registry.production().snapshot_id
    out[f"{DAY4}/served"] = served_snapshot_id(params)

    # DAY5: the partition arrives corrupted (click labels outside {0, 1}).
    before = stored_rows(WATCHED_USERS)
    events, users = simulate_day(DAY5, params)
    events.loc[events.index[:25], "click"] = 2
    write_partition(events, ctx.ws.events_dir(DAY5))
    write_partition(users, ctx.ws.users_dir(DAY5))
    out[DAY5] = airflow_env.run_date(DAY5)
    out[f"{DAY5}/production"] = ctx.registry.production().snapshot_id
    out[f"{DAY5}/served"] = served_snapshot_id(params)
    out["store_before"], out["store_after"] = before, stored_rows(WATCHED_USERS)

    # Rerun DAY3 (the production snapshot's date): the same end state.
    out["rerun/before"] = ctx.registry.get(f"sum-{DAY3}")
    out["rerun"] = airflow_env.run_date(DAY3)
    out["rerun/after"] = ctx.registry.get(f"sum-{DAY3}")
    out["rerun/served"] = served_snapshot_id(params)
    out["rerun/production"] = ctx.registry.production().snapshot_id
    out["ctx"] = ctx
    return out


def test_first_day_is_promoted_by_rubber_stamp(runs):
    r = runs[DAY1]
    assert r.ok, r.task_states
    assert r.xcoms["shift_gate.verdict"]["verdict"] == "blessed"
    rec = runs["ctx"].registry.get("sum-2026-01-01")
    assert rec.stage in ("production", "retired")
    verdict = rec.record["verdict"]
    assert verdict["blessed"] and verdict["baseline_snapshot_id"] is None
    assert any("first snapshot" in reason for reason in verdict["reasons"])
    assert runs[f"{DAY1}/production"] == "sum-2026-01-01"


def test_served_snapshot_follows_each_promotion(runs):
    for ds in (DAY1, DAY2, DAY3):
        assert runs[ds].ok, (ds, runs[ds].task_states)
        assert runs[f"{ds}/production"] == f"sum-{ds}"
        assert runs[f"{ds}/served"] == runs[f"{ds}/production"]


def test_normal_days_have_shift_numbers_within_thresholds(runs):
    gate = runs["ctx"].params.gate
    rec = runs["ctx"].registry.get(f"sum-{DAY2}")
    shift = rec.record["verdict"]["shift"]
    assert len(shift) == 2
    for m in shift:
        assert gate.min_mean_cosine <= m["mean_cosine"] <= 1.0
        assert 0.0 <= m["relative_l2_change"] <= gate.max_relative_l2_change
    ne = rec.record["evaluation"]["ne"]
    assert 0 < ne["click"] < 1.0


def test_online_store_holds_embeddings_for_the_users(runs):
    stored = runs["store_before"]
    assert len(stored) == len(WATCHED_USERS)
    for user_id, row in stored.items():
        assert row["snapshot_id"] == f"sum-{DAY3}", (user_id, row["snapshot_id"])
        emb = np.asarray(row["embeddings"], dtype=np.float32)
        assert emb.shape == (2, 96) and np.isfinite(emb).all()


def test_reinitialised_candidate_is_held_and_production_stays(runs):
    r = runs[DAY4]
    assert r.state == "success", r.task_states  # a held snapshot is a verdict, not a failure
    assert r.task_states["shift_gate"] == "success"
    for downstream in ("promote", "materialize_embeddings", "rollout", "verify_serving"):
        assert r.task_states[downstream] == "skipped", (downstream, r.task_states)
    rec = runs["ctx"].registry.get(f"sum-{DAY4}")
    assert rec.stage == "held"
    assert any("mean_cosine" in reason for reason in rec.record["verdict"]["reasons"])
    assert runs[f"{DAY4}/production"] == f"sum-{DAY3}"
    assert runs[f"{DAY4}/served"] == f"sum-{DAY3}"


def test_corrupted_partition_stops_at_validation_and_changes_nothing(runs):
    r = runs[DAY5]
    assert r.state == "failed"
    assert r.task_states["validate_data"] == "failed"
    assert r.task_states["train_user_model"] in ("upstream_failed", "skipped")
    assert runs["ctx"].registry.get(f"sum-{DAY5}") is None
    assert runs[f"{DAY5}/production"] == f"sum-{DAY3}"
    assert runs[f"{DAY5}/served"] == f"sum-{DAY3}"
    assert runs["store_after"] == runs["store_before"]
    # The day's record names the check that failed: labels outside {0, 1} in the events partition only.
    validation = runs["ctx"].day(DAY5).validation
    assert validation["success"] is False and set(validation["failed_checks"]) == {"events"}
    assert any("expect_column_values_to_be_in_set(click)" in line for line in validation["failed_checks"]["events"])
    assert validation["quarantine"] and not runs["ctx"].ws.events_dir(DAY5).exists()


def test_rerunning_a_promoted_date_gives_the_same_end_state(runs):
    before, after = runs["rerun/before"], runs["rerun/after"]
    assert runs["rerun"].ok, runs["rerun"].task_states
    assert after.stage == "production" and runs["rerun/production"] == f"sum-{DAY3}"
    assert runs["rerun/served"] == f"sum-{DAY3}"
    assert after.parent_id == before.parent_id == f"sum-{DAY2}"
    # Deterministic training from the same parent on the same data: the same weights, NE and shift.
    assert after.record["weights_sha256"] == before.record["weights_sha256"]
    manifest = json.loads((runs["ctx"].ws.snapshot_dir(f"sum-{DAY3}") / "manifest.json").read_text())
    assert manifest["sha256"]["user_tower.safetensors"] == before.record["weights_sha256"]["user_tower.safetensors"]
    assert after.record["evaluation"]["ne"] == before.record["evaluation"]["ne"]
    assert after.record["verdict"]["shift"] == before.record["verdict"]["shift"]
    assert after.record["data_version"] == before.record["data_version"]


def test_promoted_snapshots_are_tagged_and_restorable_with_dvc(runs, tmp_path):
    from sum_platform.versioning import restore_snapshot, tag_for_snapshot

    ws = runs["ctx"].ws
    tag = tag_for_snapshot(ws.root, f"sum-{DAY2}")
    assert tag
    tags = subprocess.run(["git", "tag"], cwd=ws.root, capture_output=True, text=True, check=True).stdout
    assert tag in tags
    restored = restore_snapshot(ws.root, f"sum-{DAY2}", tmp_path / "restored")
    original = ws.snapshot_dir(f"sum-{DAY2}") / "user_tower.safetensors"
    assert (restored / "user_tower.safetensors").read_bytes() == original.read_bytes()


def test_rollback_returns_the_previous_production_and_reroll_serving(runs):
    """It changes production; the other tests read what the module fixture recorded before, so any order works."""
    from sum_platform.versioning import production_snapshot

    ctx = runs["ctx"]
    out = promotion.rollback_production("operator-x", "bad downstream metrics")
    assert (out["from"], out["to"]) == (f"sum-{DAY3}", f"sum-{DAY2}")
    assert ctx.registry.production().snapshot_id == f"sum-{DAY2}"
    assert ctx.registry.get(f"sum-{DAY3}").stage == "retired"
    assert served_snapshot_id(ctx.params) == f"sum-{DAY2}"
    assert production_snapshot(ctx.ws.root) == f"sum-{DAY2}"
    last = ctx.registry.events(f"sum-{DAY2}")[-1]
    assert last["action"] == "promote" and last["actor"] == "operator-x"
    assert "rollback from" in last["detail"]["reason"]
