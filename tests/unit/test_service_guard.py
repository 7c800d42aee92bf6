"""The guard that keeps services out of the tests not marked slow (tests/service_guard.py), on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import service_guard

VENV = os.path.dirname(sys.executable)


@pytest.mark.parametrize("argv", [
    ["/x/site-packages/ray/core/src/ray/gcs/gcs_server", "--gcs_server_port=0"],
    ["/x/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"],
    ["/usr/bin/redis-server", "/ws/redis.conf"],
    [f"{VENV}/airflow", "scheduler"],
    [sys.executable, f"{VENV}/airflow", "dag-processor"],
    [f"{VENV}/ray", "start", "--head"],
    [f"{VENV}/sumctl", "up"],
    ["pg_ctlcluster", "15", "main", "start"],
    "redis-server --port 0", ["/bin/sh", "-c", f"exec {VENV}/airflow triggerer"],
])
def test_service_commands_are_recognised(argv):
    assert service_guard.service_of(argv)


@pytest.mark.parametrize("argv", [
    ["bash", "-c", "sleep 1"], [f"{VENV}/airflow", "db", "migrate"], ["git", "status"], [sys.executable, "-c", "1"],
    ["runuser", "-u", "postgres", "--", "psql", "-c", "SELECT 1"], [f"{VENV}/sumctl", "status"],
    ["pg_lsclusters", "--no-header"], [f"{VENV}/dvc", "push"], [],
    [sys.executable, "-c", "import time; time.sleep(9)", "ray", "start", "--head"],  # a stand-in's argv, not ray
    ["grep", "airflow scheduler", "/var/log/syslog"], [f"{VENV}/ray", "status"],
])
def test_other_commands_are_not(argv):
    assert service_guard.service_of(argv) is None


def test_a_test_not_marked_slow_cannot_start_a_service(request, tmp_path):
    """This test is not marked slow, so the guard is armed: the start raises before anything is executed."""
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\ntouch \"$0.ran\"\n")
    fake.chmod(0o755)
    with pytest.raises(service_guard.ServiceStarted, match=f"{request.node.nodeid} is not marked slow but started "
                                                           f"a service: {fake} --port 0. Mark the test"):
        subprocess.Popen([str(fake), "--port", "0"])
    assert service_guard.started_during(request.node.nodeid) == [f"{fake} --port 0"]
    service_guard.forget(request.node.nodeid)  # started on purpose: the report hook must not fail this test
    assert not fake.with_name("redis-server.ran").exists()
    assert subprocess.run(["true"]).returncode == 0  # other processes start as ever


@pytest.mark.slow
def test_a_slow_test_may_start_one(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\ntouch \"$0.ran\"\n")
    fake.chmod(0o755)
    assert subprocess.run([str(fake)]).returncode == 0 and fake.with_name("redis-server.ran").exists()


@pytest.mark.parametrize("expr, test_fast", [
    ("not slow", True), ("not slow and not gpu", True), ("", False), ("slow", False), ("slow or not slow", False)])
def test_the_whole_session_is_guarded_when_m_leaves_out_the_slow_tests(expr, test_fast):
    class Config:
        @staticmethod
        def getoption(name):
            assert name == "markexpr"
            return expr

    assert service_guard.slow_deselected(Config()) is test_fast
