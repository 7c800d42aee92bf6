"""The REST client against a real multi-process Airflow: api-server, scheduler (LocalExecutor) and
dag-processor as separate processes sharing one SQLite DB, with the simple auth manager.

The DAG folder holds two toy DAGs (a task pushing XComs, an approval, a task after it; the second
with a 3-second response timeout) and a file that fails to import.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest

from sum_pipeline.airflow_api import AirflowApiError, AirflowClient, run_result
from sum_pipeline.airflow_env import stack_environment

pytestmark = pytest.mark.slow

PORT = 18081
LOG_SERVER_PORT = 18793
BIN = Path(sys.executable).parent

TOY_DAG = '''
from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task

TOY_ASSET = Asset("toy_asset")

def build(dag_id, timeout):
    @dag(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1))
    def toy():
        @task.branch(outlets=[TOY_ASSET])  # as sum_daily's shift_gate: a branch recording an asset event
        def produce():
            ctx = get_current_context()
            ctx["outlet_events"][TOY_ASSET].extra = {"verdict": "held", "min_mean_cosine": 0.25}
            ctx["ti"].xcom_push(key="extra", value={"a": [1, 2.5], "s": "x", "none": None})
            ctx["ti"].xcom_push(key="digits", value="123")  # a string that parses as JSON
            print("PRODUCE-MARKER")
            return ["approve"]

        approve = ApprovalOperator(
            task_id="approve", subject="Approve {{ ds }}", body="**verdict** table",
            defaults="Reject", params={"reason": Param("", type="string")}, response_timeout=timeout,
        )

        @task
        def after():
            return "after ran"

        produce() >> approve >> after()

    return toy()


build("api_toy", timedelta(minutes=10))
build("api_toy_timeout", timedelta(seconds=3))
'''


def _wait_for(what: str, fn, timeout_s: float = 60, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout_s}s")
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def stack():
    """An Airflow stack of three processes on 127.0.0.1:18081; yields ``(client, jwt_secret)``."""
    home = Path(tempfile.mkdtemp(prefix="wt-api-airflow-"))
    dags = home / "dags"
    dags.mkdir()
    (dags / "api_toy.py").write_text(TOY_DAG)
    (dags / "broken_dag.py").write_text("from airflow.sdk import dag\nraise RuntimeError('toy import error')\n")
    jwt_secret = secrets.token_urlsafe(64)
    env = os.environ | stack_environment(
        home, dags_folder=dags, host="127.0.0.1", port=PORT, jwt_secret=jwt_secret,
        api_secret_key=secrets.token_urlsafe(32), fernet_key=urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        log_server_port=LOG_SERVER_PORT,
    ) | {"AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "1",  # the HITL timeout sweep
         "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    procs: dict[str, subprocess.Popen] = {}
    t0 = time.monotonic()
    try:
        for name, args in {"api-server": ["api-server", "--port", str(PORT), "--host", "127.0.0.1"],
                           "scheduler": ["scheduler"], "dag-processor": ["dag-processor"]}.items():
            out = open(home / f"{name}.log", "wb")
            procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        password_file = home / "simple_auth_manager_passwords.json.generated"
        _wait_for("the generated password file", lambda: password_file.exists() and password_file.stat().st_size, 120)
        password = json.loads(password_file.read_text())["admin"]
        client = AirflowClient(f"http://127.0.0.1:{PORT}", "admin", password, timeout=60)
        client.wait_healthy(120, components=("metadatabase", "scheduler", "dag_processor"))
        client.wait_dag("api_toy", 120)
        print(f"stack up in {time.monotonic() - t0:.1f}s")
        yield client, jwt_secret
        client.close()
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for log in home.glob("*.log"):
            sys.stderr.write(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-1500:]}\n")
        shutil.rmtree(home, ignore_errors=True)


def _failure_logs(client: AirflowClient, dag_id: str, run_id: str) -> str:
    """The log tails of a run's failed tasks (an assertion message)."""
    tis = client.task_instances(dag_id, run_id)
    return "\n".join(f"--- {t} try {ti['try_number']}:\n" + client.task_log(dag_id, run_id, t, ti["try_number"])[-3000:]
                     for t, ti in tis.items() if ti["state"] == "failed")


def _awaiting(client: AirflowClient, dag_id: str, run_id: str):
    return lambda: client.task_instances(dag_id, run_id).get("approve", {}).get("state") == "awaiting_input"


def _finished(client: AirflowClient, dag_id: str, run_id: str):
    return lambda: client.dag_run(dag_id, run_id)["state"] in ("success", "failed")


def test_health_auth_and_errors(stack):
    client, jwt_secret = stack
    health = client.health()
    assert health["metadatabase"]["status"] == "healthy" and health["scheduler"]["status"] == "healthy"
    with AirflowClient(client.base_url, "admin", "wrong") as bad:
        with pytest.raises(AirflowApiError) as err:
            bad.dag("api_toy")
    assert err.value.status == 401 and "/auth/token" in str(err.value)
    import jwt  # PyJWT, Airflow's own

    token = client._login()
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    expired = jwt.encode(claims | {"exp": int(time.time()) - 60}, jwt_secret, algorithm=header["alg"], headers=header)
    for stale in (expired, "not-a-jwt"):  # 401 Token Expired, 403 Invalid JWT token: the client logs in again
        with pytest.raises(AirflowApiError) as err:
            client._request("GET", "/dags/api_toy", auth=False, headers={"Authorization": f"Bearer {stale}"})
        assert err.value.status == (401 if stale is expired else 403)
        client._token = stale
        assert client.dag("api_toy")["dag_id"] == "api_toy"
        assert client._token != stale
    with pytest.raises(AirflowApiError) as err:
        client.dag_run("api_toy", "no-such-run")
    assert err.value.status == 404 and "no-such-run" in str(err.value)


def test_wait_dag_names_import_errors(stack):
    client, _ = stack
    with pytest.raises(TimeoutError, match="toy import error"):
        client.wait_dag("not_a_dag", timeout_s=1)
    with pytest.raises(TimeoutError, match="127.0.0.1:1"):
        AirflowClient("http://127.0.0.1:1", "admin", "x").wait_healthy(0.5)
    with pytest.raises(TimeoutError, match="triggerer"):  # this stack runs none
        client.wait_healthy(0.5, components=("scheduler", "triggerer"))


def test_run_with_approval_xcoms_note_and_log(stack):
    client, _ = stack
    client.unpause("api_toy")
    assert client.dag("api_toy")["is_paused"] is False
    t0 = time.monotonic()
    run_id = client.trigger("api_toy", "2026-01-02", conf={}, run_id="api-test-1")
    assert run_id == "api-test-1"
    assert client.trigger("api_toy", "2026-01-02", run_id="api-test-1") == run_id  # same id: idempotent
    assert client.trigger("api_toy", "2026-01-02") == run_id  # same logical date: the existing run
    run = client.dag_run("api_toy", run_id)
    assert run["logical_date"].startswith("2026-01-02T00:00:00")

    _wait_for("approve awaiting input", _awaiting(client, "api_toy", run_id), 90)
    waited = time.monotonic() - t0
    pending = [p for p in client.pending_approvals("api_toy") if p["task_instance"]["dag_run_id"] == run_id]
    assert len(pending) == 1
    assert pending[0]["subject"] == "Approve 2026-01-02"  # rendered
    assert pending[0]["options"] == ["Approve", "Reject"] and pending[0]["defaults"] == ["Reject"]
    assert pending[0]["body"] == "**verdict** table"
    assert any(p["task_instance"]["dag_run_id"] == run_id for p in client.pending_approvals())

    answer = client.respond("api_toy", run_id, "approve", ["Approve"], {"reason": "looks fine"})
    assert answer["chosen_options"] == ["Approve"] and answer["responded_by"]["name"] == "admin"
    assert answer["params_input"] == {"reason": "looks fine"}
    with pytest.raises(AirflowApiError) as err:
        client.respond("api_toy", run_id, "approve", ["Reject"])
    assert err.value.status == 409 and "already" in str(err.value)
    assert not [p for p in client.pending_approvals("api_toy") if p["task_instance"]["dag_run_id"] == run_id]

    _wait_for("the run to finish", _finished(client, "api_toy", run_id), 90)
    result = run_result(client, "api_toy", run_id, "2026-01-02")
    print(f"trigger -> awaiting input {waited:.1f}s, whole run {time.monotonic() - t0:.1f}s")
    assert result.ok, (result.task_states, _failure_logs(client, "api_toy", run_id))
    assert result.task_states == {"produce": "success", "approve": "success", "after": "success"}
    assert result.xcoms["produce"] == ["approve"]
    assert result.xcoms["produce.extra"] == {"a": [1, 2.5], "s": "x", "none": None}
    assert result.xcoms["produce.digits"] == "123"
    assert result.xcoms["after"] == "after ran"
    assert result.xcoms["approve"]["chosen_options"] == ["Approve"]
    assert result.xcoms["approve"]["params_input"] == {"reason": "looks fine"}
    assert result.xcoms["approve"]["responded_by_user"]["name"] == "admin"

    events = client.asset_events("api_toy", run_id)
    assert [(e["name"], e["source_task_id"], e["extra"]) for e in events] == [
        ("toy_asset", "produce", {"verdict": "held", "min_mean_cosine": 0.25})]

    client.set_note("api_toy", run_id, "verdict: **held**, approved by admin")
    assert client.dag_run("api_toy", run_id)["note"] == "verdict: **held**, approved by admin"
    tis = client.task_instances("api_toy", run_id)
    assert tis["produce"]["try_number"] == 1 and tis["produce"]["end_date"]
    assert "PRODUCE-MARKER" in client.task_log("api_toy", run_id, "produce", tis["produce"]["try_number"])


def test_unanswered_approval_times_out_into_the_default(stack):
    client, _ = stack
    client.wait_dag("api_toy_timeout", 60)
    client.unpause("api_toy_timeout")
    run_id = client.trigger("api_toy_timeout", "2026-01-03")
    t0 = time.monotonic()
    _wait_for("the run to finish", _finished(client, "api_toy_timeout", run_id), 120)
    print(f"timeout run finished in {time.monotonic() - t0:.1f}s")
    result = run_result(client, "api_toy_timeout", run_id, "2026-01-03")
    assert result.ok, (result.task_states, _failure_logs(client, "api_toy_timeout", run_id))
    assert result.task_states == {"produce": "success", "approve": "success", "after": "skipped"}
    assert "approve" not in result.xcoms  # a rejection skips downstream by raising: no return value
    answer = client.approval("api_toy_timeout", run_id, "approve")
    assert answer["response_received"] and answer["chosen_options"] == ["Reject"]
    assert answer["responded_by_user"] is None  # the scheduler's timeout sweep applied the defaults
