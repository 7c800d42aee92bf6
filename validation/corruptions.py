"""Catalogue of corrupted partitions: what the data gate must catch, in one place.

Every entry is a :class:`Corruption`: a function ``(events, users, ctx) -> (events, users)`` that returns
corrupted copies of a day's good partitions (it never modifies its inputs), plus the check that must catch
it: ``expected_check(spec)`` is a substring of the failed-check line of :mod:`validation.data_checks`
(``<expectation>(<column>)``), reported for partition ``partition``. The tests (``tests/data``) run each
entry through real GX checkpoints; the soak writes them into a workspace with :func:`sum_pipeline.soak.inject`.

``outcome`` is ``"fail"`` for a partition the gate must reject (and quarantine), ``"warn"`` for one it
accepts with a warning (``ValidationReport.warnings``): columns outside the contract, and a few sparse ids
beyond the hash size (the model takes ids modulo it; see the module docstring of ``suites``).
``needs_history`` marks the kinds only the trailing checks catch: they need a validated day before.

Example::

    from validation.corruptions import CATALOGUE, CorruptionContext
    events, users = CATALOGUE["label_rate_collapse"].apply(events, users, CorruptionContext(ds, spec))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import pandas as pd

from sum_models.spec import FeatureSpec
from validation.suites import AD_DENSE_BOUNDS


Frames = tuple[pd.DataFrame, pd.DataFrame]


@dataclass(frozen=True)
class CorruptionContext:
    """What a corruption may need besides today's frames.

    Attributes:
        ds: The partition's date.
        spec: The model's input spec (feature names, hash sizes, cardinalities).
        previous: The previous day's good ``(events, users)``, for the stale/stuck kinds.
        seed: Seed of the corruption's random choices (which rows).
    """

    ds: str
    spec: FeatureSpec
    previous: Frames | None = None
    seed: int = 0

    @property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


@dataclass(frozen=True)
class Corruption:
    """One kind of corrupted partition and the check that must catch it."""

    name: str
    description: str
    apply_fn: Callable[[pd.DataFrame, pd.DataFrame, CorruptionContext], Frames]
    check: Callable[[FeatureSpec], str]
    partition: Literal["events", "users"]
    needs_history: bool = False
    outcome: Literal["fail", "warn"] = "fail"
    tags: tuple[str, ...] = field(default=())

    def apply(self, events: pd.DataFrame, users: pd.DataFrame, ctx: CorruptionContext) -> Frames:
        """Corrupted copies of ``(events, users)``; the inputs are left untouched."""
        if self.name in ("stale_redelivery", "stuck_restamped") and ctx.previous is None:
            raise ValueError(f"corruption {self.name!r} needs the previous day's frames (ctx.previous)")
        return self.apply_fn(events.copy(), users.copy(), ctx)

    def expected_check(self, spec: FeatureSpec) -> str:
        """The ``<expectation>(<column>)`` text the failed-check (or warning) line must contain."""
        return self.check(spec)


# ---------------------------------------------------------------------------------------------
# Feature choices (from the spec, so the catalogue follows the feature repo)
# ---------------------------------------------------------------------------------------------
def _dense(spec: FeatureSpec, i: int = 0) -> str:
    return spec.user_dense[i % len(spec.user_dense)]


def _sparse(spec: FeatureSpec) -> str:
    return next(iter(spec.user_sparse))


def _ad_dense(spec: FeatureSpec) -> str:
    """An ad feature without an upper bound (so a scaled value passes the range check and only drift sees it)."""
    unbounded = [n for n in spec.ad_dense if AD_DENSE_BOUNDS.get(n, (None, None))[1] is None]
    return (unbounded or list(spec.ad_dense))[0]


def _label(spec: FeatureSpec) -> str:
    return spec.labels[0]


def _rows(df: pd.DataFrame, share: float, rng: np.random.Generator) -> np.ndarray:
    n = max(1, int(round(share * len(df))))
    return np.sort(rng.choice(len(df), size=min(n, len(df)), replace=False))


# ---------------------------------------------------------------------------------------------
# Corruptions of the events partition
# ---------------------------------------------------------------------------------------------
def _label_out_of_set(ev, us, ctx):
    col = ev.columns.get_loc(_label(ctx.spec))
    ev.iloc[_rows(ev, 0.01, ctx.rng), col] = 2
    return ev, us


def _conversion_without_click(ev, us, ctx):
    first, second = ctx.spec.labels[0], ctx.spec.labels[1]
    idle = np.flatnonzero(ev[first].to_numpy() == 0)
    pick = ctx.rng.choice(idle, size=min(20, len(idle)), replace=False)
    ev.iloc[pick, ev.columns.get_loc(second)] = 1
    return ev, us


def _label_rate_collapse(ev, us, ctx):
    for label in ctx.spec.labels:  # every label, so the funnel stays consistent and only the rate is wrong
        ev[label] = np.zeros(len(ev), dtype=ev[label].dtype)
    return ev, us


def _label_rate_explosion(ev, us, ctx):
    label = _label(ctx.spec)
    ev[label] = np.ones(len(ev), dtype=ev[label].dtype)
    return ev, us


def _row_count_drop(ev, us, ctx):
    return ev.iloc[_rows(ev, 0.05, ctx.rng)].reset_index(drop=True), us


def _ad_feature_scaled(ev, us, ctx):
    name = _ad_dense(ctx.spec)
    ev[name] = (ev[name] * 100).astype(ev[name].dtype)
    return ev, us


def _duplicated_impressions(ev, us, ctx):
    dup = ev.iloc[_rows(ev, 0.10, ctx.rng)]
    return pd.concat([ev, dup], ignore_index=True), us


def _stale_redelivery(ev, us, ctx):
    """Yesterday's files delivered again as today's partition, unchanged."""
    prev_events, prev_users = ctx.previous  # type: ignore[misc]
    return prev_events.copy(), prev_users.copy()


def _stuck_restamped(ev, us, ctx):
    """Yesterday's rows re-stamped with today's date (a stuck upstream job that rewrites the date)."""
    prev_events, prev_users = (f.copy() for f in ctx.previous)  # type: ignore[union-attr]
    shift = pd.Timestamp(ctx.ds, tz="UTC") - prev_events["event_ts"].min().floor("D")
    prev_events["event_ts"] = prev_events["event_ts"] + shift
    prev_events["impression_id"] = [f"{ctx.ds}-{i:08d}" for i in range(len(prev_events))]
    prev_users["event_ts"] = pd.Series([pd.Timestamp(ctx.ds, tz="UTC")] * len(prev_users),
                                       dtype=prev_users["event_ts"].dtype, index=prev_users.index)
    return prev_events, prev_users


def _renamed_column(ev, us, ctx):
    label = _label(ctx.spec)
    return ev.rename(columns={label: f"{label}s"}), us


def _string_user_ids(ev, us, ctx):
    ev["user_id"] = ev["user_id"].astype(str)
    return ev, us


def _future_timestamps(ev, us, ctx):
    rows = _rows(ev, 0.10, ctx.rng)
    ev.iloc[rows, ev.columns.get_loc("event_ts")] = ev["event_ts"].iloc[rows] + pd.Timedelta(days=30)
    return ev, us


def _null_user_ids(ev, us, ctx):
    ev["user_id"] = ev["user_id"].astype("Int64")
    ev.iloc[_rows(ev, 0.01, ctx.rng), ev.columns.get_loc("user_id")] = pd.NA
    return ev, us


def _ad_id_beyond_cardinality(ev, us, ctx):
    name, cardinality = next(iter(ctx.spec.ad_sparse.items()))
    rows = _rows(ev, 0.02, ctx.rng)
    ev.iloc[rows, ev.columns.get_loc(name)] = ev[name].iloc[rows] + cardinality
    return ev, us


def _naive_timestamps(ev, us, ctx):
    ev["event_ts"] = ev["event_ts"].dt.tz_localize(None)
    return ev, us


def _empty_events(ev, us, ctx):
    return ev.iloc[:0].copy(), us


def _extra_column(ev, us, ctx):
    ev["debug_flag"] = np.int8(1)
    return ev, us


# ---------------------------------------------------------------------------------------------
# Corruptions of the users partition
# ---------------------------------------------------------------------------------------------
def _missing_users(ev, us, ctx):
    """The users partition lacks 10% of the users that have impressions today."""
    active = np.unique(ev["user_id"].to_numpy())
    gone = ctx.rng.choice(active, size=max(1, len(active) // 10), replace=False)
    return ev, us[~us["user_id"].isin(gone)].reset_index(drop=True)


def _user_dense_scaled(ev, us, ctx):
    name = _dense(ctx.spec, 0)
    us[name] = (us[name] * 100).astype(us[name].dtype)
    return ev, us


def _user_dense_constant(ev, us, ctx):
    name = _dense(ctx.spec, 1)
    us[name] = np.full(len(us), float(us[name].median()), dtype=us[name].dtype)
    return ev, us


def _sparse_lists_empty(ev, us, ctx):
    name = _sparse(ctx.spec)
    us[name] = [np.array([], dtype=np.int64) for _ in range(len(us))]
    return ev, us


def _sparse_ids_beyond_hash_size(ev, us, ctx):
    """The upstream hashes into a bigger space: half the users' ids are >= the contract's hash size."""
    name = _sparse(ctx.spec)
    size = ctx.spec.user_sparse[name]
    rows = set(_rows(us, 0.5, ctx.rng).tolist())
    us[name] = [np.asarray(v, dtype=np.int64) + size if i in rows and len(v) else v for i, v in enumerate(us[name])]
    return ev, us


def _stray_ids_beyond_hash_size(ev, us, ctx):
    """A single user's list holds one id beyond the hash size (taken modulo by the model): a warning."""
    name = _sparse(ctx.spec)
    size = ctx.spec.user_sparse[name]
    lists = list(us[name])
    lists[0] = np.concatenate([np.asarray(lists[0], dtype=np.int64), [size + 7]])
    us[name] = lists
    return ev, us


def _nonfinite_dense(ev, us, ctx):
    name = _dense(ctx.spec, 2)
    rows = _rows(us, 0.01, ctx.rng)
    us.iloc[rows, us.columns.get_loc(name)] = np.inf
    return ev, us


def _rare_extreme_dense(ev, us, ctx):
    """0.3 % of the users (6 of ~1,900 simulated) carry a dense feature at 1e12: finite, so the contract's range
    passes, and too few to move a quantile bin for the KL check."""
    name = _dense(ctx.spec, 0)
    rows = _rows(us, 0.003, ctx.rng)
    us.iloc[rows, us.columns.get_loc(name)] = 1e12
    return ev, us


def _negative_sparse_ids(ev, us, ctx):
    name = _sparse(ctx.spec)
    rows = set(_rows(us, 0.01, ctx.rng).tolist())
    us[name] = [np.concatenate([np.asarray(v, dtype=np.int64), [-3]]) if i in rows else v
                for i, v in enumerate(us[name])]
    return ev, us


def _duplicate_users(ev, us, ctx):
    dup = us.iloc[_rows(us, 0.02, ctx.rng)]
    return ev, pd.concat([us, dup], ignore_index=True)


def _user_snapshot_time_shift(ev, us, ctx):
    us["event_ts"] = us["event_ts"] + pd.Timedelta(hours=6)
    return ev, us


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
def _c(name: str, description: str, fn, check: Callable[[FeatureSpec], str], partition: str, **kw) -> Corruption:
    return Corruption(name, description, fn, check, partition, **kw)  # type: ignore[arg-type]


_ENTRIES = [
    # events
    _c("label_value_out_of_set", "1% of the first label's values are 2", _label_out_of_set,
       lambda s: f"expect_column_values_to_be_in_set({_label(s)})", "events"),
    _c("conversion_without_click", "20 conversions on impressions that were not clicked", _conversion_without_click,
       lambda s: f"expect_column_pair_values_a_to_be_greater_than_b({s.labels[0]}, {s.labels[1]})", "events"),
    _c("label_rate_collapse", "every label is 0 (a broken join with the label stream)", _label_rate_collapse,
       lambda s: f"expect_column_mean_to_be_between({_label(s)})", "events", needs_history=True),
    _c("label_rate_explosion", "every impression is clicked (a label stream bug)", _label_rate_explosion,
       lambda s: f"expect_column_mean_to_be_between({_label(s)})", "events", needs_history=True),
    _c("row_count_drop", "only 5% of the day's impressions arrived", _row_count_drop,
       lambda s: "expect_table_row_count_to_be_between(table)", "events", needs_history=True),
    _c("ad_feature_scaled", "an ad feature is 100x (unit change upstream)", _ad_feature_scaled,
       lambda s: f"expect_column_kl_divergence_to_be_less_than({_ad_dense(s)})", "events", needs_history=True),
    _c("duplicated_impressions", "10% of the impressions delivered twice", _duplicated_impressions,
       lambda s: "expect_column_values_to_be_unique(impression_id)", "events"),
    _c("stale_redelivery", "yesterday's files delivered again as today's partition", _stale_redelivery,
       lambda s: "expect_column_values_to_be_in_set(event_ts__utc_date)", "events", needs_history=True),
    _c("stuck_restamped", "yesterday's rows re-stamped with today's date", _stuck_restamped,
       lambda s: "expect_column_values_to_not_be_in_set(table__content_digest)", "events", needs_history=True),
    _c("renamed_column", "a label column renamed (click -> clicks)", _renamed_column,
       lambda s: "expect_table_columns_to_match_set(table)", "events"),
    _c("string_user_ids", "user ids written as strings", _string_user_ids,
       lambda s: "expect_column_values_to_be_in_type_list(user_id)", "events"),
    _c("future_timestamps", "10% of the events stamped 30 days ahead", _future_timestamps,
       lambda s: "expect_column_values_to_be_in_set(event_ts__utc_date)", "events"),
    _c("null_user_ids", "1% of the events have no user_id", _null_user_ids,
       lambda s: "expect_column_values_to_not_be_null(user_id)", "events"),
    _c("ad_id_beyond_cardinality", "2% of the ad ids beyond the ad vocabulary", _ad_id_beyond_cardinality,
       lambda s: f"expect_column_values_to_be_between({next(iter(s.ad_sparse))})", "events"),
    _c("naive_timestamps", "event_ts lost its UTC timezone", _naive_timestamps,
       lambda s: "expect_column_values_to_be_in_set(event_ts__type)", "events"),
    _c("empty_events", "an events partition with zero rows", _empty_events,
       lambda s: "expect_table_row_count_to_be_between(table)", "events"),
    # users
    _c("missing_users", "the users partition lacks 10% of the users with impressions", _missing_users,
       lambda s: "expect_column_values_to_be_null(user_id__without_user_row)", "events"),
    _c("user_dense_scaled", "a dense user feature is 100x", _user_dense_scaled,
       lambda s: f"expect_column_kl_divergence_to_be_less_than({_dense(s, 0)})", "users", needs_history=True),
    _c("user_dense_constant", "a dense user feature is constant (a default filled in)", _user_dense_constant,
       lambda s: f"expect_column_kl_divergence_to_be_less_than({_dense(s, 1)})", "users", needs_history=True),
    _c("sparse_lists_empty", "every list of a sparse feature is empty", _sparse_lists_empty,
       lambda s: f"expect_column_kl_divergence_to_be_less_than({_sparse(s)}__len)", "users", needs_history=True),
    _c("sparse_ids_beyond_hash_size", "half the users' ids hashed beyond the hash size", _sparse_ids_beyond_hash_size,
       lambda s: f"expect_column_values_to_be_between({_sparse(s)}__max_id)", "users"),
    _c("nonfinite_dense", "1% of a dense user feature is +inf", _nonfinite_dense,
       lambda s: f"expect_column_values_to_be_between({_dense(s, 2)})", "users"),
    _c("rare_extreme_dense", "0.3% of the users carry a dense feature at 1e12", _rare_extreme_dense,
       lambda s: f"expect_column_values_to_be_between({_dense(s, 0)}): extreme values", "users", needs_history=True),
    _c("negative_sparse_ids", "1% of the lists hold a negative id", _negative_sparse_ids,
       lambda s: f"expect_column_values_to_be_between({_sparse(s)}__min_id)", "users"),
    _c("duplicate_users", "2% of the users have two rows", _duplicate_users,
       lambda s: "expect_column_values_to_be_unique(user_id)", "users"),
    _c("user_snapshot_time_shift", "the user snapshot is stamped 06:00 instead of 00:00", _user_snapshot_time_shift,
       lambda s: "expect_column_values_to_be_in_set(event_ts__utc)", "users"),
    # accepted with a warning
    _c("extra_column", "an events column outside the contract (ignored by training)", _extra_column,
       lambda s: "expect_table_columns_to_match_set(table)", "events", outcome="warn"),
    _c("stray_id_beyond_hash_size", "one id beyond the hash size (taken modulo by the model)",
       _stray_ids_beyond_hash_size, lambda s: f"expect_column_values_to_be_between({_sparse(s)}__max_id)", "users",
       outcome="warn"),
]

#: Every corruption kind by name.
CATALOGUE: dict[str, Corruption] = {c.name: c for c in _ENTRIES}


def failing_kinds(*, with_history: bool = True) -> list[str]:
    """Names of the kinds the gate must reject (``with_history=False``: only those caught on a first day)."""
    return [n for n, c in CATALOGUE.items() if c.outcome == "fail" and (with_history or not c.needs_history)]


def warning_kinds() -> list[str]:
    """Names of the kinds accepted with a warning."""
    return [n for n, c in CATALOGUE.items() if c.outcome == "warn"]
