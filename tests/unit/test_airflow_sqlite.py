"""Every Airflow process on a SQLite metadata DB waits for another's write lock (sum_pipeline/airflow_sqlite.py):
CI once lost a deployed-stack run to the API's 500 "Database error" while `airflow backfill create` and the
scheduler wrote the same file. Checked in Airflow's own engine, in a process of its own (Airflow reads its
configuration once, at import)."""

from __future__ import annotations

import subprocess
import sys

from sum_pipeline import airflow_env, airflow_sqlite

PROBE = """
from airflow import settings
settings.configure_orm()
with settings.engine.connect() as conn:
    print(conn.exec_driver_sql("PRAGMA busy_timeout").scalar())
"""


def test_airflow_engine_on_sqlite_waits_for_the_busy_timeout(tmp_path):
    env = {"PATH": "/usr/bin:/bin", **airflow_env.environment(tmp_path / "airflow")}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    # pysqlite's default is 5 s; the stack's processes wait BUSY_TIMEOUT_S.
    assert int(done.stdout.split()[-1]) == airflow_sqlite.BUSY_TIMEOUT_S * 1000


def test_another_metadata_db_gets_no_sqlite_arguments_even_inside_a_sqlite_environment(tmp_path):
    url = "postgresql+psycopg2://sum@127.0.0.1:5432/airflow"
    sqlite_env = airflow_env.environment(tmp_path)
    env = sqlite_env | airflow_env.environment(tmp_path, url)  # as a stack's env over a test process's
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == url
    for key in airflow_env.connect_args(url):
        module, name = env[key].rsplit(".", 1)
        assert getattr(sys.modules[module], name) == {}
        assert getattr(sys.modules[module], sqlite_env[key].rsplit(".", 1)[1])["timeout"] == airflow_sqlite.BUSY_TIMEOUT_S
