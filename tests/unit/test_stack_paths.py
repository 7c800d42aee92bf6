"""Where the stack puts Ray's temp dir: every unix socket Ray makes under it must fit AF_UNIX's 107 bytes."""

from pathlib import Path

import pytest

from sum_pipeline.stack import UNIX_PATH_MAX, Stack
from sum_platform.config import load_params
from sum_platform.workspace import Workspace

# The longest socket Ray 2.60 makes under its temp dir (the dashboard module's), with a 7-digit pid.
LONGEST = "session_2026-12-02_03-36-31_444586_3240712/sockets/dash_MetricsHead"


@pytest.mark.parametrize("root", ["/w", "/tmp/lead/ci-fresh/.sum/workspace", "/work/main/.sum/workspace",
                                  "/tmp/" + "x" * 90 + "/workspace"])
def test_every_ray_socket_path_fits(root):
    stack = Stack(load_params(), Workspace(Path(root)))
    assert len(f"{stack.ray_temp_dir}/{LONGEST}") <= UNIX_PATH_MAX, stack.ray_temp_dir


def test_a_short_workspace_keeps_ray_inside_it_and_long_ones_get_distinct_dirs():
    assert Stack(load_params(), Workspace(Path("/w"))).ray_temp_dir == Path("/w/stack/ray")
    a = Stack(load_params(), Workspace(Path("/tmp/" + "a" * 60))).ray_temp_dir
    b = Stack(load_params(), Workspace(Path("/tmp/" + "b" * 60))).ray_temp_dir
    assert a != b and str(a).startswith("/tmp/sum-ray-")
