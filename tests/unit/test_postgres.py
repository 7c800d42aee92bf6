"""The PostgreSQL profile's checks that need no server (the server itself: tests/integration/test_postgres_profile.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

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


# RFC 7677 section 3's exchange (user "user", password "pencil"): the server checks a client's proof against the
# StoredKey and answers with a signature made from the ServerKey; both keys come from the verifier.
RFC7677_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC7677_AUTH_MESSAGE = (
    "n=user,r=rOprNGfwEbeRWgbNEkqO,"
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0").encode()
RFC7677_CLIENT_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC7677_SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_the_scram_verifier_authenticates_rfc_7677s_exchange():
    verifier = postgres.scram_verifier("pencil", base64.b64decode(RFC7677_SALT), 4096)
    scheme, iterations_salt, keys = verifier.split("$")
    assert (scheme, iterations_salt) == ("SCRAM-SHA-256", f"4096:{RFC7677_SALT}")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    client_signature = hmac.digest(stored_key, RFC7677_AUTH_MESSAGE, "sha256")
    client_key = bytes(a ^ b for a, b in zip(base64.b64decode(RFC7677_CLIENT_PROOF), client_signature))
    assert hashlib.sha256(client_key).digest() == stored_key  # the server accepts the client's proof
    assert base64.b64encode(hmac.digest(server_key, RFC7677_AUTH_MESSAGE, "sha256")).decode() == \
        RFC7677_SERVER_SIGNATURE  # and proves itself to the client


def test_each_verifier_has_a_fresh_salt_and_no_password_in_it():
    first, second = postgres.scram_verifier("pencil"), postgres.scram_verifier("pencil")
    assert re.fullmatch(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{44}", first)
    assert first != second and "pencil" not in first


def test_a_non_ascii_password_file_is_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    postgres.password_file(ws).parent.mkdir(parents=True)
    postgres.password_file(ws).write_text("pässword\n")
    postgres.password_file(ws).chmod(0o600)
    with pytest.raises(postgres.PostgresError, match="non-ASCII.*write printable ASCII"):
        postgres._password(ws)


def _rule(line, kind, database, user, address=None, netmask=None, method="scram-sha-256"):
    return {"line_number": line, "type": kind, "database": [database], "user_name": [user], "address": address,
            "netmask": netmask, "auth_method": method, "options": None, "error": None}


V4, V6 = "255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
# Debian's default pg_hba.conf, as pg_hba_file_rules shows it.
DEBIAN = [_rule(90, "local", "all", "postgres", method="peer"), _rule(95, "local", "all", "all", method="peer"),
          _rule(97, "host", "all", "all", "127.0.0.1", V4), _rule(99, "host", "all", "all", "::1", V6),
          _rule(102, "local", "replication", "all", method="peer"),
          _rule(103, "host", "replication", "all", "127.0.0.1", V4)]
HBA = "/etc/postgresql/15/main/pg_hba.conf"


def _cfg(host="127.0.0.1"):
    return load_params().airflow.postgresql.model_copy(update={"host": host})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_debians_default_pg_hba_passes(host):
    postgres.check_hba(DEBIAN, _cfg(host), HBA)


@pytest.mark.parametrize("method", ["trust", "password", "md5"])
@pytest.mark.parametrize("kind", ["host", "hostssl", "hostnossl"])
def test_a_weak_line_before_the_scram_one_is_refused_naming_it_and_the_fix(method, kind):
    cfg = _cfg()
    rules = [*DEBIAN[:2], _rule(91, kind, cfg.database, cfg.user, "127.0.0.0", "255.0.0.0", method), *DEBIAN[2:]]
    with pytest.raises(postgres.PostgresError) as err:
        postgres.check_hba(rules, cfg, HBA)
    message = str(err.value)
    assert f"{HBA} line 91 ({kind} {cfg.database} {cfg.user} 127.0.0.0 255.0.0.0 {method})" in message
    assert f"put 'host {cfg.database} {cfg.user} 127.0.0.1/32 scram-sha-256' above it in {HBA}" in message
    assert "pg_reload_conf()" in message


def test_lines_for_other_roles_databases_addresses_or_sockets_do_not_matter():
    cfg = _cfg()
    rules = [_rule(1, "local", "all", "all", method="trust"),
             _rule(2, "host", "other_db", "all", "127.0.0.1", V4, "trust"),
             _rule(3, "host", "all", "other_role", "127.0.0.1", V4, "trust"),
             _rule(4, "host", "all", "all", "10.0.0.0", "255.0.0.0", "trust"),
             _rule(5, "host", "replication", "all", "127.0.0.1", V4, "trust"), *DEBIAN]
    postgres.check_hba(rules, cfg, HBA)


def test_a_weak_line_after_the_first_match_is_never_reached():
    postgres.check_hba([*DEBIAN, _rule(200, "host", "all", "all", "127.0.0.1", V4, "trust")], _cfg(), HBA)


def test_localhost_checks_both_loopback_addresses():
    rules = [DEBIAN[2], _rule(98, "host", "all", "all", "::1", V6, "md5")]
    postgres.check_hba(rules, _cfg("127.0.0.1"), HBA)
    with pytest.raises(postgres.PostgresError, match="line 98 .* with 'md5'"):
        postgres.check_hba(rules, _cfg("localhost"), HBA)


def test_another_method_on_the_matching_line_or_no_line_at_all_is_refused():
    with pytest.raises(postgres.PostgresError, match="line 97 .* with 'ident', not scram-sha-256"):
        postgres.check_hba([_rule(97, "host", "all", "all", "127.0.0.1", V4, "ident")], _cfg(), HBA)
    with pytest.raises(postgres.PostgresError, match="no line of .*pg_hba.conf lets role"):
        postgres.check_hba(DEBIAN[:2], _cfg(), HBA)
    broken = {**DEBIAN[2], "type": None, "error": "invalid authentication method \"trusted\""}
    with pytest.raises(postgres.PostgresError, match="line 97 is invalid"):
        postgres.check_hba([broken, *DEBIAN], _cfg(), HBA)


def test_psql_errors_never_carry_the_verifier():
    """psql's quote of a failing statement (``LINE 1: ...``, maybe cut) is dropped, the verifier scrubbed elsewhere."""
    verifier = postgres.scram_verifier("pencil")
    output = (f"psql:<stdin>:2: ERROR:  syntax error at or near \"garbage\"\n"
              f"LINE 1: ...ROLE x PASSWORD '{verifier[:40]}\n"
              f"DETAIL: the value was '{verifier}'\n")
    with pytest.raises(postgres.PostgresError) as err:
        postgres._run(["sh", "-c", "cat >&2; exit 3"], "psql", stdin=output, scrub=(verifier,))
    message = str(err.value)
    assert verifier[:40] not in message and verifier[14:] not in message
    assert 'syntax error at or near "garbage"' in message and "the value was '***'" in message
