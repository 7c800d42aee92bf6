"""SOAP serving end to end: real Ray Serve over HTTP, real Feast SQLite online store, tmp workspace.

One local Ray instance for the session (2 CPUs), a free HTTP port, a tiny model. Tests run in file order
(store I/O -> deploy A -> reads and async write-back -> rollout B -> failed rollouts keep B). Only the
in-process launcher test is not ``slow``.
"""

from __future__ import annotations

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

slow = pytest.mark.slow

K, D = 2, 8
USERS_WITH_EMBEDDINGS = [0, 1, 2]
USERS_WITH_FEATURES = [0, 1, 2, 3, 4]  # 3 and 4: features but no stored embedding yet
UNKNOWN_USER = 999_999
TIMINGS: dict[str, float] = {}


def _poll(fn, timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def soap_env(tmp_path_factory):
    """Tmp params (free port, local Ray, tiny model) + workspace with features and three snapshots."""
    from sum_platform.config import PROJECT_ROOT

    root = tmp_path_factory.mktemp("soap")
    workspace = root / "workspace"
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["paths"]["workspace"] = str(workspace)
    raw["model"].update({"num_embeddings": K, "embedding_dim": D, "hidden_dim": 16, "mix_hidden_dim": 8})
    # The session's one Ray instance serves HTTP on the session's port (tests/conftest.py).
    raw["serving"].update({"port": int(os.environ["SUM_TEST_PORT"]), "ray_address": "local", "max_inflight_compute": 16})
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))

    mp = pytest.MonkeyPatch()
    mp.setenv("SUM_PARAMS", str(params_file))
    mp.setenv("SUM_WORKSPACE", str(workspace))
    mp.delenv("RAY_ADDRESS", raising=False)

    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot
    from sum_platform.config import load_params
    from sum_platform.feature_store import USER_FEATURES_VIEW, apply_definitions, feature_spec
    from sum_platform.workspace import Workspace

    params = load_params(params_file)
    store = apply_definitions(params)
    spec = feature_spec(params, store)

    rng = np.random.default_rng(0)
    users = pd.DataFrame({"user_id": np.asarray(USERS_WITH_FEATURES, dtype=np.int64)})
    for c in spec.user_dense:
        users[c] = rng.random(len(users)).astype(np.float32)
    for c, size in spec.user_sparse.items():
        users[c] = [list(rng.integers(0, size, size=int(n))) for n in rng.integers(0, 5, size=len(users))]
    users["event_ts"] = pd.Timestamp.now(tz="UTC")
    store.write_to_online_store(USER_FEATURES_VIEW, users)

    ws = Workspace(params.workspace)
    snaps = {}
    for name, seed in (("sum-A", 1), ("sum-B", 2), ("sum-C", 3)):
        model = build_model(spec, params.model, seed=seed)
        snaps[name] = export_snapshot(model, spec, params.model, ws.snapshot_dir(name), name)
    # sum-C is corrupt: a truncated user tower file.
    tower_file = snaps["sum-C"] / "user_tower.safetensors"
    tower_file.write_bytes(tower_file.read_bytes()[:100])

    yield {"params": params, "params_file": params_file, "store": store, "spec": spec, "snaps": snaps, "users": users}
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
    """Initial (daily-batch-like) embedding rows, then the app deployed with snapshot A."""
    from serving.rollout import rollout, served_snapshot_id
    from serving.store_io import write_embeddings

    old = pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=1)
    emb = np.random.default_rng(1).standard_normal((len(USERS_WITH_EMBEDDINGS), K, D)).astype(np.float16)
    write_embeddings(soap_env["store"], USERS_WITH_EMBEDDINGS, emb, "batch-0", old)

    t0 = time.monotonic()
    result = rollout(soap_env["params"], soap_env["snaps"]["sum-A"], "sum-A", params_file=soap_env["params_file"])
    TIMINGS["first_deploy_s"] = time.monotonic() - t0
    assert result["status"] == "deployed", result
    assert served_snapshot_id(soap_env["params"]) == "sum-A"
    return {"initial_written_at_ms": int(old.value // 1_000_000), "initial": emb}


def test_compute_launcher_bounds_inflight_calls_and_counts_drops():
    import asyncio

    from serving.app import ComputeLauncher

    async def scenario():
        launcher = ComputeLauncher(max_inflight=3)
        gates = [asyncio.get_running_loop().create_future() for _ in range(5)]
        fired = [launcher.fire(lambda g=g: g) for g in gates]
        assert [t is not None for t in fired] == [True, True, True, False, False]
        assert launcher.inflight == 3 and launcher.stats["dropped"] == 2
        gates[0].set_result({"status": "written"})
        gates[1].set_result({"status": "no_features"})
        gates[2].set_exception(RuntimeError("compute down"))
        await asyncio.gather(*[t for t in fired if t is not None])
        assert launcher.inflight == 0
        assert launcher.stats == {"scheduled": 3, "dropped": 2, "written": 1, "skipped": 1, "failed": 1}
        assert launcher.fire(lambda: asyncio.sleep(0, {"status": "written"})) is not None

    asyncio.run(scenario())


@slow
def test_store_io_round_trip_and_validation(soap_env):
    from serving.store_io import read_embeddings, read_user_features, write_embeddings

    store = soap_env["store"]
    emb32 = np.random.default_rng(5).standard_normal((2, K, D)).astype(np.float32)
    assert write_embeddings(store, [500, 501], emb32, "probe", 1_700_000_000_000) == 2
    rows = read_embeddings(store, [500, 501, 502])
    assert set(rows) == {500, 501}
    assert rows[500]["snapshot_id"] == "probe" and rows[500]["written_at_ms"] == 1_700_000_000_000
    # Stored values are the fp16 rounding of what was given, exactly.
    np.testing.assert_array_equal(rows[501]["embeddings"], emb32[1].astype(np.float16))
    with pytest.raises(ValueError, match="K="):
        write_embeddings(store, [500], np.zeros((1, K + 1, D), np.float16), "probe")
    with pytest.raises(ValueError, match="NaN/inf"):
        write_embeddings(store, [500], np.full((1, K, D), 1e6, np.float32), "probe")
    with pytest.raises(ValueError, match="non-negative"):
        write_embeddings(store, [-5], np.zeros((1, K, D), np.float16), "probe")
    with pytest.raises(ValueError, match="user ids"):
        write_embeddings(store, [500, 501], np.zeros((1, K, D), np.float16), "probe")

    frame, skipped = read_user_features(store, [0, 1, UNKNOWN_USER], soap_env["spec"])
    assert frame["user_id"].tolist() == [0, 1] and skipped == {UNKNOWN_USER: "no_features"}


def _stored(soap_env, user_id):
    from serving.store_io import read_embeddings

    return read_embeddings(soap_env["store"], [user_id]).get(user_id)


@slow
def test_get_returns_stored_embeddings_then_async_write_back(soap_env, deployed_a, url):
    t0 = time.monotonic()
    resp = httpx.get(f"{url}/users/0/embeddings", timeout=30)
    TIMINGS["first_request_s"] = time.monotonic() - t0
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["user_id"] == 0
    # The read answers with what is stored (the batch row): it never waits for compute.
    assert body["snapshot_id"] == "batch-0"
    assert body["written_at_ms"] == deployed_a["initial_written_at_ms"]
    assert body["age_seconds"] > 3600
    assert body["compute"] == "scheduled"
    assert len(body["embeddings"]) == K and all(len(e) == D for e in body["embeddings"])
    np.testing.assert_array_equal(np.asarray(body["embeddings"], dtype=np.float16), deployed_a["initial"][0])

    # The async compute rewrites the row with snapshot A and a fresh write time.
    row = _poll(
        lambda: (r := _stored(soap_env, 0)) and r["snapshot_id"] == "sum-A" and r,
        what="user 0 recomputed by sum-A",
    )
    assert row["written_at_ms"] > deployed_a["initial_written_at_ms"]
    assert row["embeddings"].shape == (K, D) and row["embeddings"].dtype == np.float16
    assert not np.array_equal(row["embeddings"], deployed_a["initial"][0])

    # The compute wrote exactly what the tower computes (fp16) for the user's features.
    from sum_models.snapshot import embed_users, load_user_tower

    tower, _ = load_user_tower(soap_env["snaps"]["sum-A"])
    users = soap_env["users"]
    expected = embed_users(tower, users[users["user_id"] == 0].reset_index(drop=True), soap_env["spec"])
    np.testing.assert_allclose(row["embeddings"].astype(np.float32), expected[0].astype(np.float32), atol=2e-3)

    t0 = time.monotonic()
    again = httpx.get(f"{url}/users/0/embeddings", timeout=30)
    TIMINGS["warm_request_s"] = time.monotonic() - t0
    assert again.status_code == 200
    assert again.json()["snapshot_id"] == "sum-A"
    assert again.json()["age_seconds"] < 600


@slow
def test_unknown_user_is_404_and_cold_user_gets_computed(soap_env, deployed_a, url):
    resp = httpx.get(f"{url}/users/{UNKNOWN_USER}/embeddings", timeout=30)
    assert resp.status_code == 404
    assert "no embeddings" in resp.json()["detail"]

    # User 3 has features but no stored embedding: 404 now, computed asynchronously, 200 later.
    first = httpx.get(f"{url}/users/3/embeddings", timeout=30)
    assert first.status_code == 404
    _poll(lambda: _stored(soap_env, 3) is not None, what="user 3 written by compute")
    later = httpx.get(f"{url}/users/3/embeddings", timeout=30)
    assert later.status_code == 200 and later.json()["snapshot_id"] == "sum-A"
    # The unknown user has no features: nothing is written for it.
    assert _stored(soap_env, UNKNOWN_USER) is None


@slow
@pytest.mark.parametrize("bad", ["-1", "abc", "1.5", str(2**63), "%20"])
def test_bad_user_ids_are_4xx_with_reason(deployed_a, url, bad):
    resp = httpx.get(f"{url}/users/{bad}/embeddings", timeout=30)
    assert 400 <= resp.status_code < 500, (bad, resp.status_code, resp.text)
    assert resp.json().get("detail")


@slow
def test_healthz_and_openapi(deployed_a, url):
    health = httpx.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["compute_scheduled"] >= 1
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert "/users/{user_id}/embeddings" in schema["paths"]
    assert "/version" in schema["paths"]


@slow
def test_burst_of_reads_all_answered_and_compute_accounted(soap_env, deployed_a, url):
    import asyncio

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[client.get(f"{url}/users/{i % 3}/embeddings") for i in range(60)])

    before = httpx.get(f"{url}/healthz", timeout=30).json()
    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {200}
    fates = [r.json()["compute"] for r in responses]
    assert set(fates) <= {"scheduled", "dropped"}
    after = _poll(
        lambda: (h := httpx.get(f"{url}/healthz", timeout=30).json())["compute_inflight"] == 0 and h,
        what="async computes of the burst to finish",
    )
    assert after["compute_scheduled"] - before["compute_scheduled"] == fates.count("scheduled")
    assert after["compute_dropped"] - before["compute_dropped"] == fates.count("dropped")
    assert after["compute_failed"] == 0
    TIMINGS["burst_60_dropped"] = fates.count("dropped")


@contextmanager
def _reader(url: str, user_id: int):
    """Reads a user's embeddings in a loop meanwhile; yields the list of status codes seen."""
    codes: list[int] = []
    stop = threading.Event()

    def loop():
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                codes.append(client.get(f"{url}/users/{user_id}/embeddings").status_code)
                time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield codes
    finally:
        stop.set()
        thread.join(timeout=60)


def _compute_info(soap_env):
    from ray import serve

    handle = serve.get_deployment_handle("ComputeCenter", app_name=soap_env["params"].serving.app_name)
    return handle.info.remote().result(timeout_s=30)


@slow
def test_rollout_to_b_reconfigures_in_place(soap_env, deployed_a, url):
    from serving.rollout import rollout, served_snapshot_id

    pid_before = _compute_info(soap_env)["pid"]
    t0 = time.monotonic()
    with _reader(url, 0) as codes:
        result = rollout(
            soap_env["params"],
            soap_env["snaps"]["sum-B"],
            "sum-B",
            previous=(soap_env["snaps"]["sum-A"], "sum-A"),
            params_file=soap_env["params_file"],
        )
    TIMINGS["rollout_b_s"] = time.monotonic() - t0
    assert codes and set(codes) == {200}, codes  # reads never stopped
    assert result["status"] == "deployed" and result["previous_served"] == "sum-A"
    assert served_snapshot_id(soap_env["params"]) == "sum-B"
    version = httpx.get(f"{url}/version", timeout=30).json()
    assert version["snapshot_id"] == "sum-B" and version["last_error"] is None
    # user_config only: the same replica process was reconfigured, not replaced.
    assert _compute_info(soap_env)["pid"] == pid_before

    # New computes are written by B.
    assert httpx.get(f"{url}/users/1/embeddings", timeout=30).status_code == 200
    _poll(lambda: (r := _stored(soap_env, 1)) and r["snapshot_id"] == "sum-B", what="user 1 recomputed by sum-B")

    # Rolling out what is served is a no-op success.
    again = rollout(soap_env["params"], soap_env["snaps"]["sum-B"], "sum-B", params_file=soap_env["params_file"])
    assert again["status"] == "unchanged"


@slow
def test_rollout_of_corrupt_snapshot_fails_preflight_and_keeps_b(soap_env, deployed_a, url):
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
    assert served_snapshot_id(soap_env["params"]) == "sum-B"


@slow
def test_rollout_of_corrupt_snapshot_in_replica_rolls_back_to_b(soap_env, deployed_a, url):
    from serving.rollout import RolloutError, rollout, served_snapshot_id

    pid_before = _compute_info(soap_env)["pid"]
    t0 = time.monotonic()
    with _reader(url, 0) as codes, pytest.raises(RolloutError) as err:
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
    assert served_snapshot_id(soap_env["params"]) == "sum-B"
    assert codes and set(codes) == {200}, codes  # reads never stopped
    # The replica kept its tower through the failed load: same process, no error left after the rollback.
    info = _compute_info(soap_env)
    assert info["pid"] == pid_before and info["snapshot_id"] == "sum-B" and info["last_error"] is None
    resp = httpx.get(f"{url}/users/2/embeddings", timeout=30)
    assert resp.status_code == 200
    _poll(lambda: (r := _stored(soap_env, 2)) and r["snapshot_id"] == "sum-B", what="user 2 recomputed by sum-B")


@slow
def test_snapshot_reexported_under_same_id_is_reloaded(soap_env, deployed_a, url):
    """A rerun of a day's training replaces the snapshot directory under the same id: not a no-op."""
    from serving.app import snapshot_fingerprint
    from serving.rollout import rollout
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


@slow
def test_failed_fresh_replica_rolls_back_and_reads_stay_up(soap_env, deployed_a, url):
    """Code/settings change + unloadable snapshot: fresh replicas never come up (DEPLOY_FAILED) while the
    old replica keeps serving (surge); the rollback is itself a replacement (B with the new settings)."""
    from serving.rollout import RolloutError, rollout, served_snapshot_id

    params = soap_env["params"]
    pid_before = _compute_info(soap_env)["pid"]
    changed = params.model_copy(update={"serving": params.serving.model_copy(update={"max_inflight_compute": 18})})
    t0 = time.monotonic()
    with _reader(url, 0) as codes, pytest.raises(RolloutError) as err:
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
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert served_snapshot_id(params) == "sum-B"
    info = _compute_info(soap_env)
    assert info["pid"] != pid_before and info["snapshot_id"] == "sum-B"
