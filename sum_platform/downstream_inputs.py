"""What each downstream model reads of the user, from params: its specs and how much user signal that is.

``downstream.user_features`` gives each downstream model its own, smaller set of user features (the view's
first ``dense`` dense features and named id lists): constrained, not blind, as production models are (a few
hundred features of their own where SUM's user model reads thousands, paper §3.1, §6.1.3). SUM's gain on a
model is only interpretable next to how much of the user the model already sees, so
:func:`user_signal_share` measures that on the simulated world, where the user's hidden state is known.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Mapping

import numpy as np
import pandas as pd

from sum_models.downstream import DownstreamSpec, downstream_specs
from sum_platform.config import Params
from sum_platform.feature_store import spec_from_fields, user_feature_fields
from sum_platform.simulate import user_fields, world_on
from sum_platform.workspace import ds_str

__all__ = ["downstream_specs_for", "user_signal_share"]

#: Ridge penalties tried on the validation users (standardised features): the best one is scored on the test users.
RIDGE_PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def downstream_specs_for(params: Params, *, with_embeddings: bool = True,
                         user_features: Mapping[str, Mapping[str, Any]] | None = None,
                         names: list[str] | None = None) -> dict[str, DownstreamSpec]:
    """The downstream models' specs for the configured source (``downstream`` section, the user view's columns).

    Args:
        params: Platform params.
        with_embeddings: Whether the models consume the SUM embeddings (``model.num_embeddings`` x ``embedding_dim``).
        user_features: Per model ``{"dense": n, "lists": [...]}`` in place of ``downstream.user_features`` (a
            study's dose-response); a model not named keeps the params' entry.
        names: Models to build (default ``downstream.models``).

    Returns:
        name -> spec, in ``names`` order.
    """
    spec = spec_from_fields(user_feature_fields(params), params)
    cfg = params.downstream
    chosen = {m: f.model_dump() for m, f in cfg.user_features.items()}
    chosen.update({m: dict(f) for m, f in (user_features or {}).items()})
    return downstream_specs(params.events.ad_dense, params.events.ad_sparse, spec.user_dense, params.events.labels,
                            num_embeddings=params.model.num_embeddings, embedding_dim=params.model.embedding_dim,
                            with_embeddings=with_embeddings, names=names or cfg.models,
                            user_lists=spec.user_sparse, user_features=chosen, list_table_size=cfg.list_table_size)


def _bag(lists: pd.Series, size: int) -> np.ndarray:
    """Mean one-hot of each row's ids modulo ``size``: ``[N, size]`` (what a bag's mean of id vectors can read)."""
    out = np.zeros((len(lists), size))
    for i, ids in enumerate(lists):
        ids = np.mod(np.asarray(ids, dtype=np.int64), size)
        if len(ids):
            np.add.at(out[i], ids, 1.0 / len(ids))
    return out


def _ridge_r2(x: np.ndarray, y: np.ndarray, dense_columns: np.ndarray, rng: np.random.Generator) -> float:
    """Out-of-sample R^2 of a ridge regression of ``y [N, T]`` on ``x [N, F]``, pooled over the T targets
    (``dense_columns``: bool ``[F]``, which columns are dense values rather than id shares).

    Users are split 50/25/25 into fit / penalty choice / test, so a wide bag cannot explain by memorising.
    """
    n = len(y)
    order = rng.permutation(n)
    fit, val, test = np.split(order, [n // 2, (3 * n) // 4])

    def r2(rows: np.ndarray, pred: np.ndarray) -> float:
        resid = ((y[rows] - pred) ** 2).sum()
        total = ((y[rows] - y[fit].mean(axis=0)) ** 2).sum()
        return float(1.0 - resid / total)

    if x.shape[1] == 0:
        return r2(test, np.broadcast_to(y[fit].mean(axis=0), y[test].shape))
    # Dense columns standardised; bag columns (shares in [0, 1]) centred only: standardising would blow a
    # rare id's column up and let the fit lean on it.
    mu, sd = x[fit].mean(axis=0), x[fit].std(axis=0)
    sd[(sd == 0) | ~dense_columns] = 1.0
    z = (x - mu) / sd
    gram, cross, ym = z[fit].T @ z[fit], z[fit].T @ (y[fit] - y[fit].mean(axis=0)), y[fit].mean(axis=0)
    best = None
    for penalty in RIDGE_PENALTIES:
        beta = np.linalg.solve(gram + penalty * np.eye(len(gram)), cross)
        score = r2(val, z[val] @ beta + ym)
        if best is None or score > best[0]:
            best = (score, beta)
    assert best is not None
    return r2(test, z[test] @ best[1] + ym)


def user_signal_share(ds: str | date, params: Params, features: Mapping[str, Any],
                      seed: int = 0) -> dict[str, Any]:
    """How much of the simulated user's hidden state a set of user features explains linearly, on one day.

    The hidden state is the user's interest vector (what the user x ad affinity of the click and conversion
    logits reads) and the base click / conversion propensities. A ridge regression of each on the features
    (dense values as they are, each id list as its mean one-hot over ``downstream.list_table_size`` rows: what
    a mean-pooled bag can read linearly) is fitted on half the day's users and scored on a quarter it never saw
    (the penalty chosen on the other quarter). A linear read is a lower bound of what an MLP can extract; it is
    the same yardstick for every feature set, which is what a dose-response needs.

    Args:
        ds: The day (its users snapshot at 00:00).
        params: Params of the simulated source.
        features: ``{"dense": n, "lists": [...]}``: the view's first ``n`` dense features and these id lists.
        seed: The users' split.

    Returns:
        ``{"ds", "dense", "lists", "users", "interest_r2", "click_propensity_r2", "conversion_propensity_r2"}``;
        a propensity's R^2 is None when its sd is 0 (nothing to explain).
    """
    ds = ds_str(ds)
    fields = user_fields(params)
    world = world_on(ds, params, fields)
    users = world.user_frame(ds)
    spec = spec_from_fields(user_feature_fields(params), params)
    n_dense, lists = int(features["dense"]), list(features["lists"])
    if n_dense > len(spec.user_dense):
        raise ValueError(f"{n_dense} dense features asked; the view has {len(spec.user_dense)}")
    unknown = [c for c in lists if c not in spec.user_sparse]
    if unknown:
        raise ValueError(f"id list(s) {unknown} are not in the view ({sorted(spec.user_sparse)})")
    parts = [users[list(spec.user_dense[:n_dense])].to_numpy(np.float64)]
    for c in lists:
        parts.append(_bag(users[c], min(spec.user_sparse[c], params.downstream.list_table_size)))
    x = np.concatenate(parts, axis=1)
    dense_columns = np.arange(x.shape[1]) < n_dense
    out: dict[str, Any] = {"ds": ds, "dense": n_dense, "lists": lists, "users": len(users)}
    targets = {
        "interest_r2": world.user_vec * np.sqrt(params.simulator.latent_dim),
        "click_propensity_r2": world.click_propensity[:, None] if params.simulator.click_propensity_sd else None,
        "conversion_propensity_r2": (world.conversion_propensity[:, None]
                                     if params.simulator.conversion_propensity_sd else None),
    }
    for name, y in targets.items():
        out[name] = None if y is None else round(_ridge_r2(x, y, dense_columns, np.random.default_rng(seed)), 4)
    return out
