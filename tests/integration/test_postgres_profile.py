"""The PostgreSQL profile: Debian's real server, a real role and database, Airflow's real migrations on it.

Each test gets its own role and database (``sum_airflow_test_<pid>_<n>``) and drops both afterwards, so a
developer's ``sum_airflow`` database is never touched.
"""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
import yaml
from sqlalchemy.engine import make_url

from sum_pipeline import airflow_env, postgres
from sum_pipeline.postgres import PostgresError, database_url, drop_database, ensure_database, password_file
from sum_platform.config import load_params, params_path
from sum_platform.workspace import Workspace

pytestmark = pytest.mark.slow

_names = itertools.count()


def _pg_params(tmp_path: Path, name: str, user: str | None = None):
    """A copy of the session's params file with the PostgreSQL profile on a test role and database."""
    raw = yaml.safe_load(params_path().read_text())
    raw["airflow"]["metadata_db"] = "postgresql"
    raw["airflow"]["postgresql"].update(database=name, user=user or name)
    path = tmp_path / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


@pytest.fixture
def profile(tmp_path):
    """``(params, ws)`` of a test role + database, both dropped afterwards."""
    name = f"sum_airflow_test_{os.getpid()}_{next(_names)}"
    params, ws = _pg_params(tmp_path, name), Workspace(tmp_path / "workspace")
    yield params, ws
    drop_database(params, ws, drop_role=True)
    assert _admin(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "0"


def _admin(sql: str) -> str:
    """One query as the postgres OS user (peer auth), as an operator would run it (test-made names only)."""
    return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-d", "postgres", "-c", sql],
                          check=True, capture_output=True, text=True, cwd="/").stdout.strip()


def _connect(url: str):
    u = make_url(url)
    return psycopg2.connect(host=u.host, port=u.port, dbname=u.database, user=u.username, password=u.password,
                            connect_timeout=10)


def test_airflow_migrates_its_metadata_db_on_the_profile(profile, tmp_path):
    params, ws = profile
    cfg = params.airflow.postgresql
    url = ensure_database(params, ws)
    hash_after_first = _admin(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{cfg.user}'")
    assert hash_after_first.startswith(f"SCRAM-SHA-256${postgres.SCRAM_ITERATIONS}:")  # our verifier, kept as is

    # Idempotent: the same URL, the password kept (not even re-hashed), the file private.
    assert ensure_database(params, ws) == url
    assert database_url(params, ws) == url
    assert _admin(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{cfg.user}'") == hash_after_first
    secret = password_file(ws)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert make_url(url).password == secret.read_text().strip()
    assert url.startswith(f"postgresql+psycopg2://{cfg.user}:")
    assert url.endswith(f"@127.0.0.1:{cfg.port}/{cfg.database}")

    # Secure by default: loopback listener, a non-superuser owner, no CONNECT for PUBLIC.
    assert _admin("SHOW listen_addresses") in ("localhost", "127.0.0.1")
    assert _admin(f"SELECT rolsuper FROM pg_roles WHERE rolname = '{cfg.user}'") == "f"
    assert _admin(f"SELECT has_database_privilege('public', '{cfg.database}', 'CONNECT')") == "f"

    home = tmp_path / "airflow"
    env = {**os.environ, **airflow_env.environment(home, url), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    airflow_bin = Path(sys.executable).with_name("airflow")
    t0 = time.monotonic()
    proc = subprocess.run([str(airflow_bin), "db", "migrate"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"airflow db migrate on PostgreSQL: {seconds:.1f} s")
    assert not (home / "airflow.db").exists()  # the migration went to PostgreSQL, not to a stray SQLite file

    # Airflow 3's async engine (API server, execution API) derives postgresql+asyncpg:// from the URL.
    probe = ("import asyncio, sqlalchemy\n"
             "from airflow import settings\n"
             "from airflow.utils.session import create_session_async\n"
             "async def main():\n"
             "    async with create_session_async() as s:\n"
             "        print('PROBE', settings.async_engine.url.drivername, (await s.execute(sqlalchemy.text(\n"
             "            'SELECT count(*) FROM dag_run'))).scalar())\n"
             "    await settings.async_engine.dispose()\n"
             "asyncio.run(main())\n")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probed = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert probed == [["postgresql+asyncpg", "0"]], proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:]

    with _connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'dag_run'")
        assert cur.fetchone() == (cfg.user,)
        cur.execute("SELECT count(*) FROM alembic_version")
        assert cur.fetchone() == (1,)
    conn.close()

    drop_database(params, ws)
    assert _admin(f"SELECT count(*) FROM pg_database WHERE datname = '{cfg.database}'") == "0"


def test_a_changed_password_file_is_reapplied(profile):
    params, ws = profile
    old_url = ensure_database(params, ws)
    # Any printable password, quotes and backslashes included, reaches the role through psql's quoting.
    new_password = "it's a \\ new 'one' :pw %41 $HOME"
    password_file(ws).write_text(new_password + "\n")
    password_file(ws).chmod(0o644)

    new_url = ensure_database(params, ws)
    assert new_url != old_url and make_url(new_url).password == new_password
    assert stat.S_IMODE(password_file(ws).stat().st_mode) == 0o600  # tightened back
    with _connect(new_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == (params.airflow.postgresql.user,)
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        _connect(old_url)


def test_a_database_owned_by_another_role_is_refused(profile, tmp_path):
    params, ws = profile
    ensure_database(params, ws)
    cfg = params.airflow.postgresql
    intruder = _pg_params(tmp_path, cfg.database, user=f"{cfg.user}_other")
    with pytest.raises(PostgresError, match=f"owned by '{cfg.user}'"):
        ensure_database(intruder, Workspace(tmp_path / "other"))
    assert _admin(f"SELECT count(*) FROM pg_roles WHERE rolname = '{cfg.user}_other'") == "0"  # nothing changed


def test_a_weak_pg_hba_line_for_the_role_is_refused_naming_it(profile):
    """A ``trust`` line above Debian's scram-sha-256 ones (pg_hba_file_rules reads the file, no reload needed)."""
    params, ws = profile
    cfg = params.airflow.postgresql
    hba = Path(_admin("SHOW hba_file"))
    original = hba.read_bytes()
    try:
        hba.write_bytes(f"host {cfg.database} {cfg.user} 127.0.0.1/32 trust\n".encode() + original)
        with pytest.raises(PostgresError) as err:
            ensure_database(params, ws)
    finally:
        hba.write_bytes(original)
    assert f"{hba} line 1 (host {cfg.database} {cfg.user} 127.0.0.1 255.255.255.255 trust)" in str(err.value)
    assert f"put 'host {cfg.database} {cfg.user} 127.0.0.1/32 scram-sha-256' above it" in str(err.value)
    assert _admin(f"SELECT count(*) FROM pg_roles WHERE rolname = '{cfg.user}'") == "0"  # refused before creating
    ensure_database(params, ws)  # the file restored, the profile comes up


def test_a_failing_statement_never_shows_the_verifier(profile):
    """The server quotes a failing statement (``LINE 1: ...``): PostgresError drops it and scrubs the verifier."""
    params, _ = profile
    cfg = params.airflow.postgresql
    cluster = postgres._running_cluster(cfg.port)
    verifier = postgres.scram_verifier("pencil")
    with pytest.raises(PostgresError) as err:
        postgres._psql(cluster, "SELECT :'verifier' garbage here;", cfg, verifier=verifier)
    message = str(err.value)
    assert "syntax error" in message
    assert not any(part in message for part in verifier.split("$")[1:]), message
