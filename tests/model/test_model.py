"""SUM model: shapes, gradient flow, snapshots, training and determinism (exported tower: test_export.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sum_models.data import encode_examples, encode_users
from sum_models.loss import MultiTaskBCELoss
from sum_models.model import SpecMismatchError, build_model
from sum_models.spec import FeatureSpec
from sum_models.snapshot import SnapshotError, embed_users, export_snapshot, load_model, load_user_tower
from sum_models.train import evaluate_ne, train_model
from sum_models.user_tower import UserTower


def _forward(model, df, spec):
    users, ad_sparse, ad_dense, labels = encode_examples(df, spec)
    return model(users.dense, users.sparse_ids, users.sparse_offsets, ad_sparse, ad_dense), labels


def _eager_embeddings(tower, users_df, spec) -> np.ndarray:
    inputs = encode_users(users_df, spec)
    with torch.no_grad():
        return tower(inputs.dense, inputs.sparse_ids, inputs.sparse_offsets).numpy()


def test_output_shapes(spec, model_cfg, make_examples):
    model = build_model(spec, model_cfg, seed=0)
    df = make_examples(9, seed=0)
    logits, _ = _forward(model, df, spec)
    assert logits.shape == (9, 2) and logits.dtype == torch.float32
    users = encode_users(df, spec)
    emb = model.user_tower(users.dense, users.sparse_ids, users.sparse_offsets)
    assert emb.shape == (9, model_cfg["num_embeddings"], model_cfg["embedding_dim"])


def test_default_config_is_k2_d96(spec, make_users):
    model = build_model(spec, None, seed=0)
    users = encode_users(make_users(3, seed=0), spec)
    assert model.user_tower(users.dense, users.sparse_ids, users.sparse_offsets).shape == (3, 2, 96)


def test_gradients_reach_every_parameter(spec, model_cfg, make_examples):
    model = build_model(spec, model_cfg, seed=0)
    logits, labels = _forward(model, make_examples(64, seed=0), spec)
    MultiTaskBCELoss(spec.labels, {"click": 1.0, "conversion": 0.5})(logits, labels).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert float(param.grad.abs().sum()) > 0, name


def test_loss_is_weighted_eq8(spec):
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.2, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    p = torch.sigmoid(logits).double()
    y = labels.double()
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    want = -((y * p.log() + (1 - y) * (1 - p).log()) * w).sum(1).mean()
    got = MultiTaskBCELoss(spec.labels, {"click": 1.0, "conversion": 0.5})(logits, labels)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_export_and_load_user_tower_fp16_roundtrip(spec, model_cfg, tmp_path, make_users):
    model = build_model(spec, model_cfg, seed=0)
    out = export_snapshot(model, spec, model_cfg, tmp_path / "snap-1", "snap-1", extra={"ne": 0.9}, program=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "user_tower.safetensors",
    ]
    tower, manifest = load_user_tower(out)
    assert isinstance(tower, UserTower) and not tower.training
    assert manifest["snapshot_id"] == "snap-1" and manifest["extra"] == {"ne": 0.9}
    assert set(manifest["sha256"]) == {"user_tower.safetensors", "model.safetensors", "config.json"}
    users_df = make_users(50, seed=3)
    got = embed_users(tower, users_df, spec, batch_size=16)  # several batches, order kept
    want = _eager_embeddings(model.user_tower, users_df, spec)
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    g, w = got.astype(np.float64), want.astype(np.float64)
    cosine = (g * w).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(w, axis=-1))
    assert cosine.min() >= 0.999


def test_load_model_restores_whole_model(spec, model_cfg, tmp_path, make_examples):
    model = build_model(spec, model_cfg, seed=0)
    export_snapshot(model, spec, model_cfg, tmp_path / "s", "s", program=False)
    loaded, manifest = load_model(tmp_path / "s")
    df = make_examples(20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(_forward(loaded, df, spec)[0], _forward(model, df, spec)[0])
    assert loaded.spec == spec and manifest["snapshot_id"] == "s"


def test_reexport_replaces_atomically(spec, model_cfg, tmp_path, make_users):
    first = build_model(spec, model_cfg, seed=0)
    second = build_model(spec, model_cfg, seed=1)
    export_snapshot(first, spec, model_cfg, tmp_path / "s", "s", program=False)
    export_snapshot(second, spec, model_cfg, tmp_path / "s", "s", program=False)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp / old dirs left behind
    tower, _ = load_user_tower(tmp_path / "s")
    users_df = make_users(5, seed=0)
    np.testing.assert_allclose(
        _eager_embeddings(tower, users_df, spec), _eager_embeddings(second.user_tower, users_df, spec)
    )


def test_export_rejects_mismatched_config(spec, model_cfg, tmp_path):
    model = build_model(spec, model_cfg, seed=0)
    with pytest.raises(ValueError, match="embedding_dim"):
        export_snapshot(model, spec, {**model_cfg, "embedding_dim": 16}, tmp_path / "s", "s", program=False)
    assert not (tmp_path / "s").exists()


def test_corrupt_or_missing_files_raise_snapshot_error(spec, model_cfg, tmp_path):
    model = build_model(spec, model_cfg, seed=0)
    snap = export_snapshot(model, spec, model_cfg, tmp_path / "s", "s", program=False)
    weights = snap / "user_tower.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="corrupt"):
        load_user_tower(snap)
    with pytest.raises(SnapshotError, match="corrupt"):
        load_model(snap)

    snap = export_snapshot(model, spec, model_cfg, tmp_path / "s", "s", program=False)
    (snap / "model.safetensors").unlink()
    with pytest.raises(SnapshotError, match="missing"):
        load_user_tower(snap)
    (snap / "manifest.json").unlink()
    with pytest.raises(SnapshotError, match="manifest.json"):
        load_model(snap)
    with pytest.raises(SnapshotError, match="does not exist"):
        load_user_tower(tmp_path / "nope")


def test_training_learns_sparse_signal(spec, model_cfg, train_cfg, make_examples):
    # Here click depends on the user only (a signal page in the sparse "pages" list), not on the ad. The user
    # signal reaches the mix tower only through dot products of the user embeddings with the ad tokens
    # (paper §3.3, DLRM-style), which picks up a user-only effect after a slower start than a flat MLP over
    # the embeddings (the walking skeleton's 4 epochs; it memorised the simulator's users instead): 8 epochs.
    train_cfg = {**train_cfg, "epochs": 8}
    df = make_examples(3000, seed=0)
    train, holdout = df.iloc[:2400], df.iloc[2400:]
    model = build_model(spec, model_cfg, seed=0)
    before = evaluate_ne(model, holdout, spec)
    stats = train_model(model, train, spec, train_cfg, seed=0, progress=False)
    after = evaluate_ne(model, holdout, spec)
    assert stats.examples == 2400 and stats.epochs == train_cfg["epochs"]
    assert stats.steps == train_cfg["epochs"] * 19
    assert np.isfinite(stats.final_loss) and stats.final_loss < stats.epoch_losses[0]
    # The rate is over the optimizer loop, a part of the whole call's time: rate x call time >= examples seen.
    assert stats.examples_per_second * stats.seconds >= stats.examples * stats.epochs > 0
    assert after["click"] < 0.85, after
    assert after["click"] < before["click"]
    assert after["conversion"] < 1.0, after


def test_training_is_deterministic_under_a_seed(spec, model_cfg, make_examples):
    df = make_examples(400, seed=5)
    cfg = {"batch_size": 64, "epochs": 2, "learning_rate": 0.01, "task_weights": {"click": 1.0}}
    states = []
    for _ in range(2):
        model = build_model(spec, model_cfg, seed=11)
        train_model(model, df, spec, cfg, seed=3, progress=False)
        states.append(model.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    other = build_model(spec, model_cfg, seed=11)
    train_model(other, df, spec, cfg, seed=4, progress=False)  # another shuffle -> other weights
    assert not all(torch.equal(states[0][n], t) for n, t in other.state_dict().items())


def test_adagrad_and_unknown_optimizer(spec, model_cfg, make_examples):
    df = make_examples(100, seed=0)
    model = build_model(spec, model_cfg, seed=0)
    stats = train_model(model, df, spec, {"epochs": 1, "batch_size": 50, "optimizer": "adagrad"}, 0, progress=False)
    assert stats.steps == 2
    with pytest.raises(ValueError, match="optimizer"):
        train_model(model, df, spec, {"optimizer": "sgdx"}, 0, progress=False)


def test_spec_mismatch_is_a_clear_error(spec, model_cfg, tmp_path, make_examples):
    model = build_model(spec, model_cfg, seed=0)
    reordered = FeatureSpec(
        user_dense=spec.user_dense,
        user_sparse=dict(reversed(list(spec.user_sparse.items()))),  # equal as dicts, different order
        ad_dense=spec.ad_dense,
        ad_sparse=spec.ad_sparse,
        labels=spec.labels,
    )
    df = make_examples(30, seed=0)
    with pytest.raises(SpecMismatchError, match="user_sparse"):
        evaluate_ne(model, df, reordered)
    with pytest.raises(SpecMismatchError):
        embed_users(model.user_tower, df, reordered)
    with pytest.raises(SpecMismatchError):
        train_model(model, df, reordered, {"epochs": 1}, 0, progress=False)
    # The spec (with its order) survives the snapshot round trip.
    export_snapshot(model, spec, model_cfg, tmp_path / "s", "s", program=False)
    tower, _ = load_user_tower(tmp_path / "s")
    assert list(tower.spec.user_sparse) == list(spec.user_sparse)


def test_tables_are_keyed_by_feature_name(spec, model_cfg):
    keys = set(build_model(spec, model_cfg, seed=0).state_dict())
    for name in spec.user_sparse:
        assert f"user_tower.sparse_arch.bags.{name}.weight" in keys
    for name in spec.user_dense:
        assert f"user_tower.dense_arch.features.{name}.weight" in keys
    for name in spec.ad_sparse:
        assert f"mix_tower.ad_arch.tables.{name}.weight" in keys
    for label in spec.labels:
        assert any(k.startswith(f"mix_tower.heads.{label}.") for k in keys)


def test_prior_init_only_for_a_fresh_model(spec, model_cfg, tmp_path, make_examples):
    model = build_model(spec, model_cfg, seed=0)
    model.mix_tower.init_task_priors(torch.tensor([0.2, 0.05]))
    biases = [h.net[-1].bias.item() for h in model.mix_tower.heads.values()]
    assert biases == pytest.approx([np.log(0.2 / 0.8), np.log(0.05 / 0.95)], rel=1e-6)

    df = make_examples(200, seed=0)
    cfg = {"epochs": 1, "batch_size": 100, "learning_rate": 0.0}  # lr 0: only the prior init can move weights
    fresh = build_model(spec, model_cfg, seed=0)
    stats = train_model(fresh, df, spec, cfg, 0, progress=False)
    assert stats.fresh_model and int(fresh.examples_seen) == 200
    rate = df["click"].mean()
    assert fresh.mix_tower.heads["click"].net[-1].bias.item() == pytest.approx(np.log(rate / (1 - rate)), rel=1e-5)

    export_snapshot(fresh, spec, model_cfg, tmp_path / "s", "s", program=False)
    warm, _ = load_model(tmp_path / "s")
    assert int(warm.examples_seen) == 200
    warm.mix_tower.heads["click"].net[-1].bias.data.fill_(0.5)
    stats = train_model(warm, df, spec, cfg, 0, progress=False)
    assert not stats.fresh_model and int(warm.examples_seen) == 400
    assert warm.mix_tower.heads["click"].net[-1].bias.item() == pytest.approx(0.5)  # warm start kept


def test_embed_users_finite_skips_only_the_bad_users(spec, model_cfg, make_users):
    """One user's non-finite input (or overflowing embedding) is skipped, the other users get exactly what
    embed_users gives them; embed_users itself still refuses the whole frame."""
    from sum_models.data import finite_rows
    from sum_models.snapshot import embed_users_finite, skipped_users

    tower = build_model(spec, model_cfg, seed=0).user_tower.eval()
    users = make_users(40, seed=5)
    column = spec.user_dense[0]
    users[column] = users[column].astype(np.float64)  # holds 1e39 as written; the model reads float32 (inf)
    users.loc[3, column], users.loc[7, column], users.loc[11, column] = np.inf, np.nan, 1e39  # inf as float32
    users.loc[20, column] = 1e30  # finite input; the tower's output overflows fp16
    assert finite_rows(users, spec.user_dense).tolist() == [i not in (3, 7, 11) for i in range(40)]
    emb, skipped = embed_users_finite(tower, users, spec, batch_size=8)
    assert emb.shape == (40, tower.num_embeddings, tower.embedding_dim) and emb.dtype == np.float16
    assert {i: r for i, r in enumerate(skipped) if r} == {
        3: "nonfinite_features", 7: "nonfinite_features", 11: "nonfinite_features", 20: "nonfinite_embedding"}
    assert np.isnan(emb[[3, 7, 11]]).all() and not np.isfinite(emb[20]).all()
    ok = skipped == ""
    clean = users.drop(index=[3, 7, 11, 20]).reset_index(drop=True)
    np.testing.assert_allclose(emb[ok].astype(np.float32), embed_users(tower, clean, spec).astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    # A frame without a bad row: embed_users' values, bit for bit (the same blocks through the tower).
    good = make_users(40, seed=6)
    emb_good, none = embed_users_finite(tower, good, spec, batch_size=8)
    assert not any(none)
    np.testing.assert_array_equal(emb_good, embed_users(tower, good, spec, batch_size=8))
    assert skipped_users(users["user_id"], skipped) == {
        "nonfinite_embedding": {"count": 1, "users": [int(users.at[20, "user_id"])]},
        "nonfinite_features": {"count": 3, "users": [int(users.at[i, "user_id"]) for i in (3, 7, 11)]}}
    with pytest.raises(ValueError):
        embed_users(tower, users, spec)


def test_user_row_is_finite(spec):
    from sum_models.data import user_row_is_finite

    row = {name: 0.5 for name in spec.user_dense}
    assert user_row_is_finite(row, spec) and user_row_is_finite({**row, spec.user_dense[1]: None}, spec)
    for bad in (np.inf, np.nan, 1e39):
        assert not user_row_is_finite({**row, spec.user_dense[2]: bad}, spec)


def test_embed_user_rows_finite_gives_what_the_frame_path_gives(spec, model_cfg, make_users):
    from sum_models.snapshot import embed_user_rows_finite, embed_users_finite

    tower = build_model(spec, model_cfg, seed=0).user_tower.eval()
    users = make_users(20, seed=8)
    users[spec.user_dense[0]] = users[spec.user_dense[0]].astype(np.float64)
    users.loc[2, spec.user_dense[0]], users.loc[5, spec.user_dense[0]] = np.inf, 1e30
    rows = [{c: users.at[i, c] for c in (*spec.user_dense, *spec.user_sparse)} for i in range(len(users))]
    emb_rows, skipped_rows = embed_user_rows_finite(tower, rows, batch_size=8)
    emb_frame, skipped_frame = embed_users_finite(tower, users, spec, batch_size=8)
    assert skipped_rows.tolist() == skipped_frame.tolist() and skipped_rows[2] == "nonfinite_features"
    assert skipped_rows[5] == "nonfinite_embedding"
    ok = skipped_rows == ""
    np.testing.assert_array_equal(emb_rows[ok], emb_frame[ok])


def test_the_skip_and_count_embedders_take_an_empty_batch(spec, model_cfg, make_users):
    """A compute batch whose users all lack features reaches the tower with no row: no error, nothing skipped."""
    from sum_models.snapshot import embed_user_rows_finite, embed_users_finite

    tower = build_model(spec, model_cfg, seed=0).user_tower.eval()
    emb, skipped = embed_user_rows_finite(tower, [])
    assert emb.shape == (0, tower.num_embeddings, tower.embedding_dim) and skipped.shape == (0,)
    emb, skipped = embed_users_finite(tower, make_users(3, seed=1).head(0), spec)
    assert emb.shape[0] == 0 and skipped.shape == (0,)
