"""Session-wide test environment, set before anything imports Airflow, Feast or Ray.

Every test process gets its own params file (a copy of the project's, with a test serving port), its own
default workspace and one Airflow home, all under a temporary folder. Heavy services (the Airflow DB, Ray)
start lazily in session fixtures of the tests that need them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import service_guard

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SESSION_DIR = Path(tempfile.mkdtemp(prefix="sum-tests-"))
TEST_PORT = int(os.environ.get("SUM_TEST_PORT", "8765"))
TEST_REDIS_PORT = int(os.environ.get("SUM_TEST_REDIS_PORT", "6395"))


def _write_test_params() -> Path:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serving"]["port"] = TEST_PORT
    params["serving"]["ray_address"] = "local"  # never attach to a developer's running cluster
    params["paths"] = {"workspace": "workspace", "dvc_remote": "dvc-remote"}
    # One Redis server for the session (fixture redis_server), whatever workspace a test module uses.
    params["feature_store"]["redis"].update(port=TEST_REDIS_PORT, data_dir=str(SESSION_DIR / "redis"),
                                            password_file=str(SESSION_DIR / "redis" / "password"))
    path = SESSION_DIR / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


os.environ["SUM_PARAMS"] = str(_write_test_params())
os.environ["SUM_WORKSPACE"] = str(SESSION_DIR / "workspace")
os.environ["SUM_TEST_PORT"] = str(TEST_PORT)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from sum_pipeline import airflow_env  # noqa: E402  (after the environment is set)

AIRFLOW_HOME = SESSION_DIR / "airflow"
os.environ.update(airflow_env.environment(AIRFLOW_HOME))
# The stacks the tests start (they inherit this environment) look for expired approvals every 2 s, not every 15 s
# (Airflow's default): a held candidate nobody answers (the deployed stack's DAY5, the benchmarks' small days) is
# held once its timeout has passed, not up to 15 s later. The timeout itself is what the params say.
os.environ.setdefault("AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL", "2")
# Ray Train's controller polls its workers every 2 s (Ray's default) and moves a fit through its states one poll at a
# time: a trivial 2-worker fit took ~20 s here, ~12.5 s polling every 0.2 s. The session's Ray, the stacks and the
# benchmarks the tests start inherit this (Ray Train also hands it from the driver to its controller); every fit
# still runs the same steps (tests/integration: the deployed stack's days, test_scale_out, scale_bench).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return SESSION_DIR


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB for the session (SQLite)."""
    airflow_env.configure(AIRFLOW_HOME)
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def write_online_features():
    """``write_online_features(store, spec, user_ids)``: seeded random values of every user feature of
    ``spec`` for those users, written to the online store as a materialization would; returns the frame."""
    import numpy as np
    import pandas as pd

    from sum_platform.feature_store import user_features_view

    def write(store, spec, user_ids, seed: int = 0):
        rng = np.random.default_rng(seed)
        users = pd.DataFrame({"user_id": np.asarray(user_ids, dtype=np.int64)})
        for c in spec.user_dense:
            users[c] = rng.random(len(users)).astype(np.float32)
        for c, size in spec.user_sparse.items():
            users[c] = [list(rng.integers(0, size, size=int(n))) for n in rng.integers(0, 5, size=len(users))]
        users["event_ts"] = pd.Timestamp.now(tz="UTC")
        store.write_to_online_store(user_features_view(), users)
        return users

    return write


@pytest.fixture(scope="session")
def ray_serve():
    """One local Ray instance with Serve for the whole session, shut down at the end."""
    import time

    from serving.ray_cluster import ensure_ray, shutdown
    from sum_platform.config import load_params

    t0 = time.monotonic()
    info = ensure_ray(load_params())
    yield info | {"seconds": time.monotonic() - t0}
    shutdown(stop_serve=True)


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session (Debian's, started by the project's own code, loopback only, with a
    password), stopped at the end. Modules select it with the ``redis`` profile in their params."""
    from sum_pipeline import redis_server as server
    from sum_platform.config import load_params

    import redis

    from sum_platform.feature_store import redis_password

    params = load_params()
    proc = server.start(params)
    client = redis.Redis(host="127.0.0.1", port=params.feature_store.redis.port, password=redis_password(params))

    def flush() -> None:
        """Empties the server: a module's workspace starts with no rows of an earlier module's (Feast's keys
        are the entity key and the project, the same in every workspace)."""
        client.flushall()

    yield {"port": params.feature_store.redis.port, "pid": proc.pid, "flush": flush}
    server.stop(proc)


def _stop_session_stacks() -> None:
    """Stops what a stack of the session's workspaces left running (an interrupted run skips the fixtures'
    ``down``), found as ``sumctl down`` finds it (its state file, else the workspace's identity in the processes'
    environment and their logs), before the session folder (their logs and state) goes."""
    # The modules' workspaces (session_dir/<name>) and the benchmarks' (session_dir/benchmarks/<run>/<name>/workspace)
    markers = [*SESSION_DIR.glob("*/.sum-workspace.json"),
               *SESSION_DIR.glob("benchmarks/*/*/workspace/.sum-workspace.json")]
    if not markers:
        return
    from sum_pipeline.stack import Stack
    from sum_platform.config import load_params
    from sum_platform.workspace import Workspace

    params = load_params()
    for marker in markers:
        stack = Stack(params, Workspace(marker.parent))
        if stack.live_processes():
            stack.down()


# ---------------------------------------------------------------------------------------------
# Where the session's time went: each module's wall time (setup, call and teardown of its tests, the module
# and session fixtures it set up first included), printed at the end of every run (CI's log included) next to
# pytest's per-test ``--durations`` (the Makefile's ``test`` target).
# ---------------------------------------------------------------------------------------------
_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if len(_MODULE_SECONDS) < 2:
        return
    total = sum(_MODULE_SECONDS.values())
    terminalreporter.section("seconds per test module (setup + call + teardown)")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1]):
        if seconds >= 1.0:
            terminalreporter.write_line(f"{seconds:8.1f}s {100 * seconds / total:5.1f}%  {module}")
    terminalreporter.write_line(f"{total:8.1f}s total in tests")


def pytest_sessionfinish(session, exitstatus):
    try:
        _stop_session_stacks()
    except Exception as exc:  # noqa: BLE001 - the folder still goes; say what may be left running
        print(f"\nstopping the session's stacks failed: {exc!r}", file=sys.stderr)
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A test not marked slow starts no service (tests/service_guard.py)
# ---------------------------------------------------------------------------------------------
def pytest_configure(config):
    service_guard.install()
    config._sum_test_fast = service_guard.slow_deselected(config)  # `make test-fast`: guarded all along
    service_guard.guarding(config._sum_test_fast, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    guarded = item.config._sum_test_fast or item.get_closest_marker("slow") is None
    service_guard.guarding(guarded, item.nodeid)
    try:
        return (yield)
    finally:
        service_guard.guarding(item.config._sum_test_fast, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    started = service_guard.started_during(item.nodeid)
    if started and report.passed and call.when != "teardown":
        report.outcome = "failed"  # the starter swallowed ServiceStarted: the test still fails
        report.longrepr = f"{item.nodeid} is not marked slow but started a service: {started[0][:300]}"
    return report
