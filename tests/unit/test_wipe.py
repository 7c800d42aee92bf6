"""``--fresh``'s guard and deletion (sum_pipeline/wipe.py) on real folders: a registry with a promotion, GTO tags
in a real git repository, a real child process carrying the workspace's identity as a stack component does, and
DVC remote folders with and without the record of whom they were created for."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sum_pipeline.stack import IDENTITY_ENV
from sum_pipeline.wipe import WipeIncomplete, WipeRefused, guard, holdings, wipe
from sum_platform.config import load_params
from sum_platform.registry import Registry
from sum_platform.workspace import REMOTE_MARKER, Workspace, claim_remote, remote_claims


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256): equal before and after means byte-identical."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def promoted(ws: Workspace, sid: str = "sum-2026-01-01") -> Registry:
    """A registry whose ``sid`` is production, as a daily run leaves it."""
    reg = Registry(ws.registry_db)
    reg.register_candidate(sid, sid[4:], None, {})
    reg.record_verdict(sid, True, {"verdict": "blessed"})
    reg.promote(sid, actor="pipeline")
    return reg


@pytest.fixture
def params():
    return load_params()


@pytest.fixture
def stack_process():
    """``start(ws)``: a real process with the workspace's identity in its environment (a stack component's
    stand-in, as ``Stack.up`` starts them); killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(ws: Workspace) -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "300"], env={"PATH": "/usr/bin:/bin", IDENTITY_ENV: ws.claim()},
                                start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_absent_or_empty_folders_hold_nothing(params, tmp_path):
    assert guard(params, Workspace(tmp_path / "absent"), own="demo", wiping=True).empty
    (tmp_path / "empty").mkdir()
    assert guard(params, Workspace(tmp_path / "empty"), own="demo", wiping=True).empty


def test_a_folder_that_is_not_a_workspace_is_refused_even_forced(params, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    before = tree_digest(tmp_path)
    for force in (False, True):
        with pytest.raises(WipeRefused, match=r"home is not a SUM workspace \(no \.sum-workspace\.json\)"):
            guard(params, Workspace(tmp_path / "home"), own="demo", wiping=True, force=force)
    assert tree_digest(tmp_path) == before


def test_a_promotion_is_refused_naming_the_workspace_what_it_holds_and_the_flag(params, tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.claim()
    promoted(ws)
    before = tree_digest(tmp_path)
    with pytest.raises(WipeRefused) as err:
        guard(params, ws, own="demo", wiping=True)
    msg = str(err.value)
    assert str(ws.root) in msg and "1 promotion (production sum-2026-01-01)" in msg and "--force-wipe" in msg
    assert tree_digest(tmp_path) == before  # the check reads the registry without writing a byte
    assert guard(params, ws, own="demo", wiping=True, force=True).production == "sum-2026-01-01"
    # Without --fresh (the soak's drills): refused too, and the flag is not offered.
    with pytest.raises(WipeRefused, match="runs only in a workspace of its own") as err:
        guard(params, ws, own="soak", wiping=False, force=True)
    assert "--force-wipe" not in str(err.value)


def test_the_commands_own_workspace_is_recreated(params, tmp_path):
    demo = Workspace(tmp_path / "demo")
    demo.claim(purpose="demo")
    promoted(demo)
    assert guard(params, demo, own="demo", wiping=True).production == "sum-2026-01-01"
    with pytest.raises(WipeRefused):  # the soak does not recreate make run's demo
        guard(params, demo, own="soak", wiping=True)


def test_gto_promotion_tags_count_as_promotions(params, tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.claim()

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=ws.root, check=True,
                       capture_output=True)

    git("init", "-q", "-b", "main")
    (ws.root / "dvc.yaml").write_text("artifacts:\n  user-tower:\n    path: snapshots/sum-2026-01-02\n    type: model\n")
    git("add", "dvc.yaml")
    git("commit", "-q", "-m", "declare")
    git("tag", "-a", "user-tower@v0.0.1", "-m", "Registering artifact user-tower version v0.0.1")
    held = holdings(params, ws)
    assert held.tags == ["user-tower@v0.0.1"] and held.promoted == []
    with pytest.raises(WipeRefused, match=r"1 GTO promotion tag \(user-tower@v0\.0\.1\)"):
        guard(params, ws, own="demo", wiping=True)


def test_a_live_stack_is_refused_and_found_by_identity(params, tmp_path, stack_process):
    ws = Workspace(tmp_path / "ws")
    proc = stack_process(ws)
    assert not ws.stack_dir.exists()  # no state file: found by the identity in its environment
    with pytest.raises(WipeRefused) as err:
        guard(params, ws, own="demo", wiping=True)
    assert f"a running stack: 1 processes (pids {proc.pid})" in str(err.value)
    assert "sumctl down --workspace" in str(err.value)
    assert [p.pid for p in guard(params, ws, own="demo", wiping=True, force=True).processes] == [proc.pid]
    proc.kill()
    proc.wait()
    assert guard(params, ws, own="demo", wiping=True).empty


def test_wipe_deletes_the_workspace_and_the_remote_created_for_it(params, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    remote = tmp_path / "ws-dvc-remote"
    monkeypatch.setenv("SUM_DVC_REMOTE", str(remote))
    claim_remote(str(remote), ws)
    assert remote_claims(str(remote))["created_for"] == ws.identity()
    (remote / "files").mkdir()
    done = wipe(params, ws)
    assert not ws.root.exists() and not remote.exists()
    assert done == [f"deleted the workspace {ws.root}", f"deleted its DVC remote {remote}"]


def test_wipe_keeps_a_remote_it_did_not_create_or_another_workspace_uses(params, tmp_path, monkeypatch):
    shared = tmp_path / "shared-remote"
    (shared / "files").mkdir(parents=True)
    (shared / "files" / "object").write_text("someone's backup")
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setenv("SUM_DVC_REMOTE", str(shared))
    claim_remote(str(shared), ws)
    assert remote_claims(str(shared))["created_for"] is None  # it held something before
    before = tree_digest(shared)
    done = wipe(params, ws)
    assert not ws.root.exists() and tree_digest(shared) == before
    assert f"kept the DVC remote {shared}: it was not created for this workspace ({REMOTE_MARKER})" in done

    # Created for `first`, also used by `second`: kept while `second` lives.
    first, second = Workspace(tmp_path / "first"), Workspace(tmp_path / "second")
    remote = tmp_path / "first-remote"
    monkeypatch.setenv("SUM_DVC_REMOTE", str(remote))
    claim_remote(str(remote), first)
    claim_remote(str(remote), second)
    done = wipe(params, first)
    assert remote.is_dir() and f"kept the DVC remote {remote}: also used by {second.root}" in done

    # A claim whose workspace is gone (no marker with that identity there) keeps nothing.
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    remote = tmp_path / "a-remote"
    monkeypatch.setenv("SUM_DVC_REMOTE", str(remote))
    claim_remote(str(remote), a)
    claim_remote(str(remote), b)
    shutil.rmtree(b.root)
    assert f"deleted its DVC remote {remote}" in wipe(params, a) and not remote.exists()


def test_a_url_remote_is_never_deleted(params, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    ws.claim()
    monkeypatch.setenv("SUM_DVC_REMOTE", "s3://bucket/sum")
    assert "kept the DVC remote s3://bucket/sum: not a local folder" in wipe(params, ws)


def test_what_cannot_be_deleted_is_reported_and_the_remote_kept(params, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    remote = tmp_path / "ws-remote"
    monkeypatch.setenv("SUM_DVC_REMOTE", str(remote))
    claim_remote(str(remote), ws)
    locked = ws.root / "data" / "locked"
    locked.mkdir(parents=True)
    (locked / "part-0.parquet").write_bytes(b"x")
    # The tests run as root, whom permissions do not stop: the file system's refusal is injected here.
    unlink = os.unlink

    def refusing(path, *args, **kwargs):
        if os.fspath(path).endswith("part-0.parquet"):
            raise PermissionError(13, "Permission denied")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing)
    with pytest.raises(WipeIncomplete, match=r"could not delete:\n  .*part-0\.parquet: \[Errno 13\] Permission denied") as err:
        wipe(params, ws)
    assert "its DVC remotes were left alone" in str(err.value)
    monkeypatch.setattr(os, "unlink", unlink)
    assert (locked / "part-0.parquet").exists() and remote.is_dir()
