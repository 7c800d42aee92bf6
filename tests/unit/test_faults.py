"""Candidate faults of the gate drills (sum_pipeline.faults): each changes the exported candidate as it says."""

from __future__ import annotations

import torch

from sum_models.model import build_model
from sum_models.snapshot import embed_users
from sum_pipeline.faults import SCALE_FACTOR, inject_fault
from sum_platform.config import load_params


def test_the_scale_drill_multiplies_every_embedding_and_keeps_its_direction():
    from sum_platform.feature_store import spec_from_fields, user_feature_fields
    from sum_platform.simulate import simulate_day

    params = load_params()
    spec = spec_from_fields(user_feature_fields(params), params)
    model = build_model(spec, params.model, seed=0).eval()
    _, users = simulate_day(params.simulator.start_date, params)
    users = users.head(50)
    with torch.no_grad():
        before = embed_users(model.user_tower, users, spec).astype("float32")
        inject_fault(model, "scale", lambda: None)
        after = embed_users(model.user_tower, users, spec).astype("float32")
    assert abs((after / before)[abs(before) > 1e-2].mean() - SCALE_FACTOR) < 0.1
