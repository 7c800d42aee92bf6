"""Fixtures of the data-gate tests: the real feature spec, a shared GX project and a partition builder.

The builder makes a valid events + users partition pair for a date with numpy, following the data
contract (see ``validation/data_checks.py``); tests corrupt copies of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from sum_models.spec import FeatureSpec
from sum_platform.config import Params, load_params

DS = "2026-01-05"


def build_users(ds: str, spec: FeatureSpec, n_users: int = 100, seed: int = 0) -> pd.DataFrame:
    """One row per user: ``user_id``, ``event_ts`` = ds 00:00 UTC, dense floats, sparse id lists."""
    rng = np.random.default_rng(seed)
    cols: dict = {
        "user_id": np.arange(n_users, dtype=np.int64),
        "event_ts": pd.Series([pd.Timestamp(ds, tz="UTC")] * n_users, dtype="datetime64[us, UTC]"),
    }
    for name in spec.user_dense:
        cols[name] = rng.normal(size=n_users).astype(np.float32)
    for name, hash_size in spec.user_sparse.items():
        lengths = rng.poisson(4, size=n_users)  # some lists are empty, which is allowed
        cols[name] = [rng.integers(0, hash_size, size=k, dtype=np.int64) for k in lengths]
    return pd.DataFrame(cols)


def build_events(
    ds: str, spec: FeatureSpec, n_events: int = 500, n_users: int = 100, seed: int = 0
) -> pd.DataFrame:
    """One row per impression, inside [ds 00:00, ds+1 00:00) UTC, conversion only after a click."""
    rng = np.random.default_rng(seed + 1)
    start = pd.Timestamp(ds, tz="UTC")
    micros = np.sort(rng.integers(0, 86_400 * 10**6, size=n_events))
    click = (rng.random(n_events) < 0.2).astype(np.int8)
    conversion = (click & (rng.random(n_events) < 0.3)).astype(np.int8)
    cols: dict = {
        "impression_id": [f"{ds}-{i:08d}" for i in range(n_events)],
        "user_id": rng.integers(0, n_users, size=n_events, dtype=np.int64),
        "event_ts": (start + pd.to_timedelta(micros, unit="us")).astype("datetime64[us, UTC]"),
    }
    for name, cardinality in spec.ad_sparse.items():
        cols[name] = rng.integers(0, cardinality, size=n_events, dtype=np.int64)
    for name in spec.ad_dense:
        if name == "ad_price":
            cols[name] = rng.gamma(2.0, 0.5, size=n_events).astype(np.float32)
        else:
            cols[name] = rng.random(n_events).astype(np.float32)
    labels = {"click": click, "conversion": conversion}
    for name in spec.labels:
        cols[name] = labels.get(name, np.zeros(n_events, dtype=np.int8))
    return pd.DataFrame(cols)


def write_partition(df: pd.DataFrame, folder: Path) -> Path:
    """Writes ``folder/part-0.parquet`` (the contract's layout) and returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    df.to_parquet(folder / "part-0.parquet", index=False)
    return folder


def make_day(workspace: Path, ds: str, spec: FeatureSpec, n_events: int = 500, n_users: int = 100, seed: int = 0
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Writes a valid partition pair for ``ds`` under ``workspace/data`` and returns (events, users)."""
    events = build_events(ds, spec, n_events, n_users, seed)
    users = build_users(ds, spec, n_users, seed)
    write_partition(events, workspace / "data" / "events" / f"ds={ds}")
    write_partition(users, workspace / "data" / "users" / f"ds={ds}")
    return events, users


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params()


@pytest.fixture(scope="session")
def spec(tmp_path_factory, params) -> FeatureSpec:
    """The real spec, derived from the Feast feature repo applied to a throwaway workspace."""
    from sum_platform.feature_store import apply_definitions, feature_spec

    saved = os.environ.get("SUM_WORKSPACE")
    os.environ["SUM_WORKSPACE"] = str(tmp_path_factory.mktemp("feast_ws"))
    try:
        store = apply_definitions()
        return feature_spec(store=store)
    finally:
        if saved is None:
            os.environ.pop("SUM_WORKSPACE", None)
        else:
            os.environ["SUM_WORKSPACE"] = saved


@pytest.fixture(scope="session")
def gx_root(tmp_path_factory) -> Path:
    """One GX project shared by the session's validations (rerun-safety is part of the contract)."""
    return tmp_path_factory.mktemp("ws") / "gx"


@pytest.fixture(scope="session")
def ds() -> str:
    return DS


@pytest.fixture(scope="session")
def good_day(spec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A valid (events, users) pair for :data:`DS`; tests copy before corrupting."""
    return build_events(DS, spec), build_users(DS, spec)


@pytest.fixture(scope="session")
def builder() -> SimpleNamespace:
    """The partition builder functions, for tests that need their own partitions."""
    return SimpleNamespace(
        build_events=build_events, build_users=build_users, write_partition=write_partition, make_day=make_day
    )


# ---------------------------------------------------------------------------------------------
# Simulated days and a validated history (the trailing checks' baseline)
# ---------------------------------------------------------------------------------------------
SIM_START = "2026-01-01"
#: Normal simulated days validated before the catalogue's corrupted day (the first has no history).
HISTORY_DAYS = 6


def sim_ds(i: int) -> str:
    """The ``i``-th simulated date (0 = the simulator's start date)."""
    from datetime import date, timedelta

    return (date.fromisoformat(SIM_START) + timedelta(days=i)).isoformat()


@pytest.fixture(scope="session")
def sim_day(params):
    """``sim_day(ds) -> (events, users)``: the seeded simulator's partitions (cached; callers get copies)."""
    from sum_platform.simulate import simulate_day, user_fields

    fields = user_fields(params)
    cache: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}

    def get(ds: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        if ds not in cache:
            cache[ds] = simulate_day(ds, params, fields)
        return cache[ds][0].copy(), cache[ds][1].copy()

    return get


@pytest.fixture(scope="session")
def history(tmp_path_factory, spec, params, sim_day, gx_root) -> SimpleNamespace:
    """:data:`HISTORY_DAYS` normal simulated days validated in order in one workspace (real GX).

    Attributes: ``root`` (the workspace, with ``runs/<ds>/data_profile.json`` of every day), ``days``,
    ``reports`` (ds -> reports), ``next_ds`` (the first date after the history) and ``gx_root``.
    """
    from validation.data_checks import validate_day

    root = tmp_path_factory.mktemp("history_ws")
    days = [sim_ds(i) for i in range(HISTORY_DAYS)]
    reports = {}
    for ds in days:
        events, users = sim_day(ds)
        write_partition(events, root / "data" / "events" / f"ds={ds}")
        write_partition(users, root / "data" / "users" / f"ds={ds}")
        reports[ds] = validate_day(ds, root, spec, params, gx_root=gx_root, data_docs=False)  # docs: test_data_checks
    return SimpleNamespace(root=root, days=days, reports=reports, next_ds=sim_ds(HISTORY_DAYS), gx_root=gx_root)


@pytest.fixture
def workspace_with_history(tmp_path, history) -> Path:
    """A fresh workspace holding the history's profiles (not its partitions): validate the next day in it."""
    import shutil

    for ds in history.days:
        target = tmp_path / "runs" / ds
        target.mkdir(parents=True)
        shutil.copy(history.root / "runs" / ds / "data_profile.json", target / "data_profile.json")
    return tmp_path
