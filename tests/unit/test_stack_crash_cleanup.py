"""What `up` does before restarting a component that died alone (SIGKILL, the OOM killer): its children were
reparented, not killed. Real processes stand in for the components: a shell in a session of its own with a
`sleep` child that is idle and one that has a child of its own (an executor worker running a task)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from sum_pipeline.stack import ComponentState, Stack
from sum_platform.config import load_params
from sum_platform.workspace import Workspace

# An idle child (sleep) and a busy one (a shell waiting on its own sleep), each printing its pid.
# The busy one becomes idle (exec: the same pid, no child) once its child ends, as a worker whose task ended.
TREE = "sleep 300 & echo idle $!; bash -c 'sleep 300 & wait; exec sleep 300' & echo busy $!; wait"


def _component(name: str) -> tuple[ComponentState, dict[str, int]]:
    proc = subprocess.Popen(["bash", "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = dict(line.split() for line in (proc.stdout.readline(), proc.stdout.readline()))
    deadline = time.monotonic() + 10
    while not psutil.Process(int(pids["busy"])).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    state = ComponentState(name=name, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return state, {k: int(v) for k, v in pids.items()}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def stack(tmp_path):
    return Stack(load_params(), Workspace(Path(tmp_path)))


def test_a_dead_components_children_are_stopped_before_it_restarts(stack):
    state, pids = _component("api-server")
    assert not state.running and {p.pid for p in state.leftover_processes()} >= set(pids.values())
    states = {"api-server": state}
    stack._clear_after_crashes(states)
    assert not _alive(pids["idle"]) and not _alive(pids["busy"])
    assert states["api-server"].leftovers == []


def test_a_dead_schedulers_busy_worker_finishes_and_is_stopped_later(stack):
    state, pids = _component("scheduler")
    states = {"scheduler": state}
    try:
        stack._clear_after_crashes(states)
        assert not _alive(pids["idle"])  # an idle executor worker: stopped
        assert _alive(pids["busy"])  # one running a task: left to finish, and recorded
        assert pids["busy"] in {int(pid) for pid, _ in states["scheduler"].leftovers}
        # The restarted scheduler's state carries the record; `down` finds the worker through it.
        restarted = ComponentState(name="scheduler", pid=os.getpid(), create_time=psutil.Process().create_time(),
                                   leftovers=states["scheduler"].leftovers)
        assert pids["busy"] in {p.pid for p in stack._processes({"scheduler": restarted})}
        # Its task done (the worker idle again), the next `up` stops it.
        for child in psutil.Process(pids["busy"]).children():
            child.kill()
        deadline = time.monotonic() + 10
        while psutil.Process(pids["busy"]).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(pids["busy"])
        stack._clear_after_crashes({"scheduler": restarted})
        assert not _alive(pids["busy"]) and restarted.leftovers == []
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
