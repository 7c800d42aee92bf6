"""The PostgreSQL profile of the deployed stack's Airflow metadata DB (``airflow.metadata_db: postgresql``).

:func:`ensure_database` makes Debian's PostgreSQL server (installed by ``scripts/install_system_packages.sh``)
serve Airflow on ``airflow.postgresql.host:port``: the cluster on that port is started when it is down, its
listener is checked to be loopback only, and a login role and a database owned by it are created. The
role's password is generated once (``secrets.token_urlsafe``) into ``Workspace.stack_dir / "postgres_password"``
(mode 0600); a changed file is re-applied with ``ALTER ROLE``. Running it again changes nothing.

Admin SQL runs as the cluster's OS owner (``postgres``) through ``runuser ... psql`` (peer authentication on
the Unix socket). Names reach SQL only as psql variables (``:"name"`` for identifiers, ``:'name'`` for literals,
quoted by psql). The password never reaches SQL text: the role gets a SCRAM-SHA-256 verifier computed here
(:func:`scram_verifier`), which travels on psql's stdin, never on a command line, and is scrubbed from any
error message. Before the role is created, the cluster's ``pg_hba`` rules (``pg_hba_file_rules``) must
authenticate the role's TCP connections from loopback with ``scram-sha-256`` (:func:`check_hba`): a
``trust``/``password``/``md5`` line is refused, naming the line and the fix.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import psycopg2

from sum_platform.config import Params, PostgresConfig
from sum_platform.files import exclusive_lock, owner_only_secret
from sum_platform.workspace import Workspace

log = logging.getLogger(__name__)

INSTALL_HINT = "run `bash scripts/install_system_packages.sh` as root"
PASSWORD_FILE = "postgres_password"
POSTGRES_LIB = Path("/usr/lib/postgresql")
SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
HBA_METHOD = "scram-sha-256"
WEAK_HBA_METHODS = ("trust", "password", "md5")  # no password / cleartext / a replayable-hash protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PostgresError(RuntimeError):
    """The PostgreSQL profile cannot be made available; the message says what failed and how to fix it."""


@dataclass(frozen=True)
class Cluster:
    """One Debian PostgreSQL cluster (a line of ``pg_lsclusters``)."""

    version: str
    name: str
    port: int
    running: bool
    owner: str
    data_dir: str
    log_file: str

    @property
    def id(self) -> str:
        return f"{self.version}/{self.name}"


def password_file(ws: Workspace) -> Path:
    """Where the Airflow role's password lives (mode 0600)."""
    return ws.stack_dir / PASSWORD_FILE


def database_url(params: Params, ws: Workspace) -> str:
    """The Airflow metadata DB's SQLAlchemy URL for the configured profile.

    ``postgresql``: :func:`ensure_database` (the server started, role and database in place); ``sqlite``:
    ``airflow.db`` in ``ws.airflow_home`` (nothing is touched).
    """
    if params.airflow.metadata_db == "postgresql":
        return ensure_database(params, ws)
    return f"sqlite:///{ws.airflow_home / 'airflow.db'}"


def ensure_database(params: Params, ws: Workspace) -> str:
    """Makes the local PostgreSQL server serve Airflow's metadata DB; returns its SQLAlchemy URL.

    Idempotent: a second call finds the server running, the role and the database in place and the stored
    password accepted, and changes nothing.

    Returns:
        ``postgresql+psycopg2://user:password@host:port/database`` (it holds the password: do not log it,
        see :func:`redacted`).

    Raises:
        PostgresError: PostgreSQL is not installed, its cluster cannot start, it listens beyond loopback,
            the database belongs to another role, or the role cannot log in.
    """
    cfg = params.airflow.postgresql
    _require_loopback_host(cfg.host)
    with _locked(ws):
        password = _password(ws)
        cluster = _running_cluster(cfg.port)
        state = _state(cluster, cfg)
        check_listen_addresses(state["listen_addresses"], cluster)
        check_hba(state["hba_rules"] or [], cfg, state["hba_file"])
        if state["db_owner"] not in (None, cfg.user):  # refused before anything changes
            raise PostgresError(
                f"PostgreSQL database {cfg.database!r} exists and is owned by {state['db_owner']!r}, not by "
                f"{cfg.user!r}: set another airflow.postgresql.database in params.yaml, or hand it over with "
                f"ALTER DATABASE ... OWNER TO (as the postgres user)")
        if state["role_login"] is None:
            log.info("creating the PostgreSQL role %s", cfg.user)
            _psql(cluster, 'CREATE ROLE :"role" LOGIN PASSWORD :\'verifier\';', cfg,
                  verifier=scram_verifier(password))
        elif state["role_login"] is False:
            log.info("letting the PostgreSQL role %s log in", cfg.user)
            _psql(cluster, 'ALTER ROLE :"role" LOGIN;', cfg)
        if state["db_owner"] is None:
            log.info("creating the PostgreSQL database %s owned by %s", cfg.database, cfg.user)
            _psql(cluster, 'CREATE DATABASE :"db" OWNER :"role" TEMPLATE template0 ENCODING \'UTF8\';\n'
                           'REVOKE ALL ON DATABASE :"db" FROM PUBLIC;', cfg)
        try:
            _check_login(cfg, password)
        except psycopg2.OperationalError:
            # The stored password changed (or the role was made elsewhere): the file is the truth.
            log.info("re-applying the stored password of the PostgreSQL role %s", cfg.user)
            _psql(cluster, 'ALTER ROLE :"role" PASSWORD :\'verifier\';', cfg, verifier=scram_verifier(password))
            try:
                _check_login(cfg, password)
            except psycopg2.OperationalError as exc:
                raise PostgresError(
                    f"role {cfg.user!r} cannot log in to {cfg.database!r} on {cfg.host}:{cfg.port} over TCP "
                    f"even after ALTER ROLE: {str(exc).strip()}; check {_conf_dir(cluster)}/pg_hba.conf allows "
                    f"'host {cfg.database} {cfg.user} 127.0.0.1/32 scram-sha-256'") from exc
    return url(cfg, password)


def drop_database(params: Params, ws: Workspace, drop_role: bool = False) -> None:
    """Drops the profile's database (its open connections closed) and, with ``drop_role``, its role.

    For tests and a fresh start; the password file stays (a later :func:`ensure_database` reuses it).
    """
    cfg = params.airflow.postgresql
    _require_loopback_host(cfg.host)
    with _locked(ws):
        cluster = _running_cluster(cfg.port)
        sql = 'DROP DATABASE IF EXISTS :"db" WITH (FORCE);'
        if drop_role:
            sql += '\nDROP ROLE IF EXISTS :"role";'
        _psql(cluster, sql, cfg)


def url(cfg: PostgresConfig, password: str) -> str:
    """The SQLAlchemy URL of ``cfg`` with ``password`` (user and password percent-quoted)."""
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return (f"postgresql+psycopg2://{quote(cfg.user, safe='')}:{quote(password, safe='')}"
            f"@{host}:{cfg.port}/{quote(cfg.database, safe='')}")


def redacted(db_url: str) -> str:
    """``db_url`` with its password replaced by ``***`` (for logs and messages)."""
    scheme, sep, rest = db_url.partition("://")
    creds, at, location = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return db_url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{location}"


def check_listen_addresses(value: str, cluster: Cluster | None = None) -> None:
    """Raises unless PostgreSQL's ``listen_addresses`` names loopback addresses only (and at least one)."""
    where = (f"{_conf_dir(cluster)}/postgresql.conf (or conf.d/), then `pg_ctlcluster {cluster.version} "
             f"{cluster.name} restart`") if cluster else "postgresql.conf"
    addresses = [a.strip() for a in value.split(",") if a.strip()]
    if not addresses:
        raise PostgresError(f"PostgreSQL listens on no TCP address (listen_addresses = {value!r}), Airflow "
                            f"connects over TCP: set listen_addresses = 'localhost' in {where}")
    exposed = [a for a in addresses if not _is_loopback(a)]
    if exposed:
        raise PostgresError(f"PostgreSQL listens beyond loopback (listen_addresses = {value!r}: {exposed}); the "
                            f"metadata DB must listen on 127.0.0.1 only: set listen_addresses = 'localhost' "
                            f"in {where}")


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802 / RFC 7677, as ``pg_authid`` has it).

    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64): the server recognises the format
    and stores it as is, so the password itself never reaches SQL text, the server's log or an error message.
    PostgreSQL SASLprep-normalises a password before hashing it; SASLprep leaves ASCII unchanged, which is why
    :func:`_password` accepts printable ASCII only.
    """
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def check_hba(rules: list[dict], cfg: PostgresConfig, hba_file: str = "pg_hba.conf") -> None:
    """Raises unless the role's TCP logins from loopback are authenticated with ``scram-sha-256``.

    ``rules`` are the rows of ``pg_hba_file_rules`` in file order (the server takes the first line matching a
    connection). Every ``host*`` line that may match the role connecting to its database from the loopback
    address of ``cfg.host`` (``localhost``: 127.0.0.1 and ::1, each on its own) is checked, up to the first that surely matches: a ``trust``, ``password`` or
    ``md5`` line among them is refused (``trust`` lets any local user in as the role), and the line that
    surely matches must say ``scram-sha-256``. A line the server could not parse is refused too.
    """
    for client in _client_ips(cfg.host):
        _check_hba_from(client, rules, cfg, hba_file)


def _check_hba_from(client: IPAddress, rules: list[dict], cfg: PostgresConfig, hba_file: str) -> None:
    cidr = f"{client}/{client.max_prefixlen}"
    fix = (f"put 'host {cfg.database} {cfg.user} {cidr} {HBA_METHOD}' above it in {hba_file}, then reload "
           f"PostgreSQL (`SELECT pg_reload_conf()` as postgres)")
    for rule in rules:
        where = f"{rule.get('file_name') or hba_file} line {rule.get('line_number')}"
        if rule.get("error"):
            raise PostgresError(f"{where} is invalid ({rule['error']}): fix it (PostgreSQL will not load the "
                                f"file while it has an error)")
        match = _hba_match(rule, cfg, client)
        if match == "no":
            continue
        method = rule.get("auth_method")
        fields = [rule.get("type"), ",".join(rule.get("database") or []), ",".join(rule.get("user_name") or []),
                  rule.get("address"), rule.get("netmask"), method]
        described = f"{where} ({' '.join(f for f in fields if f)})"
        if method in WEAK_HBA_METHODS:
            raise PostgresError(f"{described} lets role {cfg.user!r} log in over TCP with {method!r}, not "
                                f"{HBA_METHOD}: {fix}")
        if match == "sure":
            if method != HBA_METHOD:
                raise PostgresError(f"{described} authenticates role {cfg.user!r} with {method!r}, not "
                                    f"{HBA_METHOD}: {fix}")
            return
    raise PostgresError(f"no line of {hba_file} lets role {cfg.user!r} connect to {cfg.database!r} from "
                        f"{client} over TCP: add 'host {cfg.database} {cfg.user} {cidr} {HBA_METHOD}' and reload "
                        f"PostgreSQL (`SELECT pg_reload_conf()` as postgres)")


def _hba_match(rule: dict, cfg: PostgresConfig, client: IPAddress) -> str:
    """Whether a pg_hba rule matches the role's TCP connection from ``client``: "sure", "maybe" or "no"."""
    kind = rule.get("type") or ""
    if not kind.startswith("host"):
        return "no"  # local (Unix socket) lines: Airflow connects over TCP
    sure = kind == "host"  # hostssl / hostnossl / hostgssenc / hostnogssenc depend on the connection's encryption
    databases = rule.get("database") or []
    if "all" in databases or cfg.database in databases or ("sameuser" in databases and cfg.database == cfg.user):
        pass
    elif "samerole" in databases or "samegroup" in databases or any(d.startswith("@") for d in databases):
        sure = False
    else:
        return "no"
    users = rule.get("user_name") or []
    if "all" in users or cfg.user in users:
        pass
    elif any(u.startswith(("+", "@", "/")) for u in users):  # group membership, a file, a regex
        sure = False
    else:
        return "no"
    address, netmask = rule.get("address"), rule.get("netmask")
    if address in ("all", "samehost", "samenet"):
        pass
    elif address and netmask:
        try:
            prefix = bin(int(ipaddress.ip_address(netmask))).count("1")  # ip_network takes no IPv6 mask form
            network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        except ValueError:
            sure = False
        else:
            if client.version != network.version or client not in network:
                return "no"
    else:
        sure = False  # a host name (resolved by the server)
    return "sure" if sure else "maybe"


def _client_ips(host: str) -> list[IPAddress]:
    """The source addresses of a TCP connection to the loopback ``host`` (``localhost``: either)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', '0.0.0.0' is an address, any other host name resolves somewhere


def _require_loopback_host(host: str) -> None:
    if not _is_loopback(host):
        raise PostgresError(f"airflow.postgresql.host is {host!r}: the PostgreSQL profile manages the local "
                            f"server only, set it to 127.0.0.1 in params.yaml")


@contextmanager
def _locked(ws: Workspace) -> Iterator[None]:
    """Serialises the profile's setup between processes (password generation, CREATE ROLE/DATABASE)."""
    ws.stack_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive_lock(ws.stack_dir / "postgres.lock"):
        yield


def _password(ws: Workspace) -> str:
    """The stored password, generated once (mode 0600; a looser mode is tightened)."""
    path = password_file(ws)
    password = owner_only_secret(path, lambda: secrets.token_urlsafe(32))
    if not password or not password.isprintable() or not password.isascii():
        raise PostgresError(f"{path} holds no usable password (empty, a control character or a non-ASCII "
                            f"character): write printable ASCII into it, or delete it and rerun to generate one")
    return password


def _clusters() -> list[Cluster]:
    if shutil.which("pg_lsclusters") is None or not any(POSTGRES_LIB.glob("*/bin/postgres")):
        raise PostgresError(f"PostgreSQL is not installed (no pg_lsclusters or {POSTGRES_LIB}/*/bin/postgres): "
                            f"{INSTALL_HINT}")
    out = _run(["pg_lsclusters", "--no-header"], "listing the PostgreSQL clusters").stdout
    clusters = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 7:
            version, name, port, status, owner, data_dir, log_file = fields[:7]
            clusters.append(Cluster(version, name, int(port), status.startswith("online"), owner, data_dir,
                                    log_file))
    return clusters


def _running_cluster(port: int) -> Cluster:
    """The cluster on ``port``, started if it is down (created first when the machine has none)."""
    clusters = _clusters()
    if not clusters:
        version = max((p.parent.parent.name for p in POSTGRES_LIB.glob("*/bin/postgres")), key=_version_key)
        log.info("no PostgreSQL cluster: creating %s/main on port %d", version, port)
        _run(["pg_createcluster", "--port", str(port), "--encoding", "UTF8", "--locale", "C.UTF-8", version, "main"],
             f"creating the PostgreSQL cluster {version}/main")
        clusters = _clusters()
    matching = [c for c in clusters if c.port == port]
    if not matching:
        listed = ", ".join(f"{c.id} on port {c.port}" for c in clusters)
        raise PostgresError(f"no PostgreSQL cluster on port {port} (there is {listed}): set airflow.postgresql.port "
                            f"in params.yaml to one of them")
    cluster = matching[0]
    if not cluster.running:
        if _port_in_use(port):
            raise PostgresError(f"PostgreSQL cluster {cluster.id} is down and another process listens on port "
                                f"{port}: stop it, or move the cluster (port in {_conf_dir(cluster)}/postgresql.conf) "
                                f"and airflow.postgresql.port together")
        log.info("starting the PostgreSQL cluster %s", cluster.id)
        try:
            _run(["pg_ctlcluster", cluster.version, cluster.name, "start"], f"starting PostgreSQL {cluster.id}",
                 timeout=120)
        except PostgresError as exc:
            raise PostgresError(f"{exc}\n{_tail(cluster.log_file)}") from exc
        cluster = next(c for c in _clusters() if c.id == cluster.id)
        if not cluster.running:
            raise PostgresError(f"PostgreSQL cluster {cluster.id} did not come up: see {cluster.log_file}")
    return cluster


def _state(cluster: Cluster, cfg: PostgresConfig) -> dict:
    """What the server has: listen_addresses, pg_hba's rules, whether the role exists / can log in, the DB's owner."""
    out = _psql(cluster, """SELECT json_build_object(
        'listen_addresses', current_setting('listen_addresses'),
        'hba_file', current_setting('hba_file'),
        'hba_rules', (SELECT json_agg(row_to_json(r)) FROM pg_hba_file_rules r),
        'role_login', (SELECT rolcanlogin FROM pg_roles WHERE rolname = :'role'),
        'db_owner', (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db'));""", cfg)
    return json.loads(out)


def _psql(cluster: Cluster, sql: str, cfg: PostgresConfig, verifier: str | None = None) -> str:
    """Runs ``sql`` as the cluster's owner on its ``postgres`` DB; ``:"role"``, ``:"db"`` (and ``:'verifier'``) are set.

    The verifier reaches psql on stdin (``\\set``; its base64 alphabet needs no quoting), not in its argv or
    environment, and is scrubbed from an error message.
    """
    script = sql + "\n"
    if verifier is not None:
        if not verifier.startswith("SCRAM-SHA-256$") or "'" in verifier or "\\" in verifier:
            raise PostgresError("refusing to send something other than a SCRAM-SHA-256 verifier as a password")
        script = f"\\set verifier '{verifier}'\n" + script
    cmd = ["runuser", "-u", cluster.owner, "--", "psql", "--cluster", cluster.id, "--no-psqlrc", "--quiet",
           "--tuples-only", "--no-align", "--set", "ON_ERROR_STOP=1", "--dbname", "postgres",
           "--set", f"role={cfg.user}", "--set", f"db={cfg.database}", "--file", "-"]
    return _run(cmd, f"psql as {cluster.owner} on {cluster.id}", stdin=script,
                scrub=(verifier,) if verifier else ()).stdout.strip()


def _check_login(cfg: PostgresConfig, password: str) -> None:
    """Logs in as the role over TCP, as Airflow will (raises psycopg2.OperationalError when refused)."""
    conn = psycopg2.connect(host=cfg.host, port=cfg.port, dbname=cfg.database, user=cfg.user, password=password,
                            connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database()")
            who = cur.fetchone()
    finally:
        conn.close()
    if who != (cfg.user, cfg.database):
        raise PostgresError(f"logged in as {who}, expected ({cfg.user!r}, {cfg.database!r})")


def _run(cmd: list[str], what: str, stdin: str | None = None, timeout: float = 60,
         scrub: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs ``cmd``; a failure raises PostgresError with its output, each string of ``scrub`` replaced by ``***``."""
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd="/")
    except FileNotFoundError as exc:
        raise PostgresError(f"{what}: {cmd[0]} not found: {INSTALL_HINT}") from exc
    except subprocess.TimeoutExpired as exc:
        raise PostgresError(f"{what}: no answer after {timeout:.0f} s ({' '.join(cmd[:3])} ...)") from exc
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        if scrub:  # psql's `LINE n: ...` quotes the statement, cut to the error's neighbourhood: drop it whole
            output = "\n".join(line for line in output.splitlines() if not re.match(r"\s*LINE \d+:", line))
        for secret in scrub:
            output = output.replace(secret, "***")
        raise PostgresError(f"{what} failed (exit {proc.returncode}): {output}")
    return proc


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _conf_dir(cluster: Cluster) -> str:
    return f"/etc/postgresql/{cluster.version}/{cluster.name}"


def _tail(path: str, lines: int = 10) -> str:
    try:
        return f"last lines of {path}:\n" + "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(log {path} unreadable)"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())
