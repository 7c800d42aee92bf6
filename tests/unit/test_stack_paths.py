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


# -- Ray's temp dir is private: Ray makes its folders 0777, so their parent must be closed to others -------------

@pytest.fixture
def short_parent(monkeypatch):
    """A short per-user folder candidate (so a long workspace's Ray dir goes there), removed afterwards."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    monkeypatch.setattr("sum_pipeline.stack.ray_temp_parents", lambda: [base / "sum-ray"])
    yield base / "sum-ray"
    shutil.rmtree(base, ignore_errors=True)


def _long_stack() -> Stack:
    return Stack(load_params(), Workspace(Path("/tmp/" + "z" * 90 + "/workspace")))


def test_a_long_workspace_gets_ray_dir_in_a_new_folder_only_its_owner_can_open(short_parent):
    import os
    import stat

    stack = _long_stack()
    path = stack._private_ray_temp_dir()
    assert path.parent == short_parent and path == stack.ray_temp_dir
    st = short_parent.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()


def test_an_existing_parent_open_to_others_is_closed(short_parent):
    import stat

    short_parent.mkdir(mode=0o777)
    short_parent.chmod(0o777)
    _long_stack()._private_ray_temp_dir()
    assert stat.S_IMODE(short_parent.stat().st_mode) == 0o700


def test_a_symlink_in_place_of_the_parent_is_refused_and_left_alone(short_parent, tmp_path):
    from sum_pipeline.stack import StackError

    short_parent.symlink_to(tmp_path)
    with pytest.raises(StackError, match="symlink"):
        _long_stack()._private_ray_temp_dir()
    assert short_parent.is_symlink() and list(tmp_path.iterdir()) == []


def test_a_parent_of_another_user_is_refused(short_parent):
    import os

    from fault_setup import cannot_set_up
    from sum_pipeline.stack import StackError

    short_parent.mkdir(mode=0o700)
    try:
        os.chown(short_parent, 65534, 65534)  # nobody's
    except PermissionError:
        cannot_set_up("chown needs root")
    with pytest.raises(StackError, match="belongs to uid 65534"):
        _long_stack()._private_ray_temp_dir()


def test_every_candidate_parent_is_per_user():
    import os

    from sum_pipeline.stack import ray_temp_parents

    for parent in ray_temp_parents():
        assert str(parent).startswith((str(Path.home()), os.environ.get("XDG_RUNTIME_DIR") or str(Path.home()))) \
            or parent.name == f"sum-ray-{os.getuid()}", parent
