"""Each downstream model's own user features from params (sum_platform/downstream_inputs.py), and the measure of
how much user signal a feature set carries on the simulated world."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sum_platform.config import DownstreamConfig, load_params, load_profile
from sum_platform.downstream_inputs import downstream_specs_for, user_signal_share

DS = "2026-01-03"


def test_the_simulated_models_are_constrained_not_blind():
    params = load_params()
    specs = downstream_specs_for(params)
    chosen = params.downstream.user_features
    for name, spec in specs.items():
        user_dense = [c for c in spec.dense if c not in params.events.ad_dense]
        assert len(user_dense) == chosen[name].dense and list(spec.lists) == chosen[name].lists
    assert specs["click"].lists == {"clicked_ad_categories": 64}  # hash size 64 < list_table_size
    assert any(spec.lists for spec in specs.values()) and all(spec.uses_embeddings for spec in specs.values())
    assert not any(s.uses_embeddings for s in downstream_specs_for(params, with_embeddings=False).values())
    # A study's dose-response overrides one model's features; the others keep the params'.
    dose = downstream_specs_for(params, user_features={"click": {"dense": 0, "lists": []}})
    assert dose["click"].lists == {} and dose["click"].dense == tuple(params.events.ad_dense)
    assert dose["conversion"] == specs["conversion"]


def test_movielens_models_read_its_own_columns():
    params = load_profile("movielens")
    specs = downstream_specs_for(params)
    assert all(c.startswith("ml_") for s in specs.values() for c in s.dense)
    user = {n: [c for c in s.dense if c not in params.events.ad_dense] for n, s in specs.items()}
    assert {n: len(c) for n, c in user.items()} == {"click": 2, "conversion": 4, "inbox": 0}
    assert not any(s.lists for s in specs.values())


def test_every_downstream_model_needs_its_user_features():
    raw = load_params().downstream.model_dump()
    raw["user_features"].pop("inbox")
    with pytest.raises(ValidationError, match="no entry for model"):
        DownstreamConfig(**raw)


def test_more_user_features_explain_more_of_the_hidden_user():
    params = load_profile("study")
    share = {n: user_signal_share(DS, params, {"dense": n, "lists": []}) for n in (0, 2, 8)}
    assert share[0]["interest_r2"] == pytest.approx(0.0, abs=0.02)
    assert share[0]["interest_r2"] < share[2]["interest_r2"] < share[8]["interest_r2"]
    assert share[2]["click_propensity_r2"] < share[8]["click_propensity_r2"]
    with_list = user_signal_share(DS, params, {"dense": 2, "lists": ["clicked_ad_categories"]})
    assert with_list["interest_r2"] > share[2]["interest_r2"] + 0.1
    # Without propensities there is nothing of them to explain.
    assert user_signal_share(DS, load_params(), {"dense": 2, "lists": []})["click_propensity_r2"] is None
    with pytest.raises(ValueError, match="not in the view"):
        user_signal_share(DS, params, {"dense": 0, "lists": ["nope"]})
