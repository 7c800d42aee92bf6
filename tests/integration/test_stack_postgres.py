"""The deployed stack on the PostgreSQL profile (``airflow.metadata_db: postgresql``): `sumctl up` on Debian's
real server (a test role and database, dropped afterwards), one date through the stack's scheduler over the
REST API, the run's task states in PostgreSQL, the snapshot served after the task processes exited, and
`sumctl down` leaving no process. The SQLite profile's stack is tests/integration/test_deployed_stack.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg2
import pytest
import yaml
from sqlalchemy.engine import make_url

from serving.rollout import served_snapshot_id
from sum_pipeline import driver
from sum_pipeline.airflow_api import AirflowClient
from sum_pipeline.airflow_env import DAG_ID
from sum_pipeline.postgres import drop_database
from sum_pipeline.stack import Stack
from sum_platform.config import load_params
from sum_platform.workspace import Workspace

pytestmark = pytest.mark.slow

DAY1 = "2026-01-01"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUMCTL = str(Path(sys.executable).with_name("sumctl"))
PORT_OFFSET = 10  # the SQLite stack of test_deployed_stack.py uses SUM_TEST_PORT + 1..4


@pytest.fixture(scope="module")
def pg_params(session_dir: Path):
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    port = int(os.environ["SUM_TEST_PORT"]) + PORT_OFFSET
    name = f"sum_airflow_stack_test_{os.getpid()}"
    raw["paths"] = {"workspace": "pg-stack-workspace", "dvc_remote": "pg-stack-dvc-remote"}
    raw["serving"].update({"port": port + 1, "ray_address": "stack"})
    raw["airflow"].update({"port": port + 2, "end_date": DAY1, "catchup": False, "dag_poll_seconds": 1,
                           "metadata_db": "postgresql"})
    raw["airflow"]["postgresql"].update(database=name, user=name)
    raw["ray"].update({"gcs_port": port + 3, "dashboard_port": port + 4})
    path = session_dir / "pg-stack-params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    old = {k: os.environ.get(k) for k in ("SUM_PARAMS", "SUM_WORKSPACE")}
    os.environ["SUM_PARAMS"] = str(path)
    os.environ.pop("SUM_WORKSPACE", None)
    params = load_params()
    yield params
    drop_database(params, Workspace(params.workspace), drop_role=True)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _sumctl(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([SUMCTL, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    assert done.returncode == 0, f"sumctl {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def day(pg_params):
    """`sumctl up` on the PostgreSQL profile, DAY1 through the scheduler, then `sumctl down`."""
    _sumctl("up")
    s = Stack(pg_params, Workspace(pg_params.workspace))
    out: dict = {"stack": s, "url": s.database_url()}
    try:
        with AirflowClient(s.airflow_url, "admin", s.airflow_password(), timeout=120) as client:
            [out["run"]] = driver.drive(client, [DAY1], {}, poll_s=1)
        out["served"] = served_snapshot_id(pg_params)
        out["pids"] = [p.pid for p in s._processes(s._states())]
    finally:
        out["down"] = subprocess.run([SUMCTL, "down"], capture_output=True, text=True, env=os.environ.copy(),
                                     timeout=300)
    return out


def test_the_stack_runs_a_date_on_postgresql_and_serves_it(day, pg_params):
    r = day["run"]
    assert r.ok, r.task_states
    assert r.xcoms["shift_gate.verdict"]["verdict"] == "blessed"
    assert day["served"] == f"sum-{DAY1}"  # served after every task process of the run exited
    # The metadata went to PostgreSQL: the run's task instances are rows there, and no SQLite file was made.
    url = make_url(day["url"])
    assert url.get_backend_name() == "postgresql" and url.host == "127.0.0.1"
    with psycopg2.connect(host=url.host, port=url.port, dbname=url.database, user=url.username,
                          password=url.password, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute("SELECT task_id, state FROM task_instance WHERE dag_id = %s AND run_id = %s", (DAG_ID, r.run_id))
        states = dict(cur.fetchall())
    conn.close()
    assert states == r.task_states and states["verify_serving"] == "success"
    assert not (Workspace(pg_params.workspace).airflow_home / "airflow.db").exists()


def test_down_leaves_no_process_of_the_postgresql_stack(day):
    assert day["down"].returncode == 0, day["down"].stdout[-2000:]
    assert len(day["pids"]) >= 5
    alive = [pid for pid in day["pids"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []
