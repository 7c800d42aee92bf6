"""Under the stack, a task that needs Ray attaches to the stack's head or fails at once naming `sumctl up`."""

from __future__ import annotations

import socket

import pytest

from serving import ray_cluster
from sum_platform.config import load_params
from sum_platform.workspace import Workspace


@pytest.fixture
def stack_params(tmp_path, monkeypatch):
    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("SUM_RAY_ADDRESS", "stack")  # what the stack sets for its tasks
    return load_params()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_recorded_cluster_fails_naming_sumctl_up(stack_params):
    # What ensure_ray does in a task process (one not yet connected to a Ray): connect by the address.
    with pytest.raises(ray_cluster.NoClusterError, match="sumctl up") as err:
        ray_cluster._connect_ray(stack_params, num_cpus=1)
    assert str(Workspace(stack_params.workspace).root) in str(err.value)


def test_a_recorded_head_that_is_gone_fails_naming_sumctl_up(stack_params, tmp_path):
    ws = Workspace(stack_params.workspace)
    ray_cluster.record_cluster(ws, f"127.0.0.1:{_free_port()}", tmp_path / "token", "http://127.0.0.1:1")
    assert ray_cluster.cluster_record(ws).address.startswith("127.0.0.1:")
    with pytest.raises(ray_cluster.NoClusterError, match="does not answer.*sumctl up"):
        ray_cluster._connect_ray(stack_params, num_cpus=1)
    ray_cluster.forget_cluster(ws)
    assert ray_cluster.cluster_record(ws) is None


def test_the_token_environment_names_the_token_file(tmp_path):
    env = ray_cluster.token_env(tmp_path / "t")
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}
