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


def test_the_aimed_offset_moves_every_user_by_one_vector_along_the_consumers_top_direction(tmp_path):
    import pytest

    from sum_models.data import encode_users
    from sum_platform.feature_store import spec_from_fields, user_feature_fields
    from sum_platform.simulate import simulate_day
    from sum_pipeline.faults import AIMED_OFFSET_SHARE, consumer_projections

    params = load_params()
    spec = spec_from_fields(user_feature_fields(params), params)
    model = build_model(spec, params.model, seed=0).eval()
    _, users = simulate_day(params.simulator.start_date, params)
    users = users.head(50)
    gen = torch.Generator().manual_seed(1)
    k, d = params.model.num_embeddings, params.model.embedding_dim
    projections = {"a": [torch.randn(8, d, generator=gen) for _ in range(k)],
                   "b": [torch.randn(4, d, generator=gen) for _ in range(k)]}
    with torch.no_grad():
        before = torch.as_tensor(embed_users(model.user_tower, users, spec).astype("float32"))
        inject_fault(model, "consumer_aimed_offset", lambda: None, users=lambda: encode_users(users, spec),
                     consumers=lambda: projections)
        after = torch.as_tensor(embed_users(model.user_tower, users, spec).astype("float32"))
    moved = after - before
    for j in range(k):
        offset = moved[:, j].mean(0)
        assert torch.allclose(moved[:, j], offset.expand_as(moved[:, j]), atol=2e-2)  # one vector for every user
        top = torch.linalg.svd(torch.cat([projections["a"][j], projections["b"][j]])).Vh[0]
        assert abs(abs(float(offset @ top)) / float(offset.norm()) - 1) < 1e-3  # along the top direction
        expected = AIMED_OFFSET_SHARE * float(before[:, j].norm(dim=1).mean())
        assert abs(float(offset.norm()) / expected - 1) < 2e-2
    with pytest.raises(RuntimeError, match="none of"):  # nothing saved to aim at: the drill fails loudly
        consumer_projections(tmp_path / "downstream", "2026-01-04", ["click"])
