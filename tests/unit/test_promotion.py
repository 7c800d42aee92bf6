"""Which snapshots a deployment is given: frozen mode's tower is the registry's first promoted snapshot."""

from __future__ import annotations

from pathlib import Path

from sum_pipeline.promotion import frozen_snapshot
from sum_platform.config import load_params
from sum_platform.context import Context
from sum_platform.workspace import Workspace


def _ctx(tmp_path: Path) -> Context:
    return Context(load_params(), Workspace(tmp_path))


def _promote(ctx: Context, sid: str, ds: str, force: bool = False) -> None:
    if ctx.registry.get(sid) is None:
        ctx.registry.register_candidate(sid, ds, None, {})
    ctx.ws.snapshot_dir(sid).mkdir(parents=True, exist_ok=True)
    ctx.registry.promote(sid, reason="test", force=force)


def test_no_frozen_snapshot_before_the_first_promotion(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.registry.register_candidate("sum-2026-01-01", "2026-01-01", None, {})
    assert frozen_snapshot(ctx) is None


def test_the_first_promoted_snapshot_stays_frozen_through_promotions_and_a_rollback(tmp_path):
    ctx = _ctx(tmp_path)
    for i in (1, 2, 3):
        _promote(ctx, f"sum-2026-01-0{i}", f"2026-01-0{i}")
    _promote(ctx, "sum-2026-01-02", "2026-01-02", force=True)  # a rollback: 01-02 is production again
    assert ctx.registry.production().snapshot_id == "sum-2026-01-02"
    assert frozen_snapshot(ctx) == (ctx.ws.snapshot_dir("sum-2026-01-01"), "sum-2026-01-01")


def test_a_first_snapshot_whose_folder_is_gone_is_not_offered(tmp_path):
    ctx = _ctx(tmp_path)
    _promote(ctx, "sum-2026-01-01", "2026-01-01")
    ctx.ws.snapshot_dir("sum-2026-01-01").rmdir()
    assert frozen_snapshot(ctx) is None


def test_an_approval_forces_the_promotion_as_the_responding_user():
    import pytest

    from sum_pipeline.tasks import approval_override

    assert approval_override(None) == {}  # blessed: the approval was skipped, promote as the pipeline
    approved = {"chosen_options": ["Approve"], "params_input": {"reason": " NE fine, shift expected "},
                "responded_by_user": {"id": "admin", "name": "admin"}}
    assert approval_override(approved) == {"force": True, "actor": "admin",
                                           "reason": "held candidate approved in Airflow: NE fine, shift expected"}
    no_reason = approved | {"params_input": {"reason": ""}}
    assert approval_override(no_reason)["reason"].endswith("no reason given")
    for not_an_approval in (approved | {"chosen_options": ["Reject"]},
                            approved | {"responded_by_user": None}):  # the timeout's defaults have no user
        with pytest.raises(ValueError, match="not an approval"):
            approval_override(not_an_approval)


def test_promoting_a_rolled_back_snapshot_again_lets_its_writes_land_again(tmp_path, monkeypatch):
    """A rollback retired sum-2026-01-03 in the online store (a real Feast SQLite store): its late writes are
    dropped. An operator promoting it again undoes the rollback: it is no longer retired and its writes land. (The
    promotion's git/DVC steps are stubbed: this checks what the promotion does to the online store.)"""
    import numpy as np

    from serving.store_io import read_history, retire_snapshot, retired_snapshots, write_embeddings
    from sum_pipeline import promotion
    from sum_platform.feature_store import apply_definitions

    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path))
    ctx = _ctx(tmp_path)
    store = apply_definitions(ctx.params)
    k, d = ctx.params.model.num_embeddings, ctx.params.model.embedding_dim
    for name in ("track_paths", "_save_trail"):
        monkeypatch.setattr(promotion, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(promotion, "tag_promotion", lambda *args, **kwargs: "tag")
    monkeypatch.setattr(promotion, "data_version", lambda *args, **kwargs: "v")
    for i in (2, 3):
        _promote(ctx, f"sum-2026-01-0{i}", f"2026-01-0{i}")
    retire_snapshot(store, "sum-2026-01-03")  # what the rollback to 01-02 does after serving moved
    promotion._promote(ctx, "sum-2026-01-02", "bob", "rollback", force=True)
    assert retired_snapshots(store) == {"sum-2026-01-03"}
    assert write_embeddings(store, [7], np.ones((1, k, d), np.float16), "sum-2026-01-03", 1_000) == 0

    promotion._promote(ctx, "sum-2026-01-03", "alice", "the incident was elsewhere", force=True)
    assert retired_snapshots(store) == set()
    assert write_embeddings(store, [7], np.ones((1, k, d), np.float16), "sum-2026-01-03", 2_000) == 1
    assert read_history(store, [7])[7]["snapshot_id"] == "sum-2026-01-03"
