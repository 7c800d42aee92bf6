"""The Redis profile's server (``feature_store.online_store: redis``): Debian's ``redis-server`` run by the project.

:func:`write_config` writes the server's config into the workspace (mode 0600: it holds the password):
loopback-only listener on ``feature_store.redis.host:port`` (protected mode on), ``requirepass`` from the
generated password file (:func:`sum_platform.feature_store.redis_password`), data in ``feature_store.redis.
data_dir`` with an append-only file (a restarted server keeps the online store), no background daemon (the
stack runs it as a component of its own, :mod:`sum_pipeline.stack`). :func:`start` / :func:`stop` run one
outside a stack (the tests).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from pathlib import Path

from sum_platform.config import Params
from sum_platform.feature_store import redis_password, redis_paths

__all__ = ["RedisServerError", "argv", "write_config", "ping", "start", "stop"]

INSTALL_HINT = "run `bash scripts/install_system_packages.sh` as root"


class RedisServerError(RuntimeError):
    """The Redis server cannot be started or reached; the message says why and how to fix it."""


def _binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise RedisServerError(f"redis-server is not installed: {INSTALL_HINT}")
    return path


def write_config(params: Params) -> Path:
    """Writes ``redis.conf`` next to the data folder; returns its path.

    Raises:
        RedisServerError: the configured host is not a loopback address and the listener would be open to
            the network (set it in params.yaml deliberately: a non-loopback host is refused here).
    """
    cfg = params.feature_store.redis
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    if not loopback:
        raise RedisServerError(f"feature_store.redis.host {cfg.host!r} is not a loopback address; the platform's "
                               "own Redis listens on 127.0.0.1 only (run a managed Redis for other hosts)")
    data_dir, _ = redis_paths(params)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(0o700)  # the append-only file holds every user's features and embeddings
    conf = data_dir / "redis.conf"
    lines = [
        f"bind {cfg.host}",
        "protected-mode yes",
        f"port {int(cfg.port)}",
        f"dir {data_dir}",
        "daemonize no",
        "appendonly yes",                # the online store survives a restart
        "appendfsync everysec",
        'save ""',                      # no RDB snapshots: the append-only file is the persistence
        f"logfile {data_dir / 'redis.log'}",
        f"requirepass {redis_password(params)}",
    ]
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text("\n".join(lines) + "\n")
    return conf


def argv(params: Params) -> list[str]:
    """The command that runs the server in the foreground with the workspace's config."""
    return [_binary(), str(write_config(params))]


def ping(params: Params, timeout: float = 1.0) -> bool:
    """Whether the configured server answers an authenticated PING."""
    import redis

    cfg = params.feature_store.redis
    try:
        return bool(redis.Redis(host=cfg.host, port=int(cfg.port), password=redis_password(params),
                                socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except redis.RedisError:
        return False


def start(params: Params, timeout: float = 30.0) -> subprocess.Popen:
    """Starts the server (in a session of its own) and waits until it answers; the caller stops it (:func:`stop`).

    Raises:
        RedisServerError: it exited or did not answer within ``timeout`` (the message holds its log's tail).
    """
    import socket

    cfg = params.feature_store.redis
    with socket.socket() as sock:
        if sock.connect_ex((cfg.host, int(cfg.port))) == 0:
            raise RedisServerError(f"port {cfg.port} is taken by another program (another Redis?): stop it or set "
                                   "feature_store.redis.port")
    command = argv(params)
    log_file = redis_paths(params)[0] / "redis.log"
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True, umask=0o077)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(params):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop(proc)
    tail = log_file.read_text()[-2000:] if log_file.exists() else ""
    raise RedisServerError(f"redis-server on port {params.feature_store.redis.port} did not come up; "
                           f"{log_file} ends with:\n{tail}")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stops a server :func:`start` started (SIGTERM: it writes its append-only file and exits)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
