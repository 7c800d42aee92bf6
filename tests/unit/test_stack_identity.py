"""The stack's processes carry the workspace's identity: `live_processes` and `down` find them by it when the
state files are gone. Real processes stand in for the components: `ray start`-named and plain shells in sessions of
their own, started with the identity in their environment the way `up` starts a component."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from sum_pipeline.stack import IDENTITY_ENV, Stack
from sum_platform.config import load_params
from sum_platform.workspace import Workspace


def _start(ident: str, *argv0: str) -> subprocess.Popen:
    """A component stand-in: a session leader whose own child also carries ``ident`` (as Ray's children do)."""
    env = {"PATH": "/usr/bin:/bin", IDENTITY_ENV: ident}
    script = "import subprocess, sys; subprocess.Popen(['sleep', '300']); print('up', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", script, *argv0], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


@pytest.fixture
def stacks(tmp_path):
    ours = Workspace(tmp_path / "ours")
    other = Workspace(tmp_path / "other")
    procs = [_start(ours.claim(), "ray", "start", "--head"), _start(ours.claim()), _start(other.claim())]
    yield Stack(load_params(), ours), Stack(load_params(), other), procs
    for p in procs:
        for q in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)] if p.poll() is None else []:
            q.kill()
        p.wait()


def test_live_processes_finds_the_stack_by_identity_without_its_state_files(stacks):
    ours, other, (head, plain, foreign) = stacks
    assert not ours.state_file.exists()
    found = {p.pid for p in ours.live_processes()}
    children = {c.pid for p in (head, plain) for c in psutil.Process(p.pid).children()}
    assert found == {head.pid, plain.pid} | children
    assert foreign.pid not in found and {p.pid for p in other.live_processes()} >= {foreign.pid}


def test_a_process_whose_title_hides_its_environment_is_found_by_its_log(stacks):
    """Airflow's api-server and Redis set their process title, which blanks /proc/<pid>/environ: their output goes
    to the stack's logs, which names them."""
    ours, _, (head, plain, _) = stacks
    ours.logs.mkdir(parents=True)
    with open(ours.logs / "redis.log", "ab") as out:
        titled = subprocess.Popen(["sleep", "300"], env={}, stdout=out, start_new_session=True)
    try:
        assert titled.pid in {p.pid for p in ours.live_processes()}
        (ours.logs / "redis.log").unlink()  # still found with the log deleted
        assert titled.pid in {p.pid for p in ours.live_processes()}
    finally:
        titled.kill()
        titled.wait()


def test_a_workspace_without_identity_finds_nothing_by_environment(stacks, tmp_path):
    assert Stack(load_params(), Workspace(tmp_path / "unmarked")).live_processes() == []


def test_down_stops_what_it_finds_by_identity_and_only_that(stacks):
    ours, other, (head, plain, foreign) = stacks
    pids = {p.pid for p in ours.live_processes()}
    result = ours.down(timeout=4)
    assert result["stopped"] == ["ray"]  # the head is named from its command line and stopped as the head
    assert set(result["pids"]) == pids and result["left"] == []
    assert ours.live_processes() == []
    assert foreign.poll() is None and psutil.Process(foreign.pid).status() != psutil.STATUS_ZOMBIE
