"""The PostgreSQL profile's checks that need no server (the server itself: tests/integration/test_postgres_profile.py)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from sum_pipeline import postgres
from sum_platform.config import load_params
from sum_platform.workspace import Workspace


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1", "::1", "localhost, 127.0.0.1", "127.0.0.2"])
def test_loopback_listeners_pass(value):
    postgres.check_listen_addresses(value)


@pytest.mark.parametrize("value", ["*", "0.0.0.0", "::", "10.1.2.3", "localhost,192.168.0.5", "db.example.org", ""])
def test_a_listener_beyond_loopback_or_none_fails(value):
    with pytest.raises(postgres.PostgresError, match="listen_addresses"):
        postgres.check_listen_addresses(value)


def test_the_sqlite_profile_touches_nothing(tmp_path):
    params = load_params()
    assert params.airflow.metadata_db == "sqlite"  # the project's default
    ws = Workspace(tmp_path / "ws")
    assert postgres.database_url(params, ws) == f"sqlite:///{tmp_path / 'ws' / 'airflow' / 'airflow.db'}"
    assert not (tmp_path / "ws").exists()


def test_the_url_quotes_what_it_must_and_redacts_the_password():
    cfg = load_params().airflow.postgresql
    url = postgres.url(cfg, "a/b@c:d%")
    parsed = make_url(url)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        cfg.user, "a/b@c:d%", cfg.host, cfg.port, cfg.database)
    assert postgres.redacted(url) == f"postgresql+psycopg2://{cfg.user}:***@{cfg.host}:{cfg.port}/{cfg.database}"


def test_a_remote_host_is_refused_before_anything_runs(tmp_path):
    params = load_params()
    airflow = params.airflow.model_copy(update={
        "metadata_db": "postgresql", "postgresql": params.airflow.postgresql.model_copy(update={"host": "10.0.0.7"})})
    with pytest.raises(postgres.PostgresError, match="manages the local server only"):
        postgres.ensure_database(params.model_copy(update={"airflow": airflow}), Workspace(tmp_path))
    assert not tmp_path.joinpath("stack").exists()


def test_a_machine_without_postgresql_is_told_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(postgres, "POSTGRES_LIB", tmp_path / "no-postgresql")
    params = load_params()
    with pytest.raises(postgres.PostgresError, match="scripts/install_system_packages.sh"):
        postgres.ensure_database(params, Workspace(tmp_path / "ws"))
