"""params.yaml is the one source of the config's values: the config models hold no default that differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from sum_platform.config import Params, load_params

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
# Optional on purpose, with a default that is not a value: a gate threshold left out is None (the gate
# refuses to bless and names it); model.presets left out is {} (the built-ins of sum_models.presets).
UNSET_DEFAULTS = {"gate.min_mean_cosine", "gate.max_relative_l2_change", "gate.max_ne", "gate.min_mean_cosine_pooled",
                  "gate.max_relative_l2_change_pooled", "gate.max_ne_regression", "model.presets"}


def _fields(model: type[BaseModel], raw: dict, prefix: str = ""):
    for name, field in model.model_fields.items():
        if field.exclude:  # base_dir: where the file is, not a setting
            continue
        key = f"{prefix}{name}"
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            assert name in raw, f"params.yaml has no section {key!r}"
            yield from _fields(sub, raw[name], f"{key}.")
        else:
            yield key, field, raw


def test_every_config_default_agrees_with_params_yaml():
    seen = 0
    for key, field, raw in _fields(Params, RAW):
        name = key.rsplit(".", 1)[-1]
        if field.is_required():
            assert name in raw, f"params.yaml does not set the required {key!r}"
            continue
        default = field.get_default(call_default_factory=True)
        assert key in UNSET_DEFAULTS, f"{key} has a default ({default!r}); params.yaml sets every value"
        assert default in (None, {}), f"{key}: an optional setting defaults to 'unset', got {default!r}"
        if name in raw and not (default is None):
            assert raw[name] == default, f"{key}: config default {default!r} != params.yaml {raw[name]!r}"
        seen += 1
    assert seen == len(UNSET_DEFAULTS)


def test_the_model_rooms_defaults_agree_with_params_yaml():
    # sum_models has its own defaults for library use (build_model(spec, {"preset": ...})); they must
    # build the model the daily run builds.
    from sum_models.presets import FORMAT_KEYS, resolve_architecture
    from sum_models.train import TRAIN_CONFIG_DEFAULTS

    model = load_params(PROJECT_ROOT / "params.yaml").model
    assert resolve_architecture({}) == resolve_architecture(model.model_dump(mode="json"))
    assert {k: resolve_architecture({})[k] for k in FORMAT_KEYS} == {k: RAW["model"][k] for k in FORMAT_KEYS}
    assert TRAIN_CONFIG_DEFAULTS == RAW["train"]


@pytest.mark.parametrize("section", sorted(k for k in RAW if isinstance(RAW[k], dict) and k != "profiles"))
def test_a_setting_left_out_of_params_yaml_is_an_error_not_a_default(section):
    required = [k for k in RAW[section] if f"{section}.{k}" not in UNSET_DEFAULTS]
    raw = {**RAW, section: {k: v for k, v in RAW[section].items() if k != required[0]}}
    with pytest.raises(ValidationError, match=required[0]):
        Params(**raw, base_dir=PROJECT_ROOT)
    with pytest.raises(ValidationError, match=section):
        Params(**{k: v for k, v in RAW.items() if k != section}, base_dir=PROJECT_ROOT)


def _with_profile(tmp_path: Path, name: str | None, profiles: dict | None = None) -> Path:
    raw = {**RAW, "profile": name}
    if profiles is not None:
        raw["profiles"] = profiles
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_movielens_profile_merges_over_the_file_key_by_key(tmp_path):
    (tmp_path / "plain").mkdir()
    plain = load_params(_with_profile(tmp_path / "plain", None))
    ml = load_params(_with_profile(tmp_path, "movielens"))
    assert (plain.profile, ml.profile) == (None, "movielens")
    assert (plain.source.kind, ml.source.kind) == ("simulator", "movielens")
    assert ml.source.user_features_view == "movielens_user_features"
    assert ml.events.ad_sparse == {"ad_id": 1683, "ad_category": 19}
    # Keys the profile does not name keep the file's values, inside a section it does name too.
    assert ml.events.labels == plain.events.labels and ml.events.user_id == plain.events.user_id
    assert ml.validation.trailing_days == plain.validation.trailing_days
    assert ml.validation.drift_max_kl > plain.validation.drift_max_kl
    assert ml.paths.workspace != plain.paths.workspace  # its own workspace: no mixing of the two sources' data
    assert ml.source.movielens == plain.source.movielens and ml.serving == plain.serving


def test_an_unknown_profile_is_an_error_naming_the_defined_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'nope' is not defined \(profiles: \['movielens', 'redis', 'scale', 'study'\]\)"):
        load_params(_with_profile(tmp_path, "nope"))
    with pytest.raises(ValueError, match=r"profiles: none"):
        load_params(_with_profile(tmp_path, "nope", profiles={}))


def test_a_list_of_profiles_merges_each_in_turn(tmp_path):
    params = load_params(_with_profile(tmp_path, ["scale", "movielens"]))
    assert params.profile == ["scale", "movielens"]
    assert params.feature_store.online_store == "redis" and params.train.workers == 2  # from scale
    assert params.source.kind == "movielens"  # from movielens
    # Where both set a key, the later one wins (both name a train section: movielens's batch_size).
    assert params.train.batch_size == RAW["profiles"]["movielens"]["train"]["batch_size"]
    assert load_params(_with_profile(tmp_path, ["redis"])).feature_store.online_store == "redis"
    with pytest.raises(ValueError, match="'nope' is not defined"):
        load_params(_with_profile(tmp_path, ["redis", "nope"]))
