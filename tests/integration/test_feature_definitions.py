"""Adding a user feature to the Feast feature view changes the next model with no other code change.

The test copies ``feature_repo/`` to a temporary folder, adds a dense and a sparse field to the
``user_features`` view, points ``SUM_FEATURE_REPO`` at the copy and trains the next day through the real
pipeline functions (Feast apply in ``tasks.apply_features``, point-in-time join in
``tasks.training_frame``, warm start by name and shape in ``tasks.warm_start``): the new model has a table and a projection for the new features and
keeps every other tensor of the previous day's snapshot. The older user partition is left as it was
(without the new columns): users whose latest feature row predates the new fields train with those
values filled (dense 0.0, sparse empty), and the others with their real values.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sum_pipeline import tasks
from sum_platform.context import context

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DAY1, DAY2 = "2026-01-01", "2026-01-02"
NEW_FIELDS = '''
        Field(name="new_dense_score", dtype=Float32, description="Added by the test."),
        Field(
            name="new_id_list",
            dtype=Array(Int64),
            tags={"hash_size": "300", "mean_length": "3"},
            description="Added by the test.",
        ),'''


@pytest.fixture
def env(tmp_path, monkeypatch):
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["paths"] = {"workspace": str(tmp_path / "workspace"), "dvc_remote": str(tmp_path / "remote")}
    params["simulator"].update({"initial_users": 300, "new_users_per_day": 20, "impressions_per_active_user": 6})
    params["model"]["embedding_dim"] = 16
    params["train"].update({"epochs": 1, "batch_size": 256})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("SUM_PARAMS", str(params_file))
    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.delenv("SUM_FEATURE_REPO", raising=False)

    repo = tmp_path / "feature_repo"
    shutil.copytree(PROJECT_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__", "data"))
    source = (repo / "definitions.py").read_text()
    anchor = 'name="user_features",\n    entities=[user],\n    ttl=timedelta(days=7),\n    schema=['
    assert anchor in source, "feature_repo/definitions.py changed shape; update the test's anchor"
    (repo / "definitions.py").write_text(source.replace(anchor, anchor + NEW_FIELDS, 1))
    return {"repo": repo, "monkeypatch": monkeypatch}


def _simulate(ds: str, ctx) -> None:
    from sum_platform.simulate import write_day

    write_day(ds, ctx.params, ctx.ws)


def test_a_feature_added_to_the_view_reaches_the_next_model(env, tmp_path):
    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot, load_model
    from sum_models.train import evaluate_ne, train_model

    # Day 1 with the project's feature repo: train and snapshot.
    ctx = context()
    _simulate(DAY1, ctx)
    tasks.apply_features(DAY1, ctx)  # what validate_data does first each day
    train1, _, spec1 = tasks.training_frame(DAY1, ctx)
    assert "new_id_list" not in spec1.user_sparse and "new_dense_score" not in spec1.user_dense
    model1 = build_model(spec1, ctx.params.model, seed=ctx.params.seed)
    train_model(model1, train1, spec1, ctx.params.train, seed=ctx.params.seed)
    export_snapshot(model1, spec1, ctx.params.model, tmp_path / "day1", "day1", program=False)

    # A data scientist adds two fields to the view; nothing else changes in the code.
    env["monkeypatch"].setenv("SUM_FEATURE_REPO", str(env["repo"]))
    _simulate(DAY2, ctx)  # the simulator generates every declared field
    # Day 1's user partition stays as written (no new columns). Some users are not refreshed on day 2,
    # so their latest feature row as of day 2's impressions is day 1's, which predates the new fields.
    day2_users = ctx.ws.users_dir(DAY2)
    users2 = pd.read_parquet(day2_users)
    assert {"new_id_list", "new_dense_score"} <= set(users2.columns)
    stale = set(pd.read_parquet(ctx.ws.users_dir(DAY1))["user_id"].tolist()[:40])
    for f in day2_users.glob("*.parquet"):
        f.unlink()
    users2[~users2["user_id"].isin(stale)].to_parquet(day2_users / "part-0.parquet", index=False)
    assert "new_id_list" not in pd.read_parquet(ctx.ws.users_dir(DAY1)).columns

    tasks.apply_features(DAY2, ctx)  # the changed repo is applied once, on the next day's validation
    train2, holdout2, spec2 = tasks.training_frame(DAY2, ctx)  # point-in-time join
    assert spec2.user_sparse["new_id_list"] == 300 and "new_dense_score" in spec2.user_dense
    assert set(spec1.user_sparse) < set(spec2.user_sparse) and set(spec1.user_dense) < set(spec2.user_dense)
    assert "new_id_list" in train2.columns and "new_dense_score" in train2.columns
    joined = pd.concat([train2, holdout2])
    from_day1 = joined["user_id"].isin(stale)
    assert from_day1.any() and (~from_day1).any()
    # Rows joined to day 1's features get the neutral values; the others carry day 2's real values.
    assert (joined.loc[from_day1, "new_dense_score"] == 0.0).all()
    assert all(len(v) == 0 for v in joined.loc[from_day1, "new_id_list"])
    fresh = joined.loc[~from_day1]
    assert fresh["new_dense_score"].notna().all() and fresh["new_dense_score"].std() > 0
    assert np.mean([len(v) > 0 for v in fresh["new_id_list"]]) > 0.5
    # The old features of day-1 rows are real values, not fills.
    assert joined.loc[from_day1, "sessions_7d"].std() > 0

    parent, _ = load_model(tmp_path / "day1")
    model2 = build_model(spec2, ctx.params.model, seed=ctx.params.seed)
    warm = tasks.warm_start(model2, parent.state_dict())
    state2, state1 = model2.state_dict(), parent.state_dict()
    # New input layers for the new features...
    assert "user_tower.sparse_arch.bags.new_id_list.weight" in state2
    assert "user_tower.dense_arch.features.new_dense_score.weight" in state2
    assert "user_tower.sparse_arch.bags.new_id_list.weight" in warm["skipped"]
    assert "user_tower.dense_arch.features.new_dense_score.weight" in warm["skipped"]
    # ... while every tensor of the previous model whose name and shape still fit is kept as it was:
    # every old embedding table and dense projection, the whole mix tower, the shape-preserving layers.
    kept = [k for k, v in state1.items() if k in state2 and state2[k].shape == v.shape]
    assert warm["loaded"] == len(kept)
    for name in kept:
        assert torch.equal(state2[name], state1[name]), name
    for feature in spec1.user_sparse:
        assert f"user_tower.sparse_arch.bags.{feature}.weight" in kept
    for feature in spec1.user_dense:
        assert f"user_tower.dense_arch.features.{feature}.weight" in kept
    assert all(k in kept for k in state1 if k.startswith("mix_tower."))
    # Only tensors that depend on the number of input tokens start fresh.
    fresh_old = sorted(set(state1) & set(warm["skipped"]))
    assert fresh_old and all(k.startswith("user_tower.pyramid.") for k in fresh_old), fresh_old

    stats = train_model(model2, train2, spec2, ctx.params.train, seed=ctx.params.seed)
    assert stats.examples == len(train2) and not stats.fresh_model
    ne = evaluate_ne(model2, holdout2, spec2)
    assert 0 < ne["click"] < 1.05


def test_served_features_of_rows_older_than_a_new_field_are_filled_like_training(env):
    """The compute path reads the online store: the same fill as training, not a skipped user."""
    from serving.store_io import read_user_features
    from sum_platform.feature_store import apply_definitions, feature_spec

    ctx = context()
    _simulate(DAY1, ctx)
    tasks.apply_features(DAY1, ctx)
    tasks.materialize_user_features(DAY1)  # online rows written under the old view
    env["monkeypatch"].setenv("SUM_FEATURE_REPO", str(env["repo"]))
    _simulate(DAY2, ctx)
    day2_users = ctx.ws.users_dir(DAY2)
    users2 = pd.read_parquet(day2_users)
    stale = pd.read_parquet(ctx.ws.users_dir(DAY1))["user_id"].tolist()[:5]
    for f in day2_users.glob("*.parquet"):
        f.unlink()
    users2[~users2["user_id"].isin(stale)].to_parquet(day2_users / "part-0.parquet", index=False)
    tasks.apply_features(DAY2, ctx)
    tasks.materialize_user_features(DAY2)

    store = apply_definitions(ctx.params)
    spec = feature_spec(ctx.params, store)
    fresh = users2.loc[~users2["user_id"].isin(stale), "user_id"].tolist()[:5]
    frame, skipped = read_user_features(store, [*stale, *fresh, 10**12], spec)
    assert skipped == {10**12: "no_features"}
    rows = frame.set_index("user_id")
    assert (rows.loc[stale, "new_dense_score"] == 0.0).all()
    assert all(len(v) == 0 for v in rows.loc[stale, "new_id_list"])
    expected = users2.set_index("user_id").loc[fresh, "new_dense_score"].astype(np.float32)
    assert np.allclose(rows.loc[fresh, "new_dense_score"].to_numpy(), expected.to_numpy())
    assert rows.loc[stale, "sessions_7d"].notna().all()
