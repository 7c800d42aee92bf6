"""The bound on the user embeddings' scale (model.output_norm): its equations, the tower's output through days
of training, a golden output, and snapshots that record and reload it (an old snapshot loads unbounded)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sum_models.data import encode_users
from sum_models.inference import file_sha256, load_exported_tower
from sum_models.model import build_model
from sum_models.output_bound import OutputBound
from sum_models.presets import resolve_architecture
from sum_models.shift import mean_norms
from sum_models.snapshot import CONFIG_FILE, MANIFEST_FILE, embed_users, export_snapshot, load_model, load_user_tower
from sum_models.train import train_model

D = 8


def _embed(tower, users_df, spec):
    u = encode_users(users_df, spec)
    return tower(u.dense, u.sparse_ids, u.sparse_offsets)


@pytest.mark.parametrize("mode", ["l2", "layernorm"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_a_bounded_embedding_has_norm_scale_sqrt_d_whatever_the_input(mode, scale):
    bound = OutputBound(mode, D, scale)
    gen = torch.Generator().manual_seed(0)
    # Inputs whose norms span 9 orders of magnitude, plus a shifted copy (layernorm also ignores a shift).
    x = torch.randn(64, 2, D, generator=gen) * torch.logspace(-3, 6, 64).view(64, 1, 1)
    for inputs in (x, x + 3.0):
        norms = bound(inputs).norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, scale * math.sqrt(D)), rtol=1e-4, atol=1e-4)
    # Invariance: scaling a user's pre-bound embedding by any positive factor changes nothing.
    torch.testing.assert_close(bound(x * 1e3), bound(x), rtol=1e-4, atol=1e-5)


def test_l2_keeps_the_direction_and_layernorm_centres_it():
    x = torch.tensor([[[3.0, 4.0] + [0.0] * (D - 2)]])  # [1, 1, D]
    l2 = OutputBound("l2", D, 1.0)(x)
    torch.testing.assert_close(l2, x / 5.0 * math.sqrt(D))
    ln = OutputBound("layernorm", D, 1.0)(x)
    assert abs(float(ln.mean())) < 1e-6
    assert torch.equal(OutputBound("none", D, 1.0)(x), x)


def test_a_zero_embedding_stays_finite():
    for mode in ("l2", "layernorm"):
        assert torch.isfinite(OutputBound(mode, D, 1.0)(torch.zeros(2, 2, D))).all()


@pytest.mark.parametrize("bad", [{"output_norm": "batchnorm"}, {"output_scale": 0.0}, {"output_scale": -1.0},
                                 {"output_scale": float("inf")}, {"output_scale": True}])
def test_a_bad_option_is_refused(model_cfg, bad):
    with pytest.raises(ValueError, match="output_"):
        resolve_architecture({**model_cfg, **bad})


def test_the_bound_adds_no_weights(spec, model_cfg):
    keys = {mode: set(build_model(spec, {**model_cfg, "output_norm": mode}).state_dict()) for mode in
            ("none", "l2", "layernorm")}
    assert keys["none"] == keys["l2"] == keys["layernorm"]


def test_norms_stay_bounded_over_days_of_training_while_unbounded_ones_grow(spec, model_cfg, train_cfg, make_users,
                                                                           make_examples):
    """Six daily trainings of one model (warm, as the daily loop continues it): the unbounded tower's norm moves
    far from where it started; the bounded one's never leaves scale * sqrt(D)."""
    probe = make_users(200, seed=99)
    norms = {}
    for mode in ("none", "l2"):
        model = build_model(spec, {**model_cfg, "output_norm": mode, "output_scale": 1.0}, seed=0)
        per_day = [mean_norms(embed_users(model.user_tower, probe, spec))]
        for day in range(6):
            train_model(model, make_examples(600, seed=day), spec, train_cfg, seed=day, progress=False)
            per_day.append(mean_norms(embed_users(model.user_tower, probe, spec)))
        norms[mode] = np.array(per_day)  # [days + 1, K]
    np.testing.assert_allclose(norms["l2"], math.sqrt(D), rtol=2e-3)  # fp16 embeddings
    assert (norms["none"][-1] / norms["none"][0]).min() > 10  # what the bound prevents (MovieLens: 800-3,000x)


def test_bounded_tower_golden_output(spec, model_cfg, make_users, golden):
    users = make_users(3, seed=0)
    with torch.no_grad():
        for mode in ("l2", "layernorm"):
            model = build_model(spec, {**model_cfg, "output_norm": mode, "output_scale": 0.5}, seed=0)
            golden(f"compact_tiny_{mode}_embeddings", _embed(model.user_tower, users, spec))


def test_unbounded_tower_is_the_tower_as_before(spec, model_cfg, make_users):
    """``none`` (the default) leaves the output exactly as the pyramid gives it."""
    users = make_users(5, seed=1)
    model = build_model(spec, model_cfg, seed=0)
    assert model.config["output_norm"] == "none"
    tower = model.user_tower
    with torch.no_grad():
        u = encode_users(users, spec)
        raw = tower.pyramid(torch.cat([tower.sparse_arch(u.sparse_ids, u.sparse_offsets, len(users)),
                                       tower.dense_arch(tower.dense_norm(u.dense))], dim=1),
                            tower.dense_arch(tower.dense_norm(u.dense)))
        assert torch.equal(_embed(tower, users, spec), raw)


@pytest.mark.parametrize("mode", ["l2", "layernorm"])
def test_a_snapshot_records_and_reloads_the_bound(spec, model_cfg, make_users, tmp_path, mode):
    cfg = {**model_cfg, "output_norm": mode, "output_scale": 0.5}
    model = build_model(spec, cfg, seed=3)
    out = export_snapshot(model, spec, cfg, tmp_path / "s", f"snap-{mode}")
    stored = json.loads((out / CONFIG_FILE).read_text())["model"]
    assert (stored["output_norm"], stored["output_scale"]) == (mode, 0.5)
    users = make_users(50, seed=4)
    tower, _ = load_user_tower(out)
    assert (tower.output_bound.mode, tower.output_bound.scale) == (mode, 0.5)
    with torch.no_grad():
        want = embed_users(model.user_tower, users, spec)
    np.testing.assert_array_equal(embed_users(tower, users, spec), want)
    np.testing.assert_allclose(mean_norms(embed_users(load_exported_tower(out), users, spec)), 0.5 * math.sqrt(D),
                               rtol=2e-3)  # the exported program holds the bound too
    assert load_model(out)[0].config["output_norm"] == mode


def test_export_refuses_a_config_whose_bound_differs_from_the_model(spec, model_cfg, tmp_path):
    model = build_model(spec, {**model_cfg, "output_norm": "l2"}, seed=0)
    with pytest.raises(ValueError, match="output_norm"):
        export_snapshot(model, spec, model_cfg, tmp_path / "s", "snap", program=False)


def test_a_snapshot_from_before_the_bound_loads_unbounded(spec, model_cfg, make_users, tmp_path):
    model = build_model(spec, model_cfg, seed=5)
    out = export_snapshot(model, spec, model_cfg, tmp_path / "s", "snap-old", program=False)
    # Rewrite its config as an older release wrote it (no output_norm / output_scale), checksums kept valid.
    config = json.loads((out / CONFIG_FILE).read_text())
    for key in ("output_norm", "output_scale"):
        del config["model"][key]
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["sha256"][CONFIG_FILE] = file_sha256(out / CONFIG_FILE)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    tower, _ = load_user_tower(out)
    assert tower.output_bound.mode == "none"
    users = make_users(20, seed=6)
    with torch.no_grad():
        np.testing.assert_array_equal(embed_users(tower, users, spec), embed_users(model.user_tower, users, spec))
