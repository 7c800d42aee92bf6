"""A project-local Airflow: SQLite metadata DB under the workspace, DAGs from ``dags/``.

Airflow reads its configuration when first imported, so :func:`configure` must run before anything
imports ``airflow`` (``sumctl`` and the tests call it first).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sum_platform.config import PROJECT_ROOT

log = logging.getLogger(__name__)

DAG_ID = "sum_daily"


def environment(home: Path, sql_alchemy_conn: str | None = None) -> dict[str, str]:
    """The environment variables of a project-local Airflow whose home is ``home``.

    ``sql_alchemy_conn``: the metadata DB (default: SQLite in ``home``); on SQLite every process waits for
    another's write lock (:mod:`sum_pipeline.airflow_sqlite`).
    """
    url = sql_alchemy_conn or f"sqlite:///{home / 'airflow.db'}"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
    } | connect_args(url)


def connect_args(url: str) -> dict[str, str]:
    """``[database] sql_alchemy_connect_args`` (import paths Airflow resolves) for the metadata DB at ``url``:
    SQLite's busy timeout, or none (psycopg2 knows no ``timeout``). Always set, so that an environment built on
    another's (a test process's, the stack's parent shell) never inherits the wrong one."""
    module = "sum_pipeline.airflow_sqlite"
    sqlite = url.startswith("sqlite")
    return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{module}.{'CONNECT_ARGS' if sqlite else 'NONE'}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC":
                f"{module}.{'CONNECT_ARGS_ASYNC' if sqlite else 'NONE'}"}


#: The simple auth manager's class path (Airflow 3's default auth manager).
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


def stack_environment(home: Path, *, dags_folder: Path, host: str, port: int, jwt_secret: str, api_secret_key: str,
                      fernet_key: str, users: str = "admin:admin", parallelism: int = 2,
                      sql_alchemy_conn: str | None = None,
                      execution_api_timeout_s: float = 30) -> dict[str, str]:
    """The environment every process of a multi-process Airflow (api-server, scheduler, dag-processor,
    triggerer, and the task processes the LocalExecutor forks) must share.

    The secrets must be the same in every process: ``jwt_secret`` signs and checks the API tokens and the
    execution API's task tokens (the scheduler signs, the api-server checks), ``api_secret_key`` the log
    server's tokens and ``fernet_key`` the encrypted connections and variables. Airflow generates them
    into ``airflow.cfg`` when it first writes that file, which processes starting together may race on,
    so they are set here instead.
    ``execution_api_timeout_s`` is how long a task process waits for the api-server's execution API
    (Airflow's default, 5 s, fails tasks at start-up - "finished with state failed, but the task
    instance's state attribute is queued" - when the machine is busy).
    """
    env = environment(home, sql_alchemy_conn) | {
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "simple_auth_manager_passwords.json.generated"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{host}:{port}/execution/",
        "AIRFLOW__CORE__FERNET_KEY": fernet_key,
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://{host}:{port}",
        "AIRFLOW__API__SECRET_KEY": api_secret_key,
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": str(execution_api_timeout_s),
    }
    return env


def configure(home: Path) -> None:
    """Points this process's Airflow at ``home`` (e.g. ``Workspace.airflow_home``) and migrates its DB.

    Raises:
        RuntimeError: Airflow was already imported with another home.
    """
    env = environment(home)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != env["AIRFLOW_HOME"]:
        raise RuntimeError("airflow was imported before sum_pipeline.airflow_env.configure()")
    os.environ.update(env)
    log.info("the Airflow metadata DB is in %s", home)
    migrate(home, os.environ.copy())


def migrate(home: Path, env: dict[str, str]) -> None:
    """Creates or upgrades the metadata DB that ``env`` points at (once per DB URL; ``airflow db migrate``).

    Raises:
        RuntimeError: The migration failed; the message holds Airflow's error output.
    """
    url = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    home.mkdir(parents=True, exist_ok=True)
    marker = home / f".migrated-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    if marker.exists():
        return
    airflow_bin = Path(sys.executable).with_name("airflow")
    # umask 077: a SQLite metadata DB (XComs, run notes, the tasks' logs' index) only for its owner.
    done = subprocess.run([str(airflow_bin), "db", "migrate"], env=env, capture_output=True, text=True, umask=0o077)
    if done.returncode != 0:
        raise RuntimeError(f"`airflow db migrate` failed for {url.split('@')[-1]}:\n{done.stderr[-3000:]}")
    marker.touch()


@dataclass
class DagRunResult:
    ds: str
    state: str
    task_states: dict[str, str] = field(default_factory=dict)
    xcoms: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    task_instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # REST API's task instance records

    @property
    def ok(self) -> bool:
        return self.state == "success"

    def failed_tasks(self) -> list[str]:
        return [t for t, s in self.task_states.items() if s in ("failed", "upstream_failed")]


def load_dag(dag_id: str = DAG_ID):
    """Parses ``dags/`` and returns a DAG, the daily one by default (import errors are raised, not swallowed)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(dag_id)


def run_date(ds: str, conf: dict[str, Any] | None = None, dag_id: str = DAG_ID) -> DagRunResult:
    """Runs the real DAG for one logical date with ``dag.test()`` (tasks in this process).

    ``dag.test()`` never resolves a human-in-the-loop task (Airflow 3.3 keeps the run alive until a
    response arrives through an api-server sharing the DB), so the run is given ``await_approval=False``
    unless ``conf`` says otherwise: a held candidate stays held, as with no approver.

    Args:
        ds: The logical date, ``YYYY-MM-DD``.
        conf: DAG run conf (e.g. ``{"candidate_fault": "reinit"}``).

    Returns:
        The run's state, each task's state and the XCom return values.
    """
    dag = load_dag(dag_id)
    if dag_id != DAG_ID:  # the downstream DAG: its day comes in the conf (as an operator's manual run)
        conf = {"ds": ds} | (conf or {})
    # dag.test() runs the date it is given: the schedule's end date (params airflow.end_date) bounds what the
    # scheduler runs, not a debugging run (with it, tasks of later dates would not run at all).
    dag.end_date = None
    for task in dag.tasks:
        task.end_date = None
    logical_date = datetime.fromisoformat(ds).replace(tzinfo=timezone.utc)
    defaults = {"await_approval": False} if dag_id == DAG_ID else {}
    dr = dag.test(logical_date=logical_date, run_conf=defaults | (conf or {}))
    result = DagRunResult(ds=ds, state=str(getattr(dr.state, "value", dr.state)), run_id=dr.run_id)
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        for ti in dr.get_task_instances(session=session):
            result.task_states[ti.task_id] = str(getattr(ti.state, "value", ti.state))
            # The REST API's fields of a task instance, so reports of both modes read alike.
            times = {"queued_when": ti.queued_dttm, "start_date": ti.start_date, "end_date": ti.end_date}
            result.task_instances[ti.task_id] = {
                "task_id": ti.task_id, "state": result.task_states[ti.task_id], "try_number": ti.try_number,
                "duration": ti.duration, **{k: v.isoformat() if v else None for k, v in times.items()}}
        rows = session.query(XComModel).filter(XComModel.dag_id == dag.dag_id, XComModel.run_id == dr.run_id)
        for row in rows:
            key = row.task_id if row.key == "return_value" else f"{row.task_id}.{row.key}"
            result.xcoms[key] = XComModel.deserialize_value(row)
    return result
