"""SOAP serving end to end: real Ray Serve over HTTP, real Feast SQLite online store, tmp workspace.

The session's one Ray instance (tests/conftest.py), the session's HTTP port, a tiny model, one deployed
application for the module (deployed with snapshot A on first use). Each test states the app and store
state it needs through fixtures and helpers (``serving_a`` / ``serving_b``: the app serves that snapshot
with the params' configuration; ``_fresh_rows``: users' rows as the daily batch left them), so every test
passes alone and in any order; in file order the switches cost nothing (A -> async / realtime / offline /
batch / bad input / metrics -> rollout to B under load -> frozen still A -> pipeline rollout records ->
failed rollouts keep B). The store I/O and dispatch tests without Ray are in ``tests/unit``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from sum_pipeline import tasks
from sum_platform.context import context

slow = pytest.mark.slow
# A test of what the serving app does whatever its online store (auth, a failed replica's rollback) runs on SQLite
# alone: on Redis it would repeat the same requests against the same Serve app for nothing (each ~25 s).
store_independent = pytest.mark.parametrize("soap_env", ["sqlite"], indirect=True)

K, D = 2, 8
USERS_WITH_EMBEDDINGS = [0, 1, 2]
USERS_WITH_FEATURES = list(range(0, 60))  # 3..59: features but no stored embedding yet
UNKNOWN_USER = 999_999
NONFINITE_USER, OVERFLOW_USER = 990, 991  # features written by the test that has them
MAX_BATCH_USERS = 50
TIMINGS: dict[str, float] = {}


def _poll(fn, timeout_s: float = 60.0, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def soap_env(request, tmp_path_factory, write_online_features):
    """Tmp params (session port, local Ray, tiny model) + workspace with features and three snapshots, on the
    online store of the parameter: every test of the module runs on SQLite, then on Redis (the session's
    redis-server, the ``redis`` profile), but the ``store_independent`` ones (SQLite only)."""
    root = tmp_path_factory.mktemp(f"soap-{request.param}")
    workspace = root / "workspace"
    raw = yaml.safe_load(Path(os.environ["SUM_PARAMS"]).read_text())  # the session's (its Redis port)
    if request.param == "redis":
        request.getfixturevalue("redis_server")["flush"]()
        raw["profile"] = "redis"
    raw["paths"]["workspace"] = str(workspace)
    raw["model"].update({"num_embeddings": K, "embedding_dim": D, "hidden_dim": 16, "mix_hidden_dim": 8})
    # The session's one Ray instance serves HTTP on the session's port (tests/conftest.py).
    raw["serving"].update(
        {
            "port": int(os.environ["SUM_TEST_PORT"]),
            "ray_address": "local",
            "max_inflight_compute": 16,
            "max_batch_users": MAX_BATCH_USERS,
            "mode": "async",
        }
    )
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))

    mp = pytest.MonkeyPatch()
    mp.setenv("SUM_PARAMS", str(params_file))
    mp.setenv("SUM_WORKSPACE", str(workspace))
    mp.delenv("RAY_ADDRESS", raising=False)

    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot
    from sum_platform.config import load_params
    from sum_platform.feature_store import apply_definitions, feature_spec
    from sum_platform.workspace import Workspace

    params = load_params(params_file)
    store = apply_definitions(params)
    spec = feature_spec(params, store)

    users = write_online_features(store, spec, USERS_WITH_FEATURES)

    ws = Workspace(params.workspace)
    snaps = {}
    for name, seed in (("sum-A", 1), ("sum-B", 2), ("sum-C", 3)):
        model = build_model(spec, params.model, seed=seed)
        snaps[name] = export_snapshot(model, spec, params.model, ws.snapshot_dir(name), name)
    # sum-C is corrupt: a truncated user tower file.
    tower_file = snaps["sum-C"] / "user_tower.safetensors"
    tower_file.write_bytes(tower_file.read_bytes()[:100])

    yield {
        "params": params,
        "params_file": params_file,
        "store": store,
        "spec": spec,
        "snaps": snaps,
        "users": users,
        "ws": ws,
    }
    mp.undo()


@pytest.fixture(scope="module")
def serve_session(soap_env, ray_serve):
    """The session's Ray + Serve (tests/conftest.py), timed on first use."""
    TIMINGS["ray_and_serve_start_s"] = ray_serve["seconds"]
    yield ray_serve
    print(f"\nserving timings: {TIMINGS}")


@pytest.fixture(scope="module")
def url(soap_env) -> str:
    from serving.rollout import base_url

    return base_url(soap_env["params"])


@pytest.fixture(scope="module")
def deployed_a(soap_env, serve_session):
    """Initial daily-batch rows (written a day ago), then the app deployed with snapshot A."""
    from serving.rollout import rollout, served_snapshot_id
    from serving.store_io import write_embeddings

    old = pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=1)
    emb = np.random.default_rng(1).standard_normal((len(USERS_WITH_EMBEDDINGS), K, D)).astype(np.float16)
    write_embeddings(soap_env["store"], USERS_WITH_EMBEDDINGS, emb, "batch-0", old, batch=True)

    t0 = time.monotonic()
    result = rollout(soap_env["params"], soap_env["snaps"]["sum-A"], "sum-A", params_file=soap_env["params_file"])
    TIMINGS["first_deploy_s"] = time.monotonic() - t0
    assert result["status"] == "deployed", result
    assert result["record"]["status"] == "deployed" and result["record"]["frozen_snapshot_id"] == "sum-A"
    assert served_snapshot_id(soap_env["params"]) == "sum-A"
    return {"initial_written_at_ms": int(old.value // 1_000_000), "initial": emb}


def _serve(soap_env, name: str) -> None:
    """Brings the app to serve snapshot ``name`` (frozen: sum-A) with the params' configuration (mode,
    budgets, knobs); a no-op when it already does."""
    from serving.rollout import rollout, served_snapshot_id

    result = rollout(
        soap_env["params"],
        soap_env["snaps"][name],
        name,
        params_file=soap_env["params_file"],
        frozen=(soap_env["snaps"]["sum-A"], "sum-A"),
    )
    assert served_snapshot_id(soap_env["params"]) == name, result


@pytest.fixture
def serving_a(soap_env, deployed_a):
    """The app serving sum-A with the params' configuration (what the A-phase tests read against)."""
    _serve(soap_env, "sum-A")
    return deployed_a


@pytest.fixture
def serving_b(soap_env, deployed_a):
    """The app serving sum-B (frozen sum-A) with the params' configuration."""
    _serve(soap_env, "sum-B")
    return deployed_a


def _fresh_rows(soap_env, url, deployed_a, user_ids) -> None:
    """Users' embedding rows as the daily batch left them: the initial batch row for users with one
    (``USERS_WITH_EMBEDDINGS``), no row for the others. Waits for in-flight compute calls first, so no
    earlier write-back lands afterwards."""
    from serving.store_io import delete_rows, write_embeddings

    _poll(lambda: _health(url)["compute_inflight"] == 0, what="no compute call in flight")
    delete_rows(soap_env["store"], user_ids)
    batch = [u for u in user_ids if u in USERS_WITH_EMBEDDINGS]
    if batch:
        emb = deployed_a["initial"][[USERS_WITH_EMBEDDINGS.index(u) for u in batch]]
        write_embeddings(soap_env["store"], batch, emb, "batch-0", deployed_a["initial_written_at_ms"], batch=True)
    for u in user_ids:
        row = _stored(soap_env, u)
        assert (row is not None) == (u in batch) and (row is None or row["snapshot_id"] == "batch-0"), (u, row)


@contextmanager
def _configured(soap_env, **kwargs):
    """Reconfigures the running app in place (mode, budgets, compute knobs); restores it afterwards."""
    from serving.rollout import reconfigure

    params, params_file = soap_env["params"], soap_env["params_file"]
    compute = kwargs.pop("compute_options", None)
    reconfigure(params, compute_options=compute, params_file=params_file, **kwargs)
    try:
        yield
    finally:
        restore = {"mode": params.serving.mode, "realtime_budget_ms": params.serving.realtime_budget_ms}
        reconfigure(params, compute_options={"debug_delay_ms": 0.0, "pool_unit": params.serving.pool_unit},
                    params_file=params_file, **restore)


def _stored(soap_env, user_id):
    from serving.store_io import read_embeddings

    return read_embeddings(soap_env["store"], [user_id]).get(user_id)


def _health(url):
    return httpx.get(f"{url}/healthz", timeout=30).json()


def _expected_raw(soap_env, snapshot: str, user_id: int) -> np.ndarray:
    from sum_models.snapshot import embed_users, load_user_tower

    tower, _ = load_user_tower(soap_env["snaps"][snapshot])
    users = soap_env["users"]
    return embed_users(tower, users[users["user_id"] == user_id].reset_index(drop=True), tower.spec)[0]


# ---------------------------------------------------------------------------------------------
# async (default)
# ---------------------------------------------------------------------------------------------
@slow
def test_async_read_answers_from_store_while_compute_is_slow_then_sees_write_back(soap_env, deployed_a, serving_a, url):
    _fresh_rows(soap_env, url, deployed_a, [0])
    with _configured(soap_env, compute_options={"debug_delay_ms": 2000}):
        t0 = time.monotonic()
        resp = httpx.get(f"{url}/users/0/embeddings", timeout=30)
        TIMINGS["first_request_s"] = time.monotonic() - t0  # reported, not asserted (benchmarks/serving_bench.py)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        # The read answers with what is stored (the batch row) without waiting for the 2 s compute: the row is
        # still the batch's after the answer (a read that waited would find the write-back in the store).
        assert body["mode"] == "async" and body["source"] == "store" and body["compute"] == "scheduled"
        assert body["snapshot_id"] == "batch-0" and body["pooled_versions"] == 1
        assert body["written_at_ms"] == deployed_a["initial_written_at_ms"]
        assert body["age_seconds"] > 3600
        assert len(body["embeddings"]) == K and all(len(e) == D for e in body["embeddings"])
        np.testing.assert_array_equal(np.asarray(body["embeddings"], dtype=np.float16), deployed_a["initial"][0])
        assert _stored(soap_env, 0)["snapshot_id"] == "batch-0"  # not written yet

        # The write-back arrives later; the next read returns it.
        row = _poll(
            lambda: (r := _stored(soap_env, 0)) and r["snapshot_id"] == "sum-A" and r,
            what="user 0 recomputed by sum-A",
        )
    assert row["written_at_ms"] > deployed_a["initial_written_at_ms"] and row["pooled_versions"] == 2
    # Pooled: mean of the fresh tower output and the batch version before it.
    fresh = _expected_raw(soap_env, "sum-A", 0)
    expected = np.mean(np.stack([fresh.astype(np.float64), deployed_a["initial"][0].astype(np.float64)]), axis=0)
    np.testing.assert_allclose(row["embeddings"].astype(np.float32), expected.astype(np.float32), atol=2e-3)

    again = httpx.get(f"{url}/users/0/embeddings", timeout=30).json()
    assert again["snapshot_id"] == "sum-A" and again["age_seconds"] < 600
    np.testing.assert_array_equal(np.asarray(again["embeddings"], dtype=np.float16), row["embeddings"])


@slow
def test_unknown_user_is_404_and_cold_user_gets_computed(soap_env, deployed_a, serving_a, url):
    _fresh_rows(soap_env, url, deployed_a, [3, UNKNOWN_USER])
    resp = httpx.get(f"{url}/users/{UNKNOWN_USER}/embeddings", timeout=30)
    assert resp.status_code == 404
    assert "no embeddings" in resp.json()["detail"] and resp.json()["compute"] == "scheduled"

    # User 3 has features but no stored embedding: 404 now, computed asynchronously, 200 later.
    first = httpx.get(f"{url}/users/3/embeddings", timeout=30)
    assert first.status_code == 404
    _poll(lambda: _stored(soap_env, 3) is not None, what="user 3 written by compute")
    later = httpx.get(f"{url}/users/3/embeddings", timeout=30)
    assert later.status_code == 200 and later.json()["snapshot_id"] == "sum-A"
    # The unknown user has no features: nothing is written for it.
    assert _stored(soap_env, UNKNOWN_USER) is None


@slow
def test_write_backs_of_one_snapshot_are_one_version_and_three_under_write_pooling(soap_env, deployed_a, serving_a,
                                                                                    url):
    """Three write-backs of sum-A through the compute deployment. ``pool_unit: snapshot`` (the params'): each replaces
    sum-A's version, so the row keeps one version, the tower's output. Reconfigured to ``write``: every write-back is
    a version and the stored value is the mean of all three (the compute deployment pools by the unit it is given)."""
    from serving.store_io import read_history

    user = 4
    fresh = _expected_raw(soap_env, "sum-A", user)

    def three_write_backs(pooled):
        for n in (1, 2, 3):
            before = (_stored(soap_env, user) or {}).get("written_at_ms")
            httpx.get(f"{url}/users/{user}/embeddings", timeout=30)
            _poll(
                lambda: (r := _stored(soap_env, user)) and r["written_at_ms"] != before and r["pooled_versions"] == pooled(n),
                what=f"write-back {n} of user {user}",
            )
        return read_history(soap_env["store"], [user])[user]

    assert soap_env["params"].serving.pool_unit == "snapshot"
    _fresh_rows(soap_env, url, deployed_a, [user])
    row = three_write_backs(lambda n: 1)
    assert row["snapshot_id"] == "sum-A" and row["prev1_snapshot_id"] is None and len(row["prev1_embedding_0"]) == 0
    np.testing.assert_array_equal(_stored(soap_env, user)["embeddings"], fresh)

    _fresh_rows(soap_env, url, deployed_a, [user])
    with _configured(soap_env, compute_options={"pool_unit": "write"}):
        row = three_write_backs(lambda n: n)
    versions = [np.stack([row[f"{slot}_embedding_{k}"] for k in range(K)]) for slot in ("raw", "prev1", "prev2")]
    assert [row[f] for f in ("snapshot_id", "prev1_snapshot_id", "prev2_snapshot_id")] == ["sum-A"] * 3
    for v in versions:  # the same snapshot and features: each version is the tower's output
        np.testing.assert_array_equal(v.astype(np.float16), fresh)
    expected = np.mean(np.stack([v.astype(np.float64) for v in versions]), axis=0).astype(np.float16)
    np.testing.assert_array_equal(_stored(soap_env, user)["embeddings"], expected)


# ---------------------------------------------------------------------------------------------
# realtime / offline / batch
# ---------------------------------------------------------------------------------------------
@slow
def test_realtime_answers_fresh_value_when_compute_is_fast(soap_env, serving_a, url):
    with _configured(soap_env, mode="realtime", realtime_budget_ms=5000):
        before = _health(url)["fallbacks"]
        resp = httpx.get(f"{url}/users/5/embeddings", timeout=30)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["mode"] == "realtime" and body["source"] == "compute" and body["compute"] == "completed"
        assert body["snapshot_id"] == "sum-A" and body["age_seconds"] < 60
        # What it answered is what it writes back (right after answering).
        row = _poll(
            lambda: (r := _stored(soap_env, 5)) and r["written_at_ms"] == body["written_at_ms"] and r,
            what="the realtime value written back",
        )
        np.testing.assert_array_equal(np.asarray(body["embeddings"], np.float16), row["embeddings"])
        assert _health(url)["fallbacks"] == before


@slow
def test_back_to_back_realtime_reads_of_a_user_each_build_on_the_last(soap_env, deployed_a, serving_a, url):
    """Realtime write-backs are buffered and written together after the answers; a read of a user whose write is
    still buffered flushes it first, so each answer pools over the previous one and the last is what is stored
    (under write pooling, where each write-back is a version the next answer must see)."""
    _fresh_rows(soap_env, url, deployed_a, [6])
    with _configured(soap_env, mode="realtime", realtime_budget_ms=5000, compute_options={"pool_unit": "write"}):
        answers = []
        for _ in range(3):
            resp = httpx.get(f"{url}/users/6/embeddings", timeout=30)
            assert resp.status_code == 200 and resp.json()["source"] == "compute", resp.text
            answers.append(resp.json())
        assert [a["pooled_versions"] for a in answers] == [1, 2, 3], answers
        assert len({a["written_at_ms"] for a in answers}) == 3
        last = answers[-1]
        row = _poll(lambda: (r := _stored(soap_env, 6)) and r["written_at_ms"] == last["written_at_ms"] and r,
                    what="the last realtime answer written back")
        assert row["pooled_versions"] == 3
        np.testing.assert_array_equal(np.asarray(last["embeddings"], np.float16), row["embeddings"])


@slow
def test_realtime_falls_back_to_store_within_budget_when_compute_is_slow(soap_env, deployed_a, serving_a, url):
    _fresh_rows(soap_env, url, deployed_a, [1])  # the late write-back below is then the one of this read
    budget_ms = 300
    with _configured(soap_env, mode="realtime", realtime_budget_ms=budget_ms, compute_options={"debug_delay_ms": 3000}):
        stored = _stored(soap_env, 1)
        before = _health(url)
        t0 = time.monotonic()
        resp = httpx.get(f"{url}/users/1/embeddings", timeout=30)
        TIMINGS["realtime_fallback_s"] = time.monotonic() - t0  # reported, not asserted (benchmarks/serving_bench.py)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        # The budget ran out before the 3 s compute answered (compute "timeout", one fallback counted): the answer is
        # the stored row, and the compute, not cancelled, still writes back (below).
        assert body["mode"] == "realtime" and body["source"] == "store" and body["compute"] == "timeout"
        assert body["snapshot_id"] == stored["snapshot_id"]
        np.testing.assert_array_equal(np.asarray(body["embeddings"], np.float16), stored["embeddings"])
        assert _health(url)["fallbacks"] == before["fallbacks"] + 1
        # The compute still finishes and writes back.
        _poll(lambda: (r := _stored(soap_env, 1)) and r["snapshot_id"] == "sum-A", what="user 1 written late")


@slow
def test_offline_mode_serves_daily_batch_value_without_compute(soap_env, deployed_a, serving_a, url):
    # User 0 was recomputed by A, but offline mode answers the daily batch value and fires nothing.
    if _stored(soap_env, 0)["snapshot_id"] != "sum-A":  # not by an earlier test: recompute it now
        httpx.get(f"{url}/users/0/embeddings", timeout=30)
        _poll(lambda: _stored(soap_env, 0)["snapshot_id"] == "sum-A", what="user 0 recomputed by sum-A")
    assert _stored(soap_env, 0)["snapshot_id"] == "sum-A"
    before = _health(url)["compute_scheduled"]
    resp = httpx.get(f"{url}/users/0/embeddings", params={"mode": "offline"}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["mode"] == "offline" and body["source"] == "batch" and body["compute"] == "not_requested"
    assert body["snapshot_id"] == "batch-0" and body["written_at_ms"] == deployed_a["initial_written_at_ms"]
    np.testing.assert_array_equal(np.asarray(body["embeddings"], np.float16), deployed_a["initial"][0])
    assert _health(url)["compute_scheduled"] == before
    # A user never written by a daily batch has no offline value.
    assert httpx.get(f"{url}/users/3/embeddings", params={"mode": "offline"}, timeout=30).status_code == 404
    # Switching the deployment's mode (not per request) does the same.
    with _configured(soap_env, mode="offline"):
        assert httpx.get(f"{url}/users/0/embeddings", timeout=30).json()["source"] == "batch"
        assert httpx.get(f"{url}/version", timeout=30).json()["ingress"]["mode"] == "offline"


@slow
def test_batch_endpoint(soap_env, deployed_a, url):
    ids = [0, UNKNOWN_USER, 2, 0]
    resp = httpx.post(f"{url}/embeddings/batch", json={"user_ids": ids}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["mode"] == "async" and body["count"] == 3 and body["found"] == 2
    assert [r["user_id"] for r in body["results"]] == [0, UNKNOWN_USER, 2]
    assert body["results"][1]["status"] == "not_found" and body["results"][1]["embeddings"] is None
    assert body["results"][0]["status"] == "ok" and body["results"][0]["compute"] in ("scheduled", "dropped")
    single = httpx.get(f"{url}/users/2/embeddings", params={"mode": "offline"}, timeout=30).json()
    offline = httpx.post(f"{url}/embeddings/batch", json={"user_ids": [2], "mode": "offline"}, timeout=30).json()
    assert offline["results"][0]["embeddings"] == single["embeddings"]
    # At the configured bound: fine; past it: 413 with a reason.
    ok = httpx.post(f"{url}/embeddings/batch", json={"user_ids": list(range(MAX_BATCH_USERS)), "mode": "offline"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["count"] == MAX_BATCH_USERS
    big = httpx.post(f"{url}/embeddings/batch", json={"user_ids": list(range(MAX_BATCH_USERS + 1))}, timeout=30)
    assert big.status_code == 413 and str(MAX_BATCH_USERS) in big.json()["detail"]


@slow
def test_a_user_with_non_finite_features_is_skipped_not_its_batch(soap_env, serving_a, url):
    """One user's non-finite feature, or a feature that makes its embedding overflow fp16, costs that user its
    recompute, not the other users of its batch: they are computed and written; the skips are counted by reason
    and frozen mode answers 404 naming it."""
    from ray import serve

    from sum_platform.feature_store import user_features_view

    spec, store = soap_env["spec"], soap_env["store"]
    bad = soap_env["users"].head(2).copy()
    bad["user_id"] = [NONFINITE_USER, OVERFLOW_USER]
    column = spec.user_dense[0]
    bad[column] = np.asarray([np.inf, 1e30], dtype=np.float64)
    bad["event_ts"] = pd.Timestamp.now(tz="UTC")
    store.write_to_online_store(user_features_view(), bad)
    good = 7
    before = _compute_info(soap_env)["stats"]
    handle = serve.get_deployment_handle("ComputeCenter", app_name=soap_env["params"].serving.app_name)
    results = handle.compute_many.remote([good, NONFINITE_USER, OVERFLOW_USER]).result(timeout_s=60)
    assert {r["user_id"]: r["status"] for r in results} == {
        good: "written", NONFINITE_USER: "nonfinite_features", OVERFLOW_USER: "nonfinite_embedding"}
    assert _stored(soap_env, good)["snapshot_id"] == "sum-A"
    assert _stored(soap_env, NONFINITE_USER) is None and _stored(soap_env, OVERFLOW_USER) is None
    after = _compute_info(soap_env)["stats"]
    for reason in ("nonfinite_features", "nonfinite_embedding"):
        assert after.get(f"skipped_{reason}", 0) == before.get(f"skipped_{reason}", 0) + 1
    frozen = httpx.get(f"{url}/users/{NONFINITE_USER}/embeddings", params={"mode": "frozen"}, timeout=30)
    assert frozen.status_code == 404 and "non-finite feature" in frozen.json()["detail"]
    batch = httpx.post(f"{url}/embeddings/batch", json={"user_ids": [good, OVERFLOW_USER], "mode": "frozen"},
                       timeout=30).json()
    assert [(r["status"], r["reason"]) for r in batch["results"]] == [("ok", None), ("not_found", "nonfinite_embedding")]


BAD_PATH_IDS = ["-1", "abc", "1.5", str(2**63), "%20", "1e3", "0x10", "true"]
BAD_BODIES = [
    {"user_ids": ["1"]},
    {"user_ids": [1.5]},
    {"user_ids": [-1]},
    {"user_ids": [2**63]},
    {"user_ids": [True]},
    {"user_ids": [None]},
    {"user_ids": "1,2"},
    {"user_ids": []},
    {"user_ids": [[1]]},
    {"user_ids": [1], "mode": "warp"},
    {"user_ids": [1], "extra": 1},
    {"ids": [1]},
    {"user_ids": list(range(20_000))},
    [1, 2],
    "not an object",
]


@slow
@pytest.mark.parametrize("bad", BAD_PATH_IDS)
def test_bad_user_ids_are_4xx_with_reason(deployed_a, url, bad):
    resp = httpx.get(f"{url}/users/{bad}/embeddings", timeout=30)
    assert 400 <= resp.status_code < 500, (bad, resp.status_code, resp.text)
    assert resp.json().get("detail")


@slow
@pytest.mark.parametrize("body", BAD_BODIES, ids=lambda b: str(b)[:30])
def test_bad_batch_bodies_are_4xx_with_reason(deployed_a, url, body):
    resp = httpx.post(f"{url}/embeddings/batch", json=body, timeout=30)
    assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text[:300])
    assert resp.json().get("detail")


@slow
def test_other_bad_requests_are_4xx(deployed_a, url):
    cases = [
        httpx.get(f"{url}/users/1/embeddings", params={"mode": "warp"}, timeout=30),
        httpx.post(f"{url}/embeddings/batch", content=b"{not json", headers={"content-type": "application/json"}, timeout=30),
        httpx.post(f"{url}/embeddings/batch", content=b"", headers={"content-type": "application/json"}, timeout=30),
        httpx.post(f"{url}/embeddings/batch", content=b"\xff\xfe", headers={"content-type": "application/json"}, timeout=30),
        httpx.get(f"{url}/embeddings/batch", timeout=30),
        httpx.get(f"{url}/no/such/route", timeout=30),
    ]
    for resp in cases:
        assert 400 <= resp.status_code < 500, (resp.request.url, resp.status_code, resp.text[:300])


# ---------------------------------------------------------------------------------------------
# request limits, request ids, token
# ---------------------------------------------------------------------------------------------
def _raw_exchange(url: str, head: bytes, chunks: list[bytes] = ()) -> tuple[bytes, bool]:
    """Sends ``head`` then ``chunks`` on one connection (a chunk per send), reads the answer until the server closes
    (or 30 s): ``(everything read, whether the server closed the connection)``."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return answer, False
            except ConnectionResetError:  # closed with bytes of ours unread: the answer came before
                return answer, True
            if not data:
                return answer, True
            answer += data


def _answer_json(raw: bytes) -> tuple[int, dict, dict]:
    """``(status, headers, JSON body)`` of one raw HTTP/1.1 answer with a Content-Length."""
    import json

    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body[: int(headers["content-length"])])


@slow
def test_request_bodies_over_the_limit_get_413_before_they_are_read(soap_env, deployed_a, url):
    """A Content-Length over serving.max_request_bytes is answered 413 with no byte of the body sent; a chunked body
    is read up to the limit and no further (413, the connection closed while the client never ended its body); the
    app stays healthy and a body just under the limit (a padded batch) is parsed and answered."""
    from urllib.parse import urlsplit

    limit = soap_env["params"].serving.max_request_bytes
    assert limit == 1 << 20
    host = urlsplit(url)
    path = f"{host.path.rstrip('/')}/embeddings/batch"
    head = f"POST {path} HTTP/1.1\r\nHost: {host.netloc}\r\nContent-Type: application/json\r\n"

    # Declared too large: the head alone gets the answer (the body is never sent).
    raw, closed = _raw_exchange(url, f"{head}Content-Length: {limit + 1}\r\n\r\n".encode())
    status, headers, body = _answer_json(raw)
    assert status == 413 and closed, raw[:300]
    assert body["detail"] == f"request body over 1 MiB (serving.max_request_bytes); request id {body['request_id']}"
    assert headers["x-request-id"] == body["request_id"] and headers["connection"] == "close"

    # Streamed: 16 chunks of 64 KiB reach the limit exactly, one byte more passes it; the body's end never comes.
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    raw, closed = _raw_exchange(url, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(), [chunk] * 16 + [b"1\r\n \r\n"])
    status, headers, body = _answer_json(raw)
    assert status == 413 and closed, raw[:300]
    assert "over 1 MiB (serving.max_request_bytes)" in body["detail"]

    # The app is fine, and a body under the limit is read whole, chunked or not.
    assert _health(url)["status"] == "ok"
    padded = b'{"mode": "offline", "user_ids": [0, 2]' + b" " * (limit - 200) + b"}"
    resp = httpx.post(f"{url}/embeddings/batch", content=padded, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 200 and resp.json()["count"] == 2, resp.text[:300]
    streamed = httpx.post(f"{url}/embeddings/batch", content=iter([padded[:1000], padded[1000:]]),
                          headers={"content-type": "application/json"}, timeout=30)
    assert streamed.status_code == 200 and streamed.json()["count"] == 2, streamed.text[:300]


def _replica_log_lines(needle: str, deployment: str = "SoapIngress") -> list[str]:
    """Lines of the Serve replica logs of ``deployment`` (this Ray session's) that contain ``needle``."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [line for f in sorted(logs.glob(f"replica_*{deployment}*.log"))
            for line in f.read_text(errors="replace").splitlines() if needle in line]


@slow
def test_error_answers_name_a_request_id_whose_cause_is_in_the_replica_log(soap_env, deployed_a, serving_b, url):
    """A frozen snapshot that fails to load in the replica: /version names the snapshot and the exception type, not
    its folder nor the exception text; those are in the ingress replica's log under the request id the answer
    carries (the caller's X-Request-ID when well-formed). Every answer carries X-Request-ID; error bodies name it."""
    from serving.rollout import rollout

    snaps, root = soap_env["snaps"], str(soap_env["ws"].root)
    rollout(soap_env["params"], snaps["sum-B"], "sum-B", params_file=soap_env["params_file"],
            frozen=(snaps["sum-C"], "sum-C"))  # sum-C's tower file is truncated
    try:
        version = _poll(lambda: (r := httpx.get(f"{url}/version", headers={"X-Request-ID": "frozen-check-1"},
                                                timeout=30)).json().get("frozen_error") and r,
                        what="/version reporting the frozen load failure")
        body = version.json()
        assert body["frozen_error"].startswith("loading frozen sum-C failed (") and body["frozen_snapshot_id"] == "sum-A"
        assert root not in version.text and "/" not in body["frozen_error"], body["frozen_error"]
        assert version.headers["x-request-id"] == "frozen-check-1"
        lines = _poll(lambda: _replica_log_lines("request frozen-check-1: /version"), what="the request id in the log")
        assert any(f"loading frozen sum-C from {snaps['sum-C'].resolve()} failed: " in line for line in lines), lines
        # Generated ids: in the header of every answer, and in error bodies.
        missing = httpx.get(f"{url}/users/{UNKNOWN_USER}/embeddings", timeout=30)
        assert missing.status_code == 404 and missing.json()["request_id"] == missing.headers["x-request-id"]
        assert httpx.get(f"{url}/users/abc/embeddings", timeout=30).json()["request_id"]
        ok = httpx.get(f"{url}/healthz", timeout=30)
        assert ok.status_code == 200 and ok.headers["x-request-id"] != missing.headers["x-request-id"]
        malformed = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "two words"}, timeout=30)
        assert malformed.headers["x-request-id"] != "two words"
    finally:
        _serve(soap_env, "sum-B")
        _poll(lambda: (v := httpx.get(f"{url}/version", timeout=30).json())["frozen_snapshot_id"] == "sum-A"
              and v["frozen_error"] is None, what="frozen sum-A loaded again")


def _answers_without_token(url: str, code: int, n: int = 5) -> bool:
    """``n`` requests in a row, each on a new connection, answered ``code`` without a token (a replaced replica
    drains its connections for a while: both may answer meanwhile)."""
    return all(httpx.get(f"{url}/version", timeout=30).status_code == code for _ in range(n))


@slow
@store_independent
def test_token_mode_answers_401_without_the_token_and_200_with_it(soap_env, serving_b, url, tmp_path):
    """With serving.token_file set (here on loopback, explicitly), every request but /healthz needs the bearer
    token (0600 file, generated at deploy); the platform's own client (served_version) sends it."""
    import stat

    from serving.rollout import auth_headers, deploy, served_snapshot_id

    params, snaps = soap_env["params"], soap_env["snaps"]
    token_file = tmp_path / "soap-token"
    guarded = params.model_copy(update={"serving": params.serving.model_copy(update={"token_file": str(token_file)})})
    deploy(guarded, snaps["sum-B"], "sum-B", timeout_s=180, params_file=soap_env["params_file"],
           frozen=(snaps["sum-A"], "sum-A"))
    try:
        _poll(lambda: _answers_without_token(url, 401), timeout_s=120, what="the token replica alone on the port")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        denied = httpx.get(f"{url}/users/0/embeddings", timeout=30)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert denied.json()["request_id"] == denied.headers["x-request-id"] and token not in denied.text
        wrong = httpx.get(f"{url}/users/0/embeddings", headers={"Authorization": "Bearer " + "x" * len(token)}, timeout=30)
        assert wrong.status_code == 401
        assert httpx.post(f"{url}/embeddings/batch", json={"user_ids": [0]}, timeout=30).status_code == 401
        assert httpx.get(f"{url}/openapi.json", timeout=30).status_code == 401
        right = httpx.get(f"{url}/users/0/embeddings", params={"mode": "offline"}, headers=auth_headers(guarded),
                          timeout=30)
        assert right.status_code == 200 and right.json()["source"] == "batch", right.text[:300]
        assert httpx.get(f"{url}/healthz", timeout=30).json()["snapshot_id"] == "sum-B"  # open: liveness
        assert served_snapshot_id(guarded) == "sum-B" and served_snapshot_id(params) is None
    finally:
        deploy(params, snaps["sum-B"], "sum-B", timeout_s=180, params_file=soap_env["params_file"],
               frozen=(snaps["sum-A"], "sum-A"))
        _poll(lambda: _answers_without_token(url, 200), timeout_s=120, what="the replica without a token alone")


@slow
def test_version_names_the_workspace_the_app_serves(soap_env, serving_b, url):
    """/version's workspace_id is the identity of the workspace the rollout was for (its marker): doctor tells its
    own app from another workspace's by it."""
    from serving.rollout import served_version

    ws = soap_env["ws"]
    assert served_version(soap_env["params"])["workspace_id"] == ws.identity()
    ident = ws.claim()  # a marked workspace: the next rollout passes its identity
    _serve(soap_env, "sum-B")
    _poll(lambda: httpx.get(f"{url}/version", timeout=30).json()["workspace_id"] == ident,
          what=f"/version naming workspace {ident}")


@slow
def test_healthz_version_and_openapi(serving_a, url):
    httpx.get(f"{url}/users/8/embeddings", timeout=30)  # an async read: a compute call is scheduled
    health = _health(url)
    assert health["status"] == "ok" and health["snapshot_id"] == "sum-A" and health["mode"] == "async"
    assert health["frozen_snapshot_id"] == "sum-A" and health["compute_scheduled"] >= 1
    version = httpx.get(f"{url}/version", timeout=30).json()
    assert version["snapshot_id"] == "sum-A" and version["ingress"]["mode"] == "async"
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    for path in ("/users/{user_id}/embeddings", "/embeddings/batch", "/version", "/healthz", "/metrics"):
        assert path in schema["paths"], path
    get = schema["paths"]["/users/{user_id}/embeddings"]["get"]
    assert {"404", "422", "503"} <= set(get["responses"])
    assert httpx.get(f"{url}/docs", timeout=30).status_code == 200


@slow
def test_openapi_bounds_agree_with_validation_and_fuzzing_finds_no_fault(serving_a, url):
    """The schema states what validation enforces (user ids: 0 <= id < 2**63, exactly), and schema-driven fuzzing
    of every operation (schemathesis: valid and invalid requests) finds no 5xx, no schema-valid request rejected
    and no response outside the schema."""
    from api_fuzz import fuzz_api

    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    path_id = schema["paths"]["/users/{user_id}/embeddings"]["get"]["parameters"][0]["schema"]
    body_id = schema["components"]["schemas"]["BatchRequest"]["properties"]["user_ids"]["items"]
    for bound in (path_id, body_id):
        assert bound["minimum"] == 0 and bound["exclusiveMaximum"] == 2**63 and "maximum" not in bound, bound
        assert type(bound["exclusiveMaximum"]) is int, bound  # an exact integer, not the double 9.2e18
    # The largest id the schema allows is accepted (404: nobody has it), the smallest it forbids is a 422.
    assert httpx.get(f"{url}/users/{2**63 - 1}/embeddings", timeout=30).status_code == 404
    assert httpx.get(f"{url}/users/{2**63}/embeddings", timeout=30).status_code == 422
    batch = httpx.post(f"{url}/embeddings/batch", json={"user_ids": [2**63 - 1, 1.0], "mode": "offline"}, timeout=30)
    assert batch.status_code == 200 and [r["user_id"] for r in batch.json()["results"]] == [2**63 - 1, 1], batch.text
    report = fuzz_api(url, max_examples=20, seed=0, deadline_s=90)
    TIMINGS["fuzz"] = {k: report[k] for k in ("operations", "cases", "by_status")}
    assert report["operations"] == 5 and report["cases"] >= 60, report
    assert report["failures"] == [], [(f["check"], f["status"], f["request"]) for f in report["failures"]]
    assert not any(500 <= code for code in report["by_status"] if code != 503), report["by_status"]


@slow
def test_the_hot_route_answers_what_the_framework_route_answers(soap_env, deployed_a, serving_a, url):
    """GET /users/{id}/embeddings with a plain id and mode is answered without FastAPI (serving.http_app.FastUserReads);
    the same request in a form only FastAPI takes (an extra query parameter, a leading zero) gets the same answer."""
    _fresh_rows(soap_env, url, deployed_a, [0])
    for user, mode in ((0, "offline"), (UNKNOWN_USER, "offline"), (0, "async"), (UNKNOWN_USER, "async")):
        fast = httpx.get(f"{url}/users/{user}/embeddings", params={"mode": mode}, timeout=30)
        slow_ = httpx.get(f"{url}/users/0{user}/embeddings", params={"mode": mode, "trace": "1"}, timeout=30)
        assert fast.status_code == slow_.status_code == (200 if user == 0 else 404), (fast.text, slow_.text)
        assert fast.headers["content-type"] == slow_.headers["content-type"] == "application/json"
        a, b = fast.json(), slow_.json()
        if user == 0:
            a.pop("age_seconds"), b.pop("age_seconds")
        else:  # each answer names its own request id
            assert a.pop("request_id") == fast.headers["x-request-id"] and b.pop("request_id") == slow_.headers["x-request-id"]
        assert a == b, (a, b)
    # What the fast path does not take goes to FastAPI: its validation answers.
    assert httpx.get(f"{url}/users/{2**63}/embeddings", timeout=30).status_code == 422
    assert httpx.get(f"{url}/users/1/embeddings", params={"mode": "warp"}, timeout=30).status_code == 422
    assert httpx.post(f"{url}/users/1/embeddings", timeout=30).status_code == 405


@slow
def test_in_process_client_answers_what_http_answers(soap_env, deployed_a, serving_a, url):
    """The SOAP client a Python downstream model holds (SoapClient.connect) reads the store itself and answers what
    the HTTP API answers, mode by mode; its async reads schedule real recomputes through the compute handle."""
    from serving.client import SoapClient

    users = [0, 1, 2, 30, UNKNOWN_USER]  # stored rows, a user with features only, an unknown user
    _fresh_rows(soap_env, url, deployed_a, users[:4])
    client = SoapClient.connect(soap_env["params"], metrics=False)
    try:
        # A slow model: no write-back lands while the two reads are compared.
        with _configured(soap_env, realtime_budget_ms=50, compute_options={"debug_delay_ms": 3000}):
            client.reconfigure({**client.config, "realtime_budget_ms": 50})
            for mode in ("offline", "async", "realtime"):
                local = client.get(users, mode=mode)
                remote = httpx.post(f"{url}/embeddings/batch", json={"user_ids": users, "mode": mode}, timeout=30)
                assert remote.status_code == 200, remote.text
                assert list(local) == users
                for item in remote.json()["results"]:
                    mine = local[item["user_id"]]
                    assert mine["status"] == item["status"] and mine["compute"] == item["compute"], (mode, mine, item)
                    if item["status"] != "ok":
                        continue
                    for key in ("source", "snapshot_id", "written_at_ms", "pooled_versions"):
                        assert mine[key] == item[key], (mode, key, mine[key], item[key])
                    assert mine["embeddings"].dtype == np.float16 and mine["embeddings"].shape == (K, D)
                    np.testing.assert_array_equal(mine["embeddings"], np.asarray(item["embeddings"], np.float16))
                statuses = {u: local[u]["status"] for u in users}
                assert statuses == {0: "ok", 1: "ok", 2: "ok", 30: "not_found", UNKNOWN_USER: "not_found"}, (mode, statuses)
        # Async reads schedule the recompute: user 30 (features, no row) gets its first version.
        _poll(lambda: client.health()["compute_inflight"] == 0, what="the client's compute calls answered")
        _fresh_rows(soap_env, url, deployed_a, [30])
        before = client.health()["compute_scheduled"]
        assert client.get([30], mode="async")[30]["compute"] == "scheduled"
        row = _poll(lambda: _stored(soap_env, 30), what="user 30 written back after an in-process async read")
        assert row["snapshot_id"] == "sum-A" and row["pooled_versions"] == 1
        _poll(lambda: client.health()["compute_written"] >= 1, what="the client counted the write-back")
        assert client.health()["compute_scheduled"] > before
        assert client.get([30], mode="offline")[30]["status"] == "not_found"  # no daily batch value for user 30
    finally:
        client.close()


@slow
def test_compute_threads_yield_the_cpu_to_the_read_path(soap_env, deployed_a, url):
    """The read path outranks the write path on a shared CPU: compute threads run under SCHED_IDLE at
    nice 19 (per thread, as the kernel reports it), the ingress replica at Ray's configured level."""
    info = _compute_info(soap_env)
    cfg = soap_env["params"].serving
    assert cfg.compute_sched_idle and cfg.compute_niceness == 19
    assert cfg.compute_cpus == "last"
    allowed = os.sched_getaffinity(0)
    for role in ("compute", "load"):
        assert info["cpu_priority"][role]["policy"] == "idle", info["cpu_priority"]
        assert info["cpu_priority"][role]["niceness"] == 19, info["cpu_priority"]
        # Pinned to the last CPU (when there are two or more), so the read path keeps the others' caches.
        expected = [max(allowed)] if len(allowed) >= 2 else sorted(allowed)
        assert info["cpu_priority"][role]["cpus"] == expected, info["cpu_priority"]
    # The replica's own threads (event loop, health checks) keep the worker niceness (0, not Ray's 15), on top of
    # what the session's Ray inherited from this process (a suite run under `nice -n 5` starts it at 5).
    pid = info["pid"]
    main_nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    assert cfg.ray_worker_niceness == 0 and main_nice == min(19, os.nice(0) + cfg.ray_worker_niceness)
    # Operators see it on /version.
    version = httpx.get(f"{url}/version", timeout=30).json()
    assert version["cpu_priority"]["compute"]["policy"] == "idle", version


@slow
def test_burst_of_reads_all_answered_and_compute_accounted(soap_env, deployed_a, url):
    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[client.get(f"{url}/users/{i % 40}/embeddings") for i in range(120)])

    # A slow compute: calls pile up to serving.max_inflight_compute (16), the rest are dropped.
    with _configured(soap_env, compute_options={"debug_delay_ms": 500}):
        before = _health(url)
        responses = asyncio.run(burst())
        assert {r.status_code for r in responses} <= {200, 404}
        fates = [r.json()["compute"] for r in responses]
        assert set(fates) <= {"scheduled", "dropped"} and "dropped" in fates
        after = _poll(
            lambda: (h := _health(url))["compute_inflight"] == 0 and h,
            what="async computes of the burst to finish",
        )
    assert after["compute_scheduled"] - before["compute_scheduled"] == fates.count("scheduled")
    assert after["compute_dropped"] - before["compute_dropped"] == fates.count("dropped")
    assert after["compute_failed"] == 0
    TIMINGS["burst_120_dropped"] = fates.count("dropped")


@slow
def test_prometheus_metrics_move(soap_env, serving_a, url):
    from serving.metrics import parse_samples, total

    def scrape() -> str:
        resp = httpx.get(f"{url}/metrics", timeout=30)
        assert resp.status_code == 200, resp.text[:300]
        return resp.text

    def counts(text: str) -> dict[str, float]:
        return {
            "reads": total(text, "ray_soap_read_latency_seconds_count"),
            "ages": total(text, "ray_soap_embedding_age_seconds_count"),
            "computes": total(text, "ray_soap_compute_latency_seconds_count", tower="production"),
            "write_backs": total(text, "ray_soap_write_backs_total"),
            "dropped": total(text, "ray_soap_compute_dropped_total"),
            "fallbacks": total(text, "ray_soap_realtime_fallbacks_total"),
        }

    if not all(v > 0 for v in counts(scrape()).values()):  # no earlier test made this traffic: make it
        with _configured(soap_env, compute_options={"debug_delay_ms": 500}):
            # 40 users in async mode, past the in-flight bound (16): reads, drops, then write-backs.
            httpx.post(f"{url}/embeddings/batch", json={"user_ids": list(range(40))}, timeout=30)
            _poll(lambda: _health(url)["compute_inflight"] == 0, what="the batch's compute calls")
        with _configured(soap_env, mode="realtime", realtime_budget_ms=50, compute_options={"debug_delay_ms": 1000}):
            httpx.get(f"{url}/users/0/embeddings", timeout=30)  # a fallback
    # Reads, write-backs, drops and fallbacks happened: every metric has moved.
    moved = _poll(lambda: (c := counts(scrape())) and all(v > 0 for v in c.values()) and c, what="metrics exported")
    def loaded() -> list:
        return [
            (labels.get("role"), labels.get("snapshot_id"), v)
            for n, labels, v in parse_samples(scrape())
            if n == "ray_soap_snapshot_loaded" and v > 0
        ]

    deadline, gauge = time.monotonic() + 60, []
    while ("production", "sum-A", 1.0) not in gauge:
        assert time.monotonic() < deadline, f"loaded-snapshot gauge never showed sum-A: {gauge}"
        time.sleep(0.5)
        gauge = loaded()
    assert {"ray_soap_requests_total", "ray_soap_compute_calls_total"} <= {n for n, _, _ in parse_samples(scrape())}
    # More reads and a fallback move them further.
    for _ in range(3):
        httpx.get(f"{url}/users/0/embeddings", timeout=30)
    with _configured(soap_env, mode="realtime", realtime_budget_ms=50, compute_options={"debug_delay_ms": 1000}):
        httpx.get(f"{url}/users/0/embeddings", timeout=30)
    _poll(
        lambda: (c := counts(scrape()))["reads"] >= moved["reads"] + 4 and c["fallbacks"] > moved["fallbacks"] and c,
        what="metrics to move",
    )


# ---------------------------------------------------------------------------------------------
# rollout
# ---------------------------------------------------------------------------------------------
@contextmanager
def _readers(url: str, user_ids: list[int], n_threads: int = 4):
    """Concurrent readers (``n_threads``) meanwhile; yields the list of (status code, snapshot id) seen."""
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def loop(offset: int):
        with httpx.Client(timeout=30) as client:
            i = offset
            while not stop.is_set():
                try:
                    resp = client.get(f"{url}/users/{user_ids[i % len(user_ids)]}/embeddings")
                    seen.append((resp.status_code, resp.json().get("snapshot_id") if resp.status_code == 200 else None))
                except httpx.HTTPError as exc:  # a failed request counts as a failure
                    seen.append((-1, repr(exc)))
                i += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(n_threads)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def _compute_info(soap_env):
    from serving.rollout import compute_info

    info = compute_info(soap_env["params"], timeout_s=30)
    assert info is not None
    return info


@slow
def test_rollout_to_b_under_load_keeps_reads_and_writes_up(soap_env, serving_a, url):
    from serving.rollout import rollout, served_snapshot_id

    pid_before = _compute_info(soap_env)["pid"]
    written_before = _compute_info(soap_env)["stats"]["written"]
    users = list(range(10, 30))
    t0 = time.monotonic()
    with _readers(url, users) as seen:
        time.sleep(1.0)  # load before the change
        result = rollout(
            soap_env["params"],
            soap_env["snaps"]["sum-B"],
            "sum-B",
            previous=(soap_env["snaps"]["sum-A"], "sum-A"),
            params_file=soap_env["params_file"],
        )
        TIMINGS["rollout_b_s"] = time.monotonic() - t0
        # Readers keep going until they see rows recomputed by B.
        _poll(lambda: any(sid == "sum-B" for _, sid in list(seen)), what="a read answering a row written by B")
    codes = [c for c, _ in seen]
    TIMINGS["rollout_b_reads"] = len(codes)
    assert len(codes) > 20 and set(codes) <= {200, 404}, sorted(set(codes))  # zero failed requests
    assert result["status"] == "deployed" and result["previous_served"] == "sum-A"
    assert result["record"]["status"] == "deployed" and result["record"]["served_after"] == "sum-B"
    assert served_snapshot_id(soap_env["params"]) == "sum-B"
    version = httpx.get(f"{url}/version", timeout=30).json()
    assert version["snapshot_id"] == "sum-B" and version["last_error"] is None
    assert _health(url)["snapshot_id"] == "sum-B"
    # The served id switched in what readers got: rows of A before, rows of B after.
    sids = [sid for c, sid in seen if c == 200]
    assert "sum-A" in sids and sids.index("sum-A") < len(sids) - 1 - sids[::-1].index("sum-B")
    # user_config only: the same replica process was reconfigured, not replaced; writes never stopped.
    info = _compute_info(soap_env)
    assert info["pid"] == pid_before and info["stats"]["failed_batches"] == 0
    assert info["stats"]["written"] > written_before
    assert _health(url)["compute_failed"] == 0

    # Rolling out what is served is a no-op success.
    again = rollout(soap_env["params"], soap_env["snaps"]["sum-B"], "sum-B", params_file=soap_env["params_file"])
    assert again["status"] == "unchanged" and again["record"]["status"] == "unchanged"


@slow
def test_frozen_mode_keeps_serving_the_first_snapshot(soap_env, deployed_a, url):
    assert httpx.get(f"{url}/version", timeout=30).json()["frozen_snapshot_id"] == "sum-A"
    stored_before = _stored(soap_env, 6)
    resp = httpx.get(f"{url}/users/6/embeddings", params={"mode": "frozen"}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["source"] == "frozen" and body["snapshot_id"] == "sum-A" and body["compute"] == "completed"
    np.testing.assert_array_equal(np.asarray(body["embeddings"], np.float16), _expected_raw(soap_env, "sum-A", 6))
    after = _stored(soap_env, 6)  # frozen never writes
    assert (after is None) == (stored_before is None)
    if after is not None:
        assert after["written_at_ms"] == stored_before["written_at_ms"]
    # No features: 404 with a reason (not 500).
    missing = httpx.get(f"{url}/users/{UNKNOWN_USER}/embeddings", params={"mode": "frozen"}, timeout=30)
    assert missing.status_code == 404 and "no features" in missing.json()["detail"]
    batch = httpx.post(f"{url}/embeddings/batch", json={"user_ids": [6, 7], "mode": "frozen"}, timeout=30).json()
    assert [r["snapshot_id"] for r in batch["results"]] == ["sum-A", "sum-A"]


@slow
def test_pipeline_rollout_records_outcome_in_registry(soap_env, serving_b, url):
    """tasks.rollout stores the rollout record; a corrupt production snapshot is refused and B keeps
    serving; frozen mode is pinned to the first promoted snapshot."""
    from serving.rollout import RolloutError, served_snapshot_id

    ctx = context()
    assert ctx.ws.root == soap_env["ws"].root
    for sid, ds, parent in (("sum-A", "2026-01-01", None), ("sum-B", "2026-01-02", "sum-A"), ("sum-C", "2026-01-03", "sum-B")):
        ctx.registry.register_candidate(sid, ds, parent, {})
    ctx.registry.promote("sum-A", reason="test")
    ctx.registry.promote("sum-B", reason="test")
    out = tasks.rollout("2026-01-02")
    assert out["status"] == "unchanged" and ctx.registry.get("sum-B").record["rollout"]["status"] == "unchanged"
    assert ctx.registry.get("sum-B").record["rollout"]["frozen_snapshot_id"] == "sum-A"

    ctx.registry.promote("sum-C", reason="test")
    with pytest.raises(RolloutError):
        tasks.rollout("2026-01-03")
    record = ctx.registry.get("sum-C").record["rollout"]
    assert record["status"] == "preflight_failed" and record["served_after"] == "sum-B" and record["error"]
    assert served_snapshot_id(soap_env["params"]) == "sum-B"
    ctx.registry.promote("sum-B", reason="test: back", force=True)


@slow
def test_rollout_of_corrupt_snapshot_fails_preflight_and_keeps_b(soap_env, serving_b, url):
    from serving.rollout import RolloutError, rollout, served_snapshot_id

    with pytest.raises(RolloutError) as err:
        rollout(
            soap_env["params"],
            soap_env["snaps"]["sum-C"],
            "sum-C",
            previous=(soap_env["snaps"]["sum-B"], "sum-B"),
            params_file=soap_env["params_file"],
        )
    assert "sum-C" in str(err.value) and "'sum-B'" in str(err.value)
    assert err.value.record["status"] == "preflight_failed"
    assert served_snapshot_id(soap_env["params"]) == "sum-B"


@slow
def test_rollout_of_corrupt_snapshot_in_replica_rolls_back_to_b(soap_env, serving_b, url):
    from serving.rollout import RolloutError, rollout, served_snapshot_id

    pid_before = _compute_info(soap_env)["pid"]
    t0 = time.monotonic()
    with _readers(url, [0, 1, 2]) as seen, pytest.raises(RolloutError) as err:
        rollout(
            soap_env["params"],
            soap_env["snaps"]["sum-C"],
            "sum-C",
            previous=(soap_env["snaps"]["sum-B"], "sum-B"),
            timeout_s=60,
            preflight=False,
            params_file=soap_env["params_file"],
        )
    TIMINGS["failed_rollout_with_rollback_s"] = time.monotonic() - t0
    message = str(err.value)
    assert "sum-C" in message and "could not load" in message and "rolled back to sum-B" in message, message
    record = err.value.record
    assert record["status"] == "rolled_back" and record["rolled_back_to"] == "sum-B"
    assert record["served_after"] == "sum-B" and "could not load" in record["error"]
    assert served_snapshot_id(soap_env["params"]) == "sum-B"
    codes = [c for c, _ in seen]
    assert codes and set(codes) == {200}, sorted(set(codes))  # reads never stopped
    # The replica kept its tower through the failed load: same process, no error left after the rollback.
    info = _compute_info(soap_env)
    assert info["pid"] == pid_before and info["snapshot_id"] == "sum-B" and info["last_error"] is None
    resp = httpx.get(f"{url}/users/2/embeddings", timeout=30)
    assert resp.status_code == 200
    _poll(lambda: (r := _stored(soap_env, 2)) and r["snapshot_id"] == "sum-B", what="user 2 recomputed by sum-B")


@slow
def test_snapshot_reexported_under_same_id_is_reloaded(soap_env, serving_b, url):
    """A rerun of a day's training replaces the snapshot directory under the same id: not a no-op."""
    from serving.rollout import rollout
    from serving.settings import snapshot_fingerprint
    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot

    params, spec = soap_env["params"], soap_env["spec"]
    old_fp = _compute_info(soap_env)["fingerprint"]
    export_snapshot(build_model(spec, params.model, seed=22), spec, params.model, soap_env["snaps"]["sum-B"], "sum-B")
    new_fp = snapshot_fingerprint(soap_env["snaps"]["sum-B"])
    assert new_fp != old_fp
    result = rollout(params, soap_env["snaps"]["sum-B"], "sum-B", params_file=soap_env["params_file"])
    assert result["status"] == "deployed"
    assert httpx.get(f"{url}/version", timeout=30).json()["fingerprint"] == new_fp
    again = rollout(params, soap_env["snaps"]["sum-B"], "sum-B", params_file=soap_env["params_file"])
    assert again["status"] == "unchanged"


@pytest.fixture
def restores_settings(soap_env):
    """Afterwards, sum-B with the params' constructor settings again (a rollout compares user_configs
    only, so it would not undo a test's settings change)."""
    yield
    from serving.rollout import deploy, served_snapshot_id

    snaps = soap_env["snaps"]
    deploy(soap_env["params"], snaps["sum-B"], "sum-B", timeout_s=180, params_file=soap_env["params_file"],
           frozen=(snaps["sum-A"], "sum-A"))
    _poll(lambda: served_snapshot_id(soap_env["params"]) == "sum-B", what="sum-B with the params' settings")


@slow
@store_independent
def test_failed_fresh_replica_rolls_back_and_reads_stay_up(soap_env, serving_b, restores_settings, url):
    """Code/settings change + unloadable snapshot: fresh replicas never come up (DEPLOY_FAILED) while the
    old replica keeps serving (surge); the rollback is itself a replacement (B with the new settings)."""
    from serving.rollout import RolloutError, rollout, served_snapshot_id

    params = soap_env["params"]
    pid_before = _compute_info(soap_env)["pid"]
    changed = params.model_copy(update={"serving": params.serving.model_copy(update={"max_inflight_compute": 18})})
    t0 = time.monotonic()
    with _readers(url, [0], n_threads=1) as seen, pytest.raises(RolloutError) as err:
        rollout(
            changed,
            soap_env["snaps"]["sum-C"],
            "sum-C",
            previous=(soap_env["snaps"]["sum-B"], "sum-B"),
            timeout_s=120,
            preflight=False,
            params_file=soap_env["params_file"],
        )
    TIMINGS["failed_fresh_replica_rollout_s"] = time.monotonic() - t0
    assert "rolled back to sum-B" in str(err.value), str(err.value)
    codes = [c for c, _ in seen]
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert served_snapshot_id(params) == "sum-B"
    info = _compute_info(soap_env)
    assert info["pid"] != pid_before and info["snapshot_id"] == "sum-B"
    # The fresh replica still froze the first snapshot.
    assert info["frozen_snapshot_id"] == "sum-A"
