"""Seeded simulator of daily partitions that follow the data contract (ds-partitioned events and user features).

Hidden state: every user has a latent interest vector that random-walks from day to day; every sparse id
and every ad has a latent vector too, and a small share of sparse ids is redrawn each day (ids whose
meaning shifts, paper section 4). Observed user features are noisy views of the interests; an impression
is clicked with a probability that grows with the user-ad affinity (plus the user's base propensity, if
any), and converts with a probability that depends on a second affinity. New users join every day.

Knobs of ``simulator`` (each a modelling choice on its own; the defaults keep the original world, the
``study`` profile turns them on): per-user click / conversion propensities, sticky features (dense features
as an EMA of daily views, id lists that turn over a share of their ids a day; :class:`World`), intra-day
feature updates (a click appends the clicked ad's id to the user's engagement list in a new users row later
that day, so the users partition becomes a time series read point-in-time; :meth:`World.intraday_frame`),
and the world's own seed (each study seed draws an independent world; :func:`simulation_seed`).

The columns come from the Feast ``user_features`` view, so a feature a data scientist adds to
``feature_repo/definitions.py`` is generated too: a ``Float32`` field becomes a noisy projection of the
interests, an ``Array(Int64)`` field becomes an id list drawn from the interest-dependent id distribution
(tags ``hash_size`` and ``mean_length``). Everything is a pure function of ``(seed, simulator params, ds)``;
consecutive days advance a cached world instead of replaying from the start (:func:`world_on`).
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
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
    """The hidden state of the simulated world on one day (built by replaying the days before).

    Two regimes, chosen by ``simulator.dense_ema_weight`` and ``simulator.list_turnover``:

    - *memoryless* (both 1.0): a day's observed features are drawn afresh from that day's latent state (the
      simulator's original behaviour, value for value);
    - *sticky* (either below 1.0): observed features carry a state from day to day. A dense feature is an
      exponential moving average of daily noisy observations of the latent (real profile features such as
      "sessions in the last 7 days" are trailing-window aggregates, not a fresh measurement each day); an id
      list keeps its length and replaces each of its ids with probability ``list_turnover`` a day by a draw
      from the user's current interests (liked pages and followed topics accumulate slowly).

    Either way a user may have a base click and conversion propensity (a logit offset drawn once when the user
    joins, sd ``click_propensity_sd`` / ``conversion_propensity_sd``): real users differ in how often they click
    whatever they are shown. Every dense feature observes the propensities through a fixed random loading (a
    profile statistic like a 30-day click rate reflects them), so they are linear in the user's features.
    """

    def __init__(self, cfg: SimulatorConfig, seed: int, fields: list[FieldSpec], day: int):
        self.cfg, self.seed, self.fields = cfg, seed, fields
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
        # How much each dense feature reflects the (click, conversion) propensities: N(0, 1) per feature.
        self.propensity_load = {
            f.name: np.random.default_rng(_name_seed(seed, f"propensity:{f.name}")).normal(size=2)
            for f in fields
            if not f.sparse
        }
        if cfg.intraday_updates:
            engaged = next((f for f in fields if f.name == cfg.intraday_list), None)
            if engaged is None or not engaged.sparse:
                raise ValueError(f"simulator.intraday_list {cfg.intraday_list!r} is not an id-list feature of the "
                                 f"user view ({[f.name for f in fields if f.sparse]})")
        self.user_vec = _unit_rows(base.normal(size=(cfg.initial_users, L)))
        self.user_activity = base.gamma(2.0, 1.0, size=cfg.initial_users)
        # A stream of its own: the memoryless world without propensities keeps its values.
        self.click_propensity, self.conversion_propensity = self._propensities(
            np.random.default_rng([seed, 5, 0]), cfg.initial_users)
        self.sticky = cfg.dense_ema_weight < 1.0 or cfg.list_turnover < 1.0
        self.dense_state: dict[str, np.ndarray] = {}
        self.list_state: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (ids flat, lengths [N])
        self.day = 0
        if self.sticky:
            self._observe(0, first_new=0)
        self.advance_to(day)

    def _propensities(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(size=(2, n))
        return self.cfg.click_propensity_sd * z[0], self.cfg.conversion_propensity_sd * z[1]

    def advance_to(self, day: int) -> "World":
        """Replays the days after the current one up to ``day`` (no earlier than the current day)."""
        if day < self.day:
            raise ValueError(f"cannot rewind the world from day {self.day} to day {day}")
        for d in range(self.day + 1, day + 1):
            self._advance(d)
        return self

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
        old = self.n_users
        self.user_vec = np.vstack([self.user_vec, _unit_rows(rng.normal(size=(new, cfg.latent_dim)))])
        self.user_activity = np.concatenate([self.user_activity, rng.gamma(2.0, 1.0, size=new)])
        click, conv = self._propensities(np.random.default_rng([self.seed, 5, d]), new)
        self.click_propensity = np.concatenate([self.click_propensity, click])
        self.conversion_propensity = np.concatenate([self.conversion_propensity, conv])
        self.day = d
        if self.sticky:
            self._observe(d, first_new=old)

    @property
    def n_users(self) -> int:
        return len(self.user_vec)

    # --- observed user features ---------------------------------------------------------------------------------
    def _dense_observation(self, name: str, noise: np.ndarray) -> np.ndarray:
        """One day's noisy view of the latent (and the propensities) through feature ``name``: float64 ``[N]``."""
        signal = self.user_vec @ self.dense_proj[name] * np.sqrt(self.cfg.latent_dim)
        load = self.propensity_load[name]
        propensity = load[0] * self.click_propensity + load[1] * self.conversion_propensity
        return signal + propensity + noise + 0.2 * np.log1p(self.user_activity)

    def _field_rng(self, kind: int, d: int, name: str) -> np.random.Generator:
        # Per feature and day: adding a feature does not change the others' values.
        return np.random.default_rng([self.seed, kind, d, _name_seed(self.seed, name) & 0xFFFFFFFF])

    def _observe(self, d: int, first_new: int) -> None:
        """Sticky regime: today's observation folded into the carried features (new users start from it)."""
        cfg, n = self.cfg, self.n_users
        for f in self.fields:
            rng = self._field_rng(2, d, f.name)
            if not f.sparse:
                obs = self._dense_observation(f.name, rng.normal(scale=0.3, size=n))
                state = self.dense_state.get(f.name)
                if state is None:
                    self.dense_state[f.name] = obs
                else:
                    a = cfg.dense_ema_weight
                    carried = (1.0 - a) * state + a * obs[:first_new]
                    self.dense_state[f.name] = np.concatenate([carried, obs[first_new:]])
                continue
            new_users = np.arange(first_new, n)
            new_lengths = np.minimum(rng.poisson(f.mean_length, size=len(new_users)), int(4 * f.mean_length) + 1)
            new_ids = self._draw_ids(f, new_users, new_lengths, rng)
            if f.name not in self.list_state:
                self.list_state[f.name] = (new_ids, new_lengths)
                continue
            ids, lengths = self.list_state[f.name]
            ids = ids.copy()
            owner = np.repeat(np.arange(len(lengths)), lengths)
            replaced = rng.random(len(ids)) < cfg.list_turnover
            counts = np.bincount(owner[replaced], minlength=len(lengths))
            users = np.flatnonzero(counts)
            # Draws come out grouped by user in ascending order, as the replaced slots lie in the flat array.
            ids[replaced] = self._draw_ids(f, users, counts[users], rng)
            self.list_state[f.name] = (np.concatenate([ids, new_ids]), np.concatenate([lengths, new_lengths]))

    def _draw_ids(self, f: FieldSpec, users: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``counts[i]`` ids for each of ``users`` from their current interests: int64, grouped by user in order."""
        if len(users) == 0 or counts.sum() == 0:
            return np.zeros(0, dtype=np.int64)
        # Per-user categorical over the id space, softmax of interest affinity; row-wise inverse CDF.
        # In place: the matrices are [users, hash_size] (the same arithmetic as out of place, without copies).
        cdf = self.cfg.interest_strength * 2.0 * (self.user_vec[users] @ self.id_vec[f.name].T)
        cdf -= cdf.max(axis=1, keepdims=True)
        np.exp(cdf, out=cdf)
        np.cumsum(cdf, axis=1, out=cdf)
        cdf /= cdf[:, -1:]
        rows = np.repeat(np.arange(len(users)), counts)
        u = rng.random(len(rows))
        cdf += np.arange(len(users))[:, None]
        ids = np.searchsorted(cdf.ravel(), u + rows) - rows * f.hash_size
        return np.minimum(ids, f.hash_size - 1).astype(np.int64)

    def user_frame(self, ds: str) -> pd.DataFrame:
        """The user feature snapshot of the day: one row per existing user, stamped ``ds`` 00:00 UTC."""
        n = self.n_users
        ts = pd.Timestamp(ds, tz="UTC")
        cols: dict[str, object] = {
            "user_id": np.arange(n, dtype=np.int64),
            "event_ts": pd.Series([ts] * n, dtype="datetime64[us, UTC]"),
        }
        if self.sticky:
            for f in self.fields:
                if f.sparse:
                    ids, lengths = self.list_state[f.name]
                    cols[f.name] = np.split(ids, np.cumsum(lengths)[:-1])
                else:
                    cols[f.name] = self.dense_state[f.name].astype(np.float32)
            return pd.DataFrame(cols)
        rng = np.random.default_rng([self.seed, 2, self.day])
        for f in self.fields:
            if f.sparse:
                lengths = np.minimum(rng.poisson(f.mean_length, size=n), int(4 * f.mean_length) + 1)
                ids = self._draw_ids(f, np.arange(n), lengths, rng)
                cols[f.name] = np.split(ids, np.cumsum(lengths)[:-1])
            else:
                cols[f.name] = self._dense_observation(f.name, rng.normal(scale=0.3, size=n)).astype(np.float32)
        return pd.DataFrame(cols)

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
        click_logit = (cfg.base_click_logit + cfg.interest_strength * 2.0 * affinity + self.ad_quality[ads]
                       + self.click_propensity[users])
        click = rng.random(n) < 1.0 / (1.0 + np.exp(-click_logit))
        conv_aff = np.einsum("ij,ij->i", self.user_vec[users], self.ad_conv_vec[ads])
        conv_logit = cfg.base_conversion_logit + cfg.interest_strength * conv_aff + self.conversion_propensity[users]
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

    def engagement_ids(self) -> np.ndarray:
        """Each ad's id in the engagement list's id space: the id whose latent vector is closest to the ad's
        (so a clicked ad's id tells of the interests that made the user click it, like the list's daily ids)."""
        return np.argmax(self.ad_vec @ self.id_vec[self.cfg.intraday_list].T, axis=1).astype(np.int64)

    def intraday_frame(self, ds: str, events: pd.DataFrame, users: pd.DataFrame) -> pd.DataFrame:
        """Rows of the users partition within the day: after each click, ``intraday_delay_seconds`` later (a
        streaming feature pipeline's latency), the user's features with the clicked ad's id appended to the
        engagement list ``intraday_list`` (the oldest ids dropped beyond the list's longest daily length). Rows
        that would land after the day are left to the next day's snapshot. Empty unless ``intraday_updates``."""
        cfg = self.cfg
        if not cfg.intraday_updates:
            return users.iloc[:0]
        name = cfg.intraday_list
        field = next(f for f in self.fields if f.name == name)
        cap = int(4 * field.mean_length) + 1
        clicks = events[events["click"] == 1].sort_values(["event_ts", "impression_id"], kind="stable")
        ts = clicks["event_ts"] + pd.Timedelta(seconds=cfg.intraday_delay_seconds)
        clicks = clicks[ts < pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)]
        ts = ts[clicks.index]
        engaged = self.engagement_ids()[clicks["ad_id"].to_numpy()]
        base = users.set_index("user_id", drop=False)
        current: dict[int, np.ndarray] = {}
        lists = []
        for uid, new_id in zip(clicks["user_id"].to_numpy(), engaged):
            held = current.get(uid)
            if held is None:
                held = np.asarray(base.at[uid, name], dtype=np.int64)
            held = np.append(held, new_id)[-cap:]
            current[uid] = held
            lists.append(held)
        rows = base.loc[clicks["user_id"].to_numpy()].reset_index(drop=True)
        rows["event_ts"] = ts.to_numpy()
        rows[name] = lists
        return rows.astype({"event_ts": "datetime64[us, UTC]"})


def user_fields(params: Params) -> list[FieldSpec]:
    """The user feature columns the feature repo declares, as simulator fields."""
    return fields_from_feast(user_feature_fields(params))


def simulation_seed(params: Params) -> int:
    """The seed the simulated world is drawn from: ``simulator.seed``, or ``params.seed`` when that is null (a
    study varies it per seed, so every seed's replicate is an independent world, not the same data again)."""
    return params.seed if params.simulator.seed is None else params.simulator.seed


# The last world built per (seed, simulator config, fields): simulating consecutive days advances it by one day
# instead of replaying every day from the start (the result is the same; the sticky regime has to replay).
_WORLDS: "OrderedDict[tuple, World]" = OrderedDict()
_WORLDS_LOCK = threading.Lock()
_WORLDS_KEPT = 4


def world_on(ds: str | date, params: Params, fields: list[FieldSpec] | None = None) -> World:
    """The simulated world's hidden state on ``ds`` (a pure function of the simulator params, its seed and ``ds``).

    Returns:
        A copy of the cached world (advancing or mutating it leaves the cache as it was).
    """
    fields = user_fields(params) if fields is None else fields
    cfg, seed = params.simulator, simulation_seed(params)
    day = day_index(ds, cfg)
    key = (seed, cfg.model_dump_json(), tuple(fields))
    with _WORLDS_LOCK:
        world = _WORLDS.pop(key, None)
        if world is None or world.day > day:
            world = World(cfg, seed, fields, day)
        else:
            world.advance_to(day)
        _WORLDS[key] = world
        while len(_WORLDS) > _WORLDS_KEPT:
            _WORLDS.popitem(last=False)
        return copy.deepcopy(world)


def simulate_day(ds: str | date, params: Params, fields: list[FieldSpec] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generates one day's partitions.

    Args:
        ds: The logical date.
        params: Platform params (``simulator`` section; its ``seed``, else ``seed``).
        fields: The user feature columns to generate; default: the feature repo's (:func:`user_fields`).

    Returns:
        ``(events, users)`` data frames following the data contract. With ``simulator.intraday_updates`` the
        users partition is a time series: the day's snapshot at 00:00 and, after it, a row per intra-day
        update (:meth:`World.intraday_frame`), ordered by time then user.
    """
    ds = ds_str(ds)
    world = world_on(ds, params, fields)
    events, users = world.events_frame(ds), world.user_frame(ds)
    if params.simulator.intraday_updates:
        updates = world.intraday_frame(ds, events, users)
        users = pd.concat([users, updates], ignore_index=True)
        users = users.sort_values(["event_ts", "user_id"], kind="stable").reset_index(drop=True)
    return events, users


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    union = len(np.union1d(x, y))
    return 1.0 if union == 0 else len(np.intersect1d(x, y)) / union  # two empty lists are the same list


def day_to_day_overlap(dates: list[str], params: Params, fields: list[FieldSpec] | None = None) -> dict[str, float]:
    """How much a user's observed features persist from one day to the next (the study reports it as a choice).

    Over consecutive ``dates``, for the users present on both days (their 00:00 snapshot rows): the mean
    Jaccard overlap of each id list (of its id sets; two empty lists overlap fully) and the Pearson correlation
    of each dense feature, averaged over the day pairs.

    Returns:
        feature name -> mean day-to-day overlap (Jaccard for lists, correlation for dense features).
    """
    fields = user_fields(params) if fields is None else fields
    snaps = []
    for ds in dates:
        users = simulate_day(ds, params, fields)[1]
        snaps.append(users[users["event_ts"] == pd.Timestamp(ds_str(ds), tz="UTC")].set_index("user_id"))
    out: dict[str, float] = {}
    for f in fields:
        values = []
        for a, b in zip(snaps, snaps[1:]):
            common = a.index.intersection(b.index)
            if f.sparse:
                values.append(np.mean([_jaccard(x, y) for x, y in zip(a.loc[common, f.name], b.loc[common, f.name])]))
            else:
                values.append(np.corrcoef(a.loc[common, f.name], b.loc[common, f.name])[0, 1])
        out[f.name] = round(float(np.mean(values)), 4)
    return out


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
