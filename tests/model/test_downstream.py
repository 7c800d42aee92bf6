"""Downstream models consuming the SUM embeddings (sum_models/downstream.py, downstream_train.py, importance.py).

Behavioural tests: shapes, determinism, minimum functionality (a label carried only by the embeddings is
learnt with them and not without, and permutation importance ranks the embedding first, as Table 1's FI),
invariance, direction, robustness to a wild dense value, warm start, and the docstring examples.
"""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pandas as pd
import pytest
import torch

import sum_models.downstream
import sum_models.downstream_train
import sum_models.importance
from sum_models.downstream import PRESETS, DownstreamModel, DownstreamSpec, downstream_specs
from sum_models.downstream_train import DownstreamData, evaluate_downstream, predict_downstream, train_downstream
from sum_models.importance import AVAILABLE_GROUP, permutation_importance, sum_embedding_rank
from sum_models.normalize import CLAMP

K, D = 2, 8
AD_DENSE = ("ad_quality", "ad_price")
AD_SPARSE = {"ad_id": 20, "ad_category": 4}
USER_DENSE = ("user_visits",)
FIT = dict(epochs=6, batch_size=128, lr=0.01, seed=0)


def make_impressions(n: int, seed: int, quality_weight: float = 0.0, missing: float = 0.0):
    """Impressions (simulator columns) and their users' embeddings ``[n, K, D]``.

    The click logit depends on embedding 1 only (plus ``quality_weight`` times the standardised
    ``ad_quality``); ``missing`` of the rows have no embedding (NaN rows).
    """
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, K, D)).astype(np.float32)
    quality = rng.normal(50.0, 10.0, size=n)  # raw units: standardising is the normaliser's job
    frame = pd.DataFrame(
        {
            "ad_id": rng.integers(0, AD_SPARSE["ad_id"], size=n),
            "ad_category": rng.integers(0, AD_SPARSE["ad_category"], size=n),
            "ad_quality": quality.astype(np.float32),
            "ad_price": rng.lognormal(0.0, 0.6, size=n).astype(np.float32),
            "user_visits": rng.poisson(300, size=n).astype(np.float32),
        }
    )
    logit = -1.0 + 2.5 * emb[:, 1, 0] - 1.5 * emb[:, 1, 1] + quality_weight * (quality - 50.0) / 10.0
    click = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    frame["click"] = click.astype(np.int64)
    frame["conversion"] = (click & (rng.random(n) < 0.4)).astype(np.int64)
    emb[rng.random(n) < missing] = np.nan
    return frame, emb


def specs(with_embeddings: bool = True) -> dict[str, DownstreamSpec]:
    return downstream_specs(AD_DENSE, AD_SPARSE, USER_DENSE, num_embeddings=K, embedding_dim=D,
                            with_embeddings=with_embeddings)


@pytest.fixture(scope="module")
def trained():
    """The click model with and without SUM, trained on the same rows; a held-out day to score."""
    train, train_emb = make_impressions(3000, seed=1)
    holdout, holdout_emb = make_impressions(1500, seed=2)
    click = specs()["click"]
    with_sum, _ = train_downstream(click, train, train_emb, **FIT)
    without, _ = train_downstream(click.with_embeddings(False), train, train_emb, **FIT)
    return {"with": with_sum, "without": without, "train": (train, train_emb), "holdout": (holdout, holdout_emb)}


# --- specs and shapes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("with_embeddings", [True, False])
def test_every_preset_scores_one_logit_per_row(name, with_embeddings):
    spec = specs(with_embeddings)[name]
    frame, emb = make_impressions(7, seed=0)
    data = DownstreamData.from_frame(spec, frame, emb)
    logits = data.logits(DownstreamModel(spec))
    assert logits.shape == (7,) and logits.dtype == torch.float32
    assert data.dense.shape == (7, len(spec.dense)) and data.categorical.shape == (7, len(spec.sparse))
    if with_embeddings:
        assert data.sum_embeddings.shape == (7, K, D) and data.has_embedding.shape == (7,)
    else:
        assert data.sum_embeddings is None and data.has_embedding is None


def test_the_presets_differ_as_the_papers_models_do():
    built = specs()
    size = {n: sum(p.numel() for p in DownstreamModel(s).parameters()) for n, s in built.items()}
    assert size["inbox"] < size["click"] < size["conversion"]
    assert built["conversion"].label == "conversion" and built["click"].label == built["inbox"].label == "click"
    inbox = DownstreamModel(built["inbox"])
    assert [type(m).__name__ for m in inbox.mlp.net] == ["Linear"]  # logistic regression
    # Two features: one ad dense value and the smallest categorical (a category, not the id table).
    assert built["inbox"].dense == ("ad_quality",) and built["inbox"].sparse == {"ad_category": 4}
    assert built["click"].feature_columns == ("ad_quality", "ad_price", "user_visits", "ad_id", "ad_category")


def test_specs_are_built_from_the_columns_a_dataset_has():
    movielens = downstream_specs(("ml_item_mean_rating", "ml_item_ratings_before"), {"ad_id": 1683, "ad_category": 19},
                                 with_embeddings=False)
    assert movielens["inbox"].dense == ("ml_item_mean_rating",) and movielens["inbox"].sparse == {"ad_category": 19}
    assert not any(s.uses_embeddings for s in movielens.values())
    assert list(downstream_specs(AD_DENSE, AD_SPARSE, names=["inbox"])) == ["inbox"]
    with pytest.raises(ValueError, match="'conversion'.*not among the labels"):
        downstream_specs(AD_DENSE, AD_SPARSE, labels=("click",))
    with pytest.raises(ValueError, match="unknown downstream preset"):
        downstream_specs(AD_DENSE, AD_SPARSE, names=["ranker"])
    spec = specs()["conversion"]
    assert DownstreamSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dense": ("a", "a")}, "twice"),
        ({"dense": ("click",)}, "its label"),
        ({"dense": ("a.b",)}, "no '.'"),
        ({"sparse": {"c": 0}}, "cardinalities"),
        ({}, "no input feature"),
    ],
)
def test_a_malformed_spec_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DownstreamSpec("m", "click", **kwargs)


def test_encoding_makes_missing_embeddings_explicit_and_rejects_bad_inputs():
    spec = specs()["click"]
    frame, emb = make_impressions(6, seed=3)
    emb[[1, 4]] = np.nan
    data = DownstreamData.from_frame(spec, frame, emb.astype(np.float16))  # served as fp16 (§5.3)
    assert data.sum_embeddings.dtype == torch.float32
    assert data.has_embedding.tolist() == [1, 0, 1, 1, 0, 1]
    assert torch.equal(data.sum_embeddings[[1, 4]], torch.zeros(2, K, D))
    partly = emb.copy()
    partly[0, 0, 0] = np.nan
    bad_cases = [
        ((frame, partly), "partly NaN"),
        ((frame, emb[:, :1]), r"must be \[6, 2, 8\]"),
        ((frame, None), "consumes SUM embeddings"),
        ((frame.drop(columns="ad_price"), emb), "missing dense"),
        ((frame.assign(ad_id=frame["ad_id"] + 20), emb), "outside"),
        ((frame.assign(ad_quality=np.inf), emb), "'ad_quality' has NaN/inf"),
        ((frame.assign(click=2), emb), "must be 0/1"),
    ]
    for (f, e), match in bad_cases:
        with pytest.raises(ValueError, match=match):
            DownstreamData.from_frame(spec, f, e)


def test_rows_encoded_once_take_each_arms_embeddings_as_a_fresh_encoding_would():
    frame, emb = make_impressions(300, seed=6, missing=0.2)
    spec = specs()["conversion"]
    once = DownstreamData.from_frame(spec.with_embeddings(False), frame)
    assert once.sum_embeddings is None
    for arm in (emb, emb[::-1].copy(), emb.astype(np.float16)):
        attached, fresh = once.with_embeddings(spec, arm), DownstreamData.from_frame(spec, frame, arm)
        for field in dataclasses.fields(DownstreamData):
            a, b = getattr(attached, field.name), getattr(fresh, field.name)
            assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b), \
                field.name
    assert once.with_embeddings(spec.with_embeddings(False), emb).sum_embeddings is None
    with pytest.raises(ValueError, match="one row per frame row"):
        once.with_embeddings(spec, emb[:10])
    # training on the encoded rows is training on the frame: the same weights
    a, _ = train_downstream(spec, frame, emb, epochs=1, batch_size=64, seed=2)
    b, _ = train_downstream(spec, once.with_embeddings(spec, emb), epochs=1, batch_size=64, seed=2)
    assert all(torch.equal(v, b.state_dict()[n]) for n, v in a.state_dict().items())
    with pytest.raises(ValueError, match="encoded without SUM embeddings"):
        train_downstream(spec, once, epochs=1)
    # a contiguous batch of rows is the gathered batch (training takes one gather per epoch, then these views)
    data = once.with_embeddings(spec, emb)
    sliced, gathered = data.rows(40, 104), data.select(torch.arange(40, 104))
    for field in dataclasses.fields(DownstreamData):
        a, b = getattr(sliced, field.name), getattr(gathered, field.name)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b), field.name


# --- determinism ------------------------------------------------------------------------------------------------


def test_training_is_deterministic_for_a_seed_and_leaves_the_callers_rng_alone():
    frame, emb = make_impressions(600, seed=4)
    spec = specs()["click"]
    rng_before = torch.random.get_rng_state()
    a, stats = train_downstream(spec, frame, emb, epochs=2, batch_size=64, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    b, _ = train_downstream(spec, frame, emb, epochs=2, batch_size=64, seed=3)
    c, _ = train_downstream(spec, frame, emb, epochs=2, batch_size=64, seed=4)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    assert not all(torch.equal(v, c.state_dict()[n]) for n, v in a.state_dict().items())
    assert stats.steps == 2 * 10 and stats.embedding_coverage == 1.0 and not stats.warm_start
    assert stats.normalized_features == ("ad_quality", "ad_price", "user_visits")


# --- minimum functionality: the embeddings carry the signal ----------------------------------------------------


def test_a_label_carried_by_the_embeddings_is_learnt_only_with_them(trained):
    holdout, emb = trained["holdout"]
    ne_with = evaluate_downstream(trained["with"], holdout, emb)
    ne_without = evaluate_downstream(trained["without"], holdout, emb)
    assert ne_without > 0.97  # nothing of the label is in the model's own features
    assert ne_with < ne_without - 0.2, (ne_with, ne_without)


def test_permutation_importance_ranks_the_signal_embedding_first(trained):
    holdout, emb = trained["holdout"]
    table = permutation_importance(trained["with"], holdout, emb, repeats=2, seed=0)
    assert table["feature"].iloc[0] == "sum_embedding_1" and table["rank"].tolist() == list(range(1, len(table) + 1))
    assert sum_embedding_rank(table) == 1
    assert set(table["feature"]) == {*specs()["click"].feature_columns, "sum_embedding_0", "sum_embedding_1"}
    assert table["ne_increase"].iloc[0] > 0.2 and table["ne_increase"].is_monotonic_decreasing
    assert table.attrs["base_ne"] == pytest.approx(evaluate_downstream(trained["with"], holdout, emb))
    again = permutation_importance(trained["with"], holdout, emb, repeats=2, seed=0)
    pd.testing.assert_frame_equal(table, again)  # seeded
    without = permutation_importance(trained["without"], holdout, emb, repeats=1)
    assert sum_embedding_rank(without) is None and len(without) == len(specs()["click"].feature_columns)


def test_rows_without_an_embedding_train_and_are_ranked_through_the_indicator():
    frame, emb = make_impressions(1200, seed=5, missing=0.3)
    model, stats = train_downstream(specs()["inbox"], frame, emb, epochs=3, batch_size=128, lr=0.02)
    assert 0.65 < stats.embedding_coverage < 0.75
    holdout, holdout_emb = make_impressions(600, seed=8, missing=0.3)
    table = permutation_importance(model, holdout, holdout_emb, repeats=1)
    assert AVAILABLE_GROUP in set(table["feature"]) and sum_embedding_rank(table) == 1


# --- invariance and direction -----------------------------------------------------------------------------------


def test_a_model_without_sum_rejects_embeddings_and_its_scores_ignore_them(trained):
    model = trained["without"]
    holdout, emb = trained["holdout"]
    data = DownstreamData.from_frame(model.spec, holdout)
    with pytest.raises(ValueError, match="built without SUM embeddings"):
        model(data.dense, data.categorical, torch.from_numpy(emb))
    # The encoder is where a spec picks its inputs: any embeddings (or none) give the same scores.
    scores = predict_downstream(model, data)
    shuffled = np.random.default_rng(0).permutation(emb)
    for e in (emb, shuffled, np.full_like(emb, np.nan)):
        assert np.array_equal(predict_downstream(model, DownstreamData.from_frame(model.spec, holdout, e)), scores)


def test_scores_move_in_the_direction_of_the_signal(trained):
    holdout, emb = trained["holdout"]
    model = trained["with"]

    def scores(e):
        return predict_downstream(model, DownstreamData.from_frame(model.spec, holdout, e))

    up, down = emb.copy(), emb.copy()
    up[:, 1, 0] += 1.0  # the coordinate that raises the click logit
    down[:, 1, 0] -= 1.0
    base = scores(emb)
    assert (scores(up) > base).mean() > 0.95 and (scores(down) < base).mean() > 0.95

    # A logistic regression is monotone in each input: more quality, more clicks.
    frame, e = make_impressions(1500, seed=6, quality_weight=1.0)
    inbox, _ = train_downstream(specs()["inbox"], frame, e, epochs=3, batch_size=128, lr=0.02)
    grid = frame.iloc[[0] * 5].assign(ad_quality=np.float32([30, 40, 50, 60, 70]))
    p = predict_downstream(inbox, DownstreamData.from_frame(inbox.spec, grid, e[[0] * 5]))
    assert (np.diff(p) > 0).all(), p


def test_a_wild_dense_value_moves_scores_no_further_than_five_sigma(trained):
    model = trained["with"]
    holdout, emb = trained["holdout"]
    rows, e = holdout.iloc[:20], emb[:20]
    stats = model.dense_norm.features["user_visits"]
    edge_hi = rows.assign(user_visits=np.float32(stats.mean.item() + CLAMP * stats.std.item()))
    edge_lo = rows.assign(user_visits=np.float32(stats.mean.item() - CLAMP * stats.std.item()))

    def scores(df):
        data = DownstreamData.from_frame(model.spec, df, e)
        with torch.no_grad():
            return data.logits(model)

    far_hi = scores(rows.assign(user_visits=np.float32(1e12)))
    far_lo = scores(rows.assign(user_visits=np.float32(-1e12)))
    assert torch.isfinite(far_hi).all() and torch.isfinite(far_lo).all()
    torch.testing.assert_close(far_hi, scores(edge_hi))
    torch.testing.assert_close(far_lo, scores(edge_lo))


# --- warm start -------------------------------------------------------------------------------------------------


def test_a_warm_start_continues_from_yesterdays_weights(trained):
    yesterday = trained["with"]
    before = {n: v.clone() for n, v in yesterday.state_dict().items()}
    today, today_emb = make_impressions(1500, seed=7)
    spec = yesterday.spec

    frozen, stats = train_downstream(spec, today, today_emb, epochs=1, lr=0.0, init_from=yesterday)
    assert stats.warm_start and stats.normalized_features == ()  # yesterday's statistics are kept
    for name, value in yesterday.state_dict().items():
        assert torch.equal(frozen.state_dict()[name], value), name

    warm, warm_stats = train_downstream(spec, today, today_emb, epochs=1, batch_size=128, init_from=yesterday)
    _, fresh_stats = train_downstream(spec, today, today_emb, epochs=1, batch_size=128)
    assert warm_stats.final_loss < fresh_stats.final_loss - 0.05  # starts where yesterday ended
    assert all(torch.equal(v, before[n]) for n, v in yesterday.state_dict().items())  # the parent is not changed
    assert warm is not yesterday

    renamed = dataclasses.replace(spec, name="click_v2")
    assert train_downstream(renamed, today, today_emb, epochs=1, lr=0.0, init_from=yesterday)[0].spec == renamed
    with pytest.raises(ValueError, match="another spec"):
        train_downstream(spec.with_embeddings(False), today, today_emb, init_from=yesterday)


# --- id lists (constrained, not blind: a downstream model's own user id lists) ---------------------------------


def _with_lists(n: int, seed: int):
    """Impressions whose click is decided by whether the user's ``pages`` list holds id 3 (ids up to 50, read
    modulo the table size 10: 13, 23, ... are 3 too), and an unrelated ``topics`` list."""
    rng = np.random.default_rng(seed)
    pages = [rng.integers(0, 50, size=rng.integers(0, 6)) for _ in range(n)]
    topics = [rng.integers(0, 7, size=3) for _ in range(n)]
    hit = np.array([bool((p % 10 == 3).any()) for p in pages])
    frame = pd.DataFrame({"ad_price": rng.lognormal(size=n).astype(np.float32), "pages": pages, "topics": topics})
    frame["click"] = (rng.random(n) < np.where(hit, 0.8, 0.05)).astype(np.int64)
    return frame


LIST_SPEC = DownstreamSpec("ctr", "click", dense=("ad_price",), lists={"topics": 7, "pages": 10}, hidden=(16,))


def test_id_lists_are_encoded_modulo_the_table_padded_and_a_missing_list_is_empty():
    frame = pd.DataFrame({"ad_price": [1.0, 2.0, 3.0], "click": [0, 1, 0],
                          "pages": [np.array([3, 27, 10]), np.array([], dtype=np.int64), None],
                          "topics": [np.array([1]), np.array([6, 2]), np.array([0])]})
    data = DownstreamData.from_frame(LIST_SPEC, frame)
    topics, pages = data.lists  # spec order
    assert pages.tolist() == [[3, 7, 0], [10, 10, 10], [10, 10, 10]] and pages.dtype == torch.int64
    assert topics.tolist() == [[1, 7], [6, 2], [0, 7]]
    logits = data.logits(DownstreamModel(LIST_SPEC))
    assert logits.shape == (3,)
    assert data.select(torch.tensor([2, 0])).lists[1].tolist() == [[10, 10, 10], [3, 7, 0]]
    # An empty list reads as zeros: the bag's padding row is never a value.
    bag = DownstreamModel(LIST_SPEC).bags["pages"]
    assert torch.equal(bag(pages[1:2]), torch.zeros(1, LIST_SPEC.sparse_dim))
    with pytest.raises(ValueError, match="reads 2 id list"):
        DownstreamModel(LIST_SPEC)(data.dense, data.categorical)
    with pytest.raises(ValueError, match="integer ids"):
        DownstreamData.from_frame(LIST_SPEC, frame.assign(topics=[np.array([0.5])] * 3))


def test_a_label_carried_by_an_id_list_is_learnt_through_its_bag_and_ranked_first():
    train, holdout = _with_lists(4000, seed=3), _with_lists(2000, seed=4)
    fit = dict(epochs=8, batch_size=128, lr=0.02, seed=0)
    model, _ = train_downstream(LIST_SPEC, train, **fit)
    blind, _ = train_downstream(dataclasses.replace(LIST_SPEC, lists={"topics": 7}), train, **fit)
    assert evaluate_downstream(model, holdout) < 0.75 < 0.97 < evaluate_downstream(blind, holdout)
    table = permutation_importance(model, holdout)
    assert table.iloc[0][["feature", "kind"]].tolist() == ["pages", "id_list"]


def test_a_spec_saved_before_id_lists_existed_still_loads_with_its_weights():
    old = specs()["click"]
    raw = old.to_dict()
    raw.pop("lists")  # a spec.json written before the field existed
    assert DownstreamSpec.from_dict(raw) == old and old.lists == {}
    weights = DownstreamModel(old).state_dict()
    assert not any(k.startswith("bags.") for k in weights)
    DownstreamModel(DownstreamSpec.from_dict(raw)).load_state_dict(weights)  # strict


def test_each_model_gets_the_user_features_it_is_given():
    user_dense = tuple(f"u{i}" for i in range(8))
    chosen = {"click": {"dense": 4, "lists": ["clicked_ad_categories"]}, "conversion": {"dense": 6, "lists": ["liked"]},
              "inbox": {"dense": 1, "lists": []}}
    built = downstream_specs(AD_DENSE, AD_SPARSE, user_dense, user_lists={"clicked_ad_categories": 64, "liked": 2000},
                             user_features=chosen, list_table_size=1024)
    assert built["click"].dense == (*AD_DENSE, "u0", "u1", "u2", "u3")
    assert built["click"].lists == {"clicked_ad_categories": 64} and built["conversion"].lists == {"liked": 1024}
    assert built["inbox"].dense == ("ad_quality", "u0") and built["inbox"].lists == {}
    assert DownstreamSpec.from_dict(built["conversion"].to_dict()) == built["conversion"]
    with pytest.raises(ValueError, match="asks for id list"):
        downstream_specs(AD_DENSE, AD_SPARSE, user_dense, user_features={"click": {"dense": 0, "lists": ["liked"]}})
    with pytest.raises(ValueError, match="asks for 9 user dense"):
        downstream_specs(AD_DENSE, AD_SPARSE, user_dense, user_features={"click": {"dense": 9, "lists": []}})


# --- docstring examples -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [sum_models.downstream, sum_models.downstream_train, sum_models.importance])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
