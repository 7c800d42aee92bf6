"""Dense-input normalisation (sum_models/normalize.py): learnt at training time, kept by warm start, stored in
the snapshot and applied by the exported tower; a value orders of magnitude off cannot blow the embeddings up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sum_models.data import encode_users
from sum_models.inference import load_exported_tower
from sum_models.model import build_model
from sum_models.normalize import CLAMP, DenseNormalizer
from sum_models.snapshot import USER_TOWER_FILE, _load_weights, embed_users, export_snapshot, load_user_tower
from sum_models.train import train_model


def _counts_like(users, scale: float = 1000.0, offset: float = 2000.0):
    """The users with dense features in the thousands, as real counts are."""
    out = users.copy()
    for name in ("d0", "d1", "d2"):
        out[name] = (out[name] * scale + offset).astype(np.float32)
    return out


def test_unfitted_is_the_identity_and_fit_standardises_each_feature():
    norm = DenseNormalizer(["a", "b", "constant"])
    x = torch.tensor([[1000.0, 0.1, 7.0], [3000.0, 0.3, 7.0], [2000.0, 0.2, 7.0]])
    assert torch.equal(norm(x), x)
    assert norm.fit(x) == ["a", "b", "constant"]
    z = norm(x)
    torch.testing.assert_close(z[:, :2].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    assert torch.equal(z[:, 2], torch.zeros(3))  # a constant feature maps to 0, not to inf
    assert norm.features["constant"].std.item() == 1.0


def test_values_far_out_of_range_are_clamped_and_non_finite_ones_do_not_spread():
    norm = DenseNormalizer(["a"])
    norm.fit(torch.tensor([[0.0], [2.0]]))
    z = norm(torch.tensor([[1e12], [-1e12], [1.0]]))
    assert z.flatten().tolist() == [CLAMP, -CLAMP, 0.0]


def test_fit_learns_only_features_it_has_not_seen():
    norm = DenseNormalizer(["old", "new"])
    norm.features["old"].mean.fill_(5.0)
    norm.features["old"].std.fill_(2.0)
    norm.features["old"].fitted.fill_(1.0)
    assert norm.fit(torch.tensor([[100.0, 1.0], [300.0, 3.0]])) == ["new"]
    assert norm.features["old"].mean.item() == 5.0 and norm.features["old"].std.item() == 2.0
    assert norm.features["new"].mean.item() == 2.0


def test_training_fits_the_tower_and_a_warm_start_keeps_its_statistics(spec, model_cfg, train_cfg, make_examples):
    examples = _counts_like(make_examples(600, seed=1))
    model = build_model(spec, model_cfg, seed=0)
    stats = train_model(model, examples, spec, train_cfg, seed=0)
    assert stats.normalized_features == ("d0", "d1", "d2")
    norm = model.user_tower.dense_norm
    assert abs(norm.features["d0"].mean.item() - examples["d0"].mean()) < 1.0  # learnt in the raw units
    assert 900 < norm.features["d0"].std.item() < 1100

    child = build_model(spec, model_cfg, seed=1)
    child.load_state_dict(model.state_dict())  # what the daily warm start does, by name
    again = train_model(child, _counts_like(make_examples(600, seed=2), offset=5000.0), spec, train_cfg, seed=0)
    assert again.normalized_features == ()  # the parent's statistics stay: the day's shift is for the gate
    assert child.user_tower.dense_norm.features["d0"].mean.item() == norm.features["d0"].mean.item()


def test_a_value_orders_of_magnitude_off_cannot_blow_the_embeddings_up(spec, model_cfg, train_cfg, make_examples,
                                                                        make_users):
    model = build_model(spec, model_cfg, seed=0)
    train_model(model, _counts_like(make_examples(600, seed=1)), spec, train_cfg, seed=0)
    tower = model.user_tower.eval()
    stats = tower.dense_norm.features["d1"]
    users = _counts_like(make_users(20, seed=3))
    edge, far, farther = users.copy(), users.copy(), users.copy()
    edge["d1"] = np.float32(stats.mean.item() + CLAMP * stats.std.item())  # rare but plausible: 5 sigma
    far["d1"], farther["d1"] = np.float32(1e7), np.float32(1e12)

    def embed_of(df):
        u = encode_users(df, spec)
        with torch.no_grad():
            return tower(u.dense, u.sparse_ids, u.sparse_offsets)

    # A wrong value moves the embeddings no further than a 5-sigma value would, however wrong it is.
    torch.testing.assert_close(embed_of(far), embed_of(edge))
    torch.testing.assert_close(embed_of(farther), embed_of(edge))
    normal = embed_of(users).norm(dim=-1)
    stats.fitted.fill_(0.0)  # the same tower without normalisation: the error goes straight through
    assert (embed_of(farther).norm(dim=-1) / normal).min().item() > 1e6


def test_the_snapshot_and_the_exported_tower_apply_the_statistics(tmp_path, spec, model_cfg, train_cfg, make_examples,
                                                                   make_users):
    model = build_model(spec, model_cfg, seed=0)
    train_model(model, _counts_like(make_examples(600, seed=1)), spec, train_cfg, seed=0)
    snap = export_snapshot(model, spec, model_cfg, tmp_path / "s", "snap-norm")
    users = _counts_like(make_users(30, seed=4))
    users.loc[0, "d2"] = np.float32(1e9)  # clamped in every path
    u = encode_users(users, spec)
    with torch.no_grad():
        eager = model.user_tower(u.dense, u.sparse_ids, u.sparse_offsets).numpy()
    loaded, _ = load_user_tower(snap)
    assert torch.equal(loaded.dense_norm.features["d2"].std, model.user_tower.dense_norm.features["d2"].std)
    program = load_exported_tower(snap)
    for tower in (loaded, program):
        got = embed_users(tower, users, spec).astype(np.float32)
        np.testing.assert_allclose(got, eager, rtol=1e-3, atol=1e-3)


def test_weights_from_before_normalisation_load_unnormalised(tmp_path, spec, model_cfg):
    model = build_model(spec, model_cfg, seed=0)
    snap = export_snapshot(model, spec, model_cfg, tmp_path / "s", "snap-old")
    old = {k: v for k, v in load_file(str(snap / USER_TOWER_FILE)).items() if "dense_norm" not in k}
    save_file(old, str(tmp_path / "old.safetensors"))
    tower = build_model(spec, model_cfg, seed=5).user_tower
    _load_weights(tower, tmp_path / "old.safetensors")
    assert all(stats.fitted.item() == 0 for stats in tower.dense_norm.features.values())
    save_file({k: v for k, v in old.items() if "sparse_arch" not in k}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(Exception, match="do not match"):
        _load_weights(tower, tmp_path / "broken.safetensors")
