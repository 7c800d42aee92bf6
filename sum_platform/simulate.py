"""Seeded simulator of daily partitions that follow the data contract (ds-partitioned events and user features).

Hidden state: every user has a latent interest vector that random-walks from day to day; every sparse id
and every ad has a latent vector too, and a small share of sparse ids is redrawn each day (ids whose
meaning shifts, paper section 4). Observed user features are noisy views of the interests; an impression
is clicked with a probability that grows with the user-ad affinity, and converts with a probability that
depends on a second affinity. New users join every day.

The columns come from the Feast ``user_features`` view, so a feature a data scientist adds to
``feature_repo/definitions.py`` is generated too: a ``Float32`` field becomes a noisy projection of the
interests, an ``Array(Int64)`` field becomes an id list drawn from the interest-dependent id distribution
(tags ``hash_size`` and ``mean_length``). Everything is a pure function of ``(seed, ds)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd

from sum_platform.config import Params, SimulatorConfig
from sum_platform.feature_store import user_feature_fields
from sum_platform.files import write_partition
from sum_platform.workspace import Workspace, ds_str


@dataclass(frozen=True)
class FieldSpec:
    """One simulated user feature column."""

    name: str
    sparse: bool
    hash_size: int = 0
    mean_length: float = 0.0


def fields_from_feast(feast_fields: list) -> list[FieldSpec]:
    """Converts Feast ``Field`` objects of the user view into simulator field specs."""
    from feast.types import Array, Int32, Int64

    out = []
    for f in feast_fields:
        if f.dtype in (Array(Int64), Array(Int32)):
            out.append(
                FieldSpec(
                    f.name,
                    sparse=True,
                    hash_size=int(f.tags.get("hash_size", 1000)),
                    mean_length=float(f.tags.get("mean_length", 5)),
                )
            )
        else:
            out.append(FieldSpec(f.name, sparse=False))
    return out


def _name_seed(seed: int, name: str) -> int:
    # A stable per-feature seed, so adding a feature does not change the others' values.
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def day_index(ds: str | date, cfg: SimulatorConfig) -> int:
    """Days since the simulator's start date (0 for the first day)."""
    d = date.fromisoformat(ds_str(ds))
    idx = (d - date.fromisoformat(cfg.start_date)).days
    if idx < 0:
        raise ValueError(f"ds {ds_str(ds)} is before simulator.start_date {cfg.start_date}")
    return idx


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-9)


class World:
    """The hidden state of the simulated world on one day (built by replaying the days before)."""

    def __init__(self, cfg: SimulatorConfig, seed: int, fields: list[FieldSpec], day: int):
        self.cfg, self.seed, self.fields, self.day = cfg, seed, fields, day
        L = cfg.latent_dim
        base = np.random.default_rng([seed, 0])
        self.ad_vec = _unit_rows(base.normal(size=(cfg.n_ads, L)))
        self.ad_conv_vec = _unit_rows(base.normal(size=(cfg.n_ads, L)))
        self.ad_quality = base.beta(2.0, 2.0, size=cfg.n_ads)
        self.ad_price = base.lognormal(0.0, 0.6, size=cfg.n_ads)
        # Categories group ads of similar appeal, so a category id carries signal a model can learn.
        centers = _unit_rows(base.normal(size=(cfg.n_ad_categories, L)))
        self.ad_category = np.argmax(self.ad_vec @ centers.T, axis=1)
        self.id_vec = {
            f.name: _unit_rows(np.random.default_rng(_name_seed(seed, f.name)).normal(size=(f.hash_size, L)))
            for f in fields
            if f.sparse
        }
        self.dense_proj = {
            f.name: np.random.default_rng(_name_seed(seed, f.name)).normal(size=L) / np.sqrt(L)
            for f in fields
            if not f.sparse
        }
        self.user_vec = _unit_rows(base.normal(size=(cfg.initial_users, L)))
        self.user_activity = base.gamma(2.0, 1.0, size=cfg.initial_users)
        for d in range(1, day + 1):
            self._advance(d)

    def _advance(self, d: int) -> None:
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, 1, d])
        step = cfg.interest_drift
        self.user_vec = _unit_rows(self.user_vec + step * rng.normal(size=self.user_vec.shape))
        for name, vec in self.id_vec.items():
            n_shift = int(round(cfg.id_meaning_shift * len(vec)))
            if n_shift:
                ids = rng.choice(len(vec), size=n_shift, replace=False)
                vec[ids] = _unit_rows(rng.normal(size=(n_shift, vec.shape[1])))
        new = cfg.new_users_per_day
        self.user_vec = np.vstack([self.user_vec, _unit_rows(rng.normal(size=(new, cfg.latent_dim)))])
        self.user_activity = np.concatenate([self.user_activity, rng.gamma(2.0, 1.0, size=new)])

    @property
    def n_users(self) -> int:
        return len(self.user_vec)

    def user_frame(self, ds: str) -> pd.DataFrame:
        """The user feature snapshot of the day: one row per existing user."""
        rng = np.random.default_rng([self.seed, 2, self.day])
        n = self.n_users
        ts = pd.Timestamp(ds, tz="UTC")
        cols: dict[str, object] = {
            "user_id": np.arange(n, dtype=np.int64),
            "event_ts": pd.Series([ts] * n, dtype="datetime64[us, UTC]"),
        }
        for f in self.fields:
            if f.sparse:
                cols[f.name] = self._sample_ids(f, rng)
            else:
                signal = self.user_vec @ self.dense_proj[f.name] * np.sqrt(self.cfg.latent_dim)
                noise = rng.normal(scale=0.3, size=n)
                cols[f.name] = (signal + noise + 0.2 * np.log1p(self.user_activity)).astype(np.float32)
        return pd.DataFrame(cols)

    def _sample_ids(self, f: FieldSpec, rng: np.random.Generator) -> list[np.ndarray]:
        # Per-user categorical over the id space, softmax of interest affinity; row-wise inverse CDF.
        logits = self.cfg.interest_strength * 2.0 * (self.user_vec @ self.id_vec[f.name].T)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(probs, axis=1)
        cdf /= cdf[:, -1:]
        lengths = np.minimum(rng.poisson(f.mean_length, size=self.n_users), int(4 * f.mean_length) + 1)
        rows = np.repeat(np.arange(self.n_users), lengths)
        u = rng.random(len(rows))
        flat = (cdf + np.arange(self.n_users)[:, None]).ravel()
        ids = np.searchsorted(flat, u + rows) - rows * f.hash_size
        ids = np.minimum(ids, f.hash_size - 1).astype(np.int64)
        return np.split(ids, np.cumsum(lengths)[:-1])

    def events_frame(self, ds: str) -> pd.DataFrame:
        """The day's impressions with click and conversion labels."""
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, 3, self.day])
        active = np.flatnonzero(rng.random(self.n_users) < cfg.active_fraction)
        counts = 1 + rng.poisson(cfg.impressions_per_active_user * np.sqrt(self.user_activity[active]))
        users = np.repeat(active, counts)
        n = len(users)
        ads = rng.integers(0, cfg.n_ads, size=n)
        affinity = np.einsum("ij,ij->i", self.user_vec[users], self.ad_vec[ads])
        click_logit = cfg.base_click_logit + cfg.interest_strength * 2.0 * affinity + self.ad_quality[ads]
        click = rng.random(n) < 1.0 / (1.0 + np.exp(-click_logit))
        conv_aff = np.einsum("ij,ij->i", self.user_vec[users], self.ad_conv_vec[ads])
        conv_logit = cfg.base_conversion_logit + cfg.interest_strength * conv_aff
        conversion = click & (rng.random(n) < 1.0 / (1.0 + np.exp(-conv_logit)))
        start = pd.Timestamp(ds, tz="UTC")
        seconds = np.sort(rng.integers(0, 86_400_000_000, size=n))
        order = rng.permutation(n)  # impressions of a user are spread over the day
        return pd.DataFrame(
            {
                "impression_id": [f"{ds}-{i:08d}" for i in range(n)],
                "user_id": users[order].astype(np.int64),
                "event_ts": (start + pd.to_timedelta(seconds, unit="us")).astype("datetime64[us, UTC]"),
                "ad_id": ads[order].astype(np.int64),
                "ad_category": self.ad_category[ads[order]].astype(np.int64),
                "ad_quality": self.ad_quality[ads[order]].astype(np.float32),
                "ad_price": self.ad_price[ads[order]].astype(np.float32),
                "click": click[order].astype(np.int8),
                "conversion": conversion[order].astype(np.int8),
            }
        )


def user_fields(params: Params) -> list[FieldSpec]:
    """The user feature columns the feature repo declares, as simulator fields."""
    return fields_from_feast(user_feature_fields(params))


def simulate_day(ds: str | date, params: Params, fields: list[FieldSpec] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generates one day's partitions.

    Args:
        ds: The logical date.
        params: Platform params (``simulator`` section and ``seed``).
        fields: The user feature columns to generate; default: the feature repo's (:func:`user_fields`).

    Returns:
        ``(events, users)`` data frames following the data contract.
    """
    ds = ds_str(ds)
    fields = user_fields(params) if fields is None else fields
    world = World(params.simulator, params.seed, fields, day_index(ds, params.simulator))
    return world.events_frame(ds), world.user_frame(ds)


def write_day(ds: str | date, params: Params, ws: Workspace, fields: list[FieldSpec] | None = None,
              overwrite: bool = False) -> dict:
    """Writes the day's events and users partitions unless they exist (or ``overwrite``).

    Returns:
        Row counts and whether anything was written.
    """
    ds = ds_str(ds)
    targets = (ws.events_dir(ds), ws.users_dir(ds))
    if not overwrite and all(any(t.glob("*.parquet")) for t in targets if t.exists()) and all(
        t.exists() for t in targets
    ):
        return {"ds": ds, "written": False}
    events, users = simulate_day(ds, params, fields)
    write_partition(events, ws.events_dir(ds))
    write_partition(users, ws.users_dir(ds))
    return {"ds": ds, "written": True, "events": len(events), "users": len(users)}
