"""A test not marked ``slow`` must start no service (README: ``make test-fast`` starts none).

``sys.addaudithook`` sees every process this Python process starts (the ``subprocess.Popen``,
``os.posix_spawn`` and ``os.exec`` audit events), whoever starts it: the project's own code
(``redis_server.start``, ``sumctl up``), Ray's ``ray.init`` (its ``gcs_server`` and ``raylet``), Airflow's CLI.
While a test that is not marked ``slow`` runs (its fixtures' setup included), a start of a service's process
raises :class:`ServiceStarted` in the starter and the test fails, naming the command and the fix; the failure
is also recorded, so a starter that swallows the exception does not hide it. Under ``-m "not slow"``
(``make test-fast``) the guard holds for the whole session, collection included.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

import pytest

__all__ = ["ServiceStarted", "service_of", "install", "guarding", "started_during", "forget", "slow_deselected"]

#: Executables that are services (Ray's GCS and raylet, Redis, PostgreSQL).
SERVICE_EXECUTABLES = {"gcs_server", "raylet", "redis-server", "postgres", "postmaster"}
#: CLIs whose subcommand starts one: Ray, Airflow's components, the stack, a PostgreSQL cluster.
SERVICE_SUBCOMMANDS = {
    "ray": {"start"},
    "airflow": {"scheduler", "api-server", "dag-processor", "triggerer", "standalone", "celery", "webserver"},
    "sumctl": {"up", "run", "serve", "soak", "ui"},
    "pg_ctlcluster": {"start", "restart"},
    "pg_ctl": {"start", "restart"},
}


#: Commands that run the command after them (their options and VAR=value words skipped).
WRAPPERS = {"exec", "env", "nice", "nohup", "setsid", "stdbuf", "ionice", "chrt"}


class ServiceStarted(RuntimeError):
    """A test that is not marked ``slow`` started a service."""


def service_of(argv: Any) -> str | None:
    """The command line of ``argv`` (a list or a string) when it starts a service, else None."""
    parts = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a)
             for a in ([argv] if isinstance(argv, (str, bytes, os.PathLike)) else list(argv or []))]
    if len(parts) >= 3 and os.path.basename(parts[0]) in ("sh", "bash") and parts[1] == "-c":
        parts = parts[2:]  # Popen(..., shell=True) and `bash -c ...`: the command line itself
    if len(parts) == 1:
        try:
            parts = shlex.split(parts[0])
        except ValueError:
            pass
    if not parts:
        return None
    line = " ".join(parts)
    while parts and os.path.basename(parts[0]) in WRAPPERS:  # `exec nice -n 5 env A=1 airflow scheduler`
        parts = parts[1:]
        while parts and (parts[0].startswith("-") or "=" in parts[0] or parts[0].isdigit()):
            parts = parts[1:]
    if not parts:
        return None
    program, rest = os.path.basename(parts[0]), parts[1:]
    if program.startswith("python") and rest and not rest[0].startswith("-"):
        program, rest = os.path.basename(rest[0]), rest[1:]  # `python .venv/bin/airflow scheduler`
    if program in SERVICE_EXECUTABLES:
        return line
    words = [a for a in rest if not a.startswith("-")]
    if program in ("pg_ctlcluster", "pg_ctl"):  # `pg_ctlcluster 15 main start`: the action comes last
        return line if SERVICE_SUBCOMMANDS[program] & set(words) else None
    return line if words[:1] and words[0] in SERVICE_SUBCOMMANDS.get(program, ()) else None


_state: dict[str, Any] = {"active": False, "where": None, "started": []}


def _audit(event: str, args: tuple) -> None:
    if not _state["active"] or event not in ("subprocess.Popen", "os.posix_spawn", "os.exec"):
        return
    command = service_of(args[1])  # Popen: (executable, args, cwd, env); posix_spawn / exec: (path, argv, env)
    if command is None:
        return
    where = _state["where"] or "collection"
    _state["started"].append((where, command))
    raise ServiceStarted(
        f"{where} is not marked slow but started a service: {command[:300]}. Mark the test (or its module) "
        f"@pytest.mark.slow, or give it what it needs without the service (make test-fast starts none)")


def install() -> None:
    """Adds the audit hook (once per process; an audit hook cannot be removed, :func:`guarding` arms it)."""
    if not _state.get("installed"):
        sys.addaudithook(_audit)
        _state["installed"] = True


def guarding(active: bool, where: str | None) -> None:
    """Arms (``active``) or disarms the guard; ``where`` names the test for the message."""
    _state["active"], _state["where"] = active, where


def started_during(where: str) -> list[str]:
    """The services ``where`` started while guarded (each raised, maybe swallowed by its starter)."""
    return [command for w, command in _state["started"] if w == where]


def forget(where: str) -> None:
    """Drops what ``where`` started (for the guard's own test, which starts one on purpose)."""
    _state["started"] = [(w, c) for w, c in _state["started"] if w != where]


def slow_deselected(config: pytest.Config) -> bool:
    """Whether ``-m`` leaves out the tests marked ``slow`` (``make test-fast``: ``-m "not slow"``)."""
    from _pytest.mark.expression import Expression  # pytest's own evaluation of -m

    expr = config.getoption("markexpr") or ""
    return bool(expr) and not Expression.compile(expr).evaluate(lambda name, **_: name == "slow")
