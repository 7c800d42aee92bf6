"""Workspace versioning against real git, DVC and GTO (no mocks), each test in its own tmp workspace.

Durations of the slow operations are printed (run with ``-s`` to see them) and logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from sum_platform import versioning as v

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


@contextmanager
def timed(label: str):
    start = time.perf_counter()
    yield
    print(f"[timing] {label}: {time.perf_counter() - start:.2f}s")


def sh(root: Path, *args: str) -> str:
    out = subprocess.run(list(args), cwd=root, capture_output=True, text=True, check=True)
    return out.stdout


def git(root: Path, *args: str) -> str:
    return sh(root, "git", *args).strip()


def commit_count(root: Path) -> int:
    return int(git(root, "rev-list", "--count", "HEAD"))


def remote_objects(remote: Path) -> set[str]:
    return {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}


def write_partition(root: Path, ds: str, payload: bytes) -> Path:
    part = root / "data" / "events" / f"ds={ds}"
    part.mkdir(parents=True, exist_ok=True)
    (part / "part-0.parquet").write_bytes(payload)
    (part / "part-1.parquet").write_bytes(payload[::-1])
    return part


def write_snapshot(root: Path, snapshot_id: str, seed: int) -> Path:
    snap = root / "snapshots" / snapshot_id
    snap.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(4096) + bytes([seed]) * 2048
    (snap / "user_tower.safetensors").write_bytes(blob)
    (snap / "model.safetensors").write_bytes(blob[::-1] * 2)
    (snap / "config.json").write_text(json.dumps({"snapshot_id": snapshot_id, "embedding_dim": 96}))
    (snap / "manifest.json").write_text(json.dumps({"snapshot_id": snapshot_id, "seed": seed}))
    return snap


def read_tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture()
def ws(tmp_path: Path) -> tuple[Path, Path]:
    root, remote = tmp_path / "workspace", tmp_path / "dvc-remote"
    with timed("init_workspace_repo (first)"):
        v.init_workspace_repo(root, str(remote))
    return root, remote


def test_init_is_idempotent(ws):
    root, remote = ws
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert commit_count(root) == 1
    head = git(root, "rev-parse", "HEAD")

    with timed("init_workspace_repo (again)"):
        v.init_workspace_repo(root, str(remote))
    assert git(root, "rev-parse", "HEAD") == head
    assert git(root, "status", "--porcelain") == ""

    # Local identity and DVC settings live in the repositories' own config.
    assert git(root, "config", "--local", "user.email") == v.COMMITTER_EMAIL
    dvc = str(VENV_BIN / "dvc")
    assert sh(root, dvc, "config", "core.analytics").strip() == "false"
    assert sh(root, dvc, "config", "core.remote").strip() == "storage"
    assert sh(root, dvc, "remote", "list").split()[:2] == ["storage", str(remote.resolve())]
    assert remote.is_dir()
    # Working state is git-ignored; the folders' contents never show up.
    for folder in v.WORKING_STATE_DIRS:
        (root / folder).mkdir()
        (root / folder / "state.txt").write_text("x")
    assert git(root, "status", "--porcelain") == ""
    assert git(root, "check-ignore", "registry/registry.db") == "registry/registry.db"


def test_track_partition_rerun_and_change(ws):
    root, remote = ws
    part = write_partition(root, "2026-01-03", b"events-v1" * 1000)

    with timed("track_paths (new partition)"):
        sha1 = v.track_paths(root, [part], "events ds=2026-01-03")
    assert sha1 == git(root, "rev-parse", "HEAD")
    assert commit_count(root) == 2
    committed = git(root, "show", "--name-only", "--format=", sha1).splitlines()
    assert sorted(committed) == ["data/events/.gitignore", "data/events/ds=2026-01-03.dvc"]
    md5_1 = v.data_version(root, part)
    assert md5_1.endswith(".dir") and v.data_version(root, "data/events/ds=2026-01-03.dvc") == md5_1
    assert v.data_versions(root, [part]) == {"data/events/ds=2026-01-03": md5_1}
    # The remote folder holds the directory manifest and both files.
    objects = remote_objects(remote)
    assert f"files/md5/{md5_1[:2]}/{md5_1[2:]}" in objects
    assert len(objects) == 3
    assert git(root, "status", "--porcelain") == ""  # the parquet files are ignored by git

    with timed("track_paths (unchanged rerun)"):
        assert v.track_paths(root, [part], "events ds=2026-01-03 (rerun)") is None
    assert commit_count(root) == 2 and v.data_version(root, part) == md5_1

    (part / "part-1.parquet").write_bytes(b"events-v2" * 1000)
    with timed("track_paths (changed partition)"):
        sha2 = v.track_paths(root, [part], "events ds=2026-01-03 (rewritten)")
    assert sha2 and sha2 != sha1 and commit_count(root) == 3
    md5_2 = v.data_version(root, part)
    assert md5_2 != md5_1
    assert v.data_version(root, part, rev=sha1) == md5_1  # lineage can read any revision
    assert f"files/md5/{md5_2[:2]}/{md5_2[2:]}" in remote_objects(remote)
    assert len(remote_objects(remote)) == 5  # new manifest + the rewritten file

    with pytest.raises(v.VersioningError, match="does not exist"):
        v.track_paths(root, [root / "data" / "events" / "ds=2099-01-01"], "missing")
    with pytest.raises(v.VersioningError, match="working state"):
        (root / "runs" / "2026-01-03").mkdir(parents=True)
        v.track_paths(root, [root / "runs" / "2026-01-03"], "not versioned")


def gto_show(root: Path) -> list[dict]:
    return json.loads(sh(root, str(VENV_BIN / "gto"), "show", v.ARTIFACT_NAME, "--json"))


def test_promotions_tags_and_restore(ws):
    root, remote = ws
    ids = ["sum-2026-01-03", "sum-2026-01-04"]
    originals = {}
    tags = []
    for seed, sid in enumerate(ids):
        originals[sid] = read_tree(write_snapshot(root, sid, seed))
        with timed(f"tag_promotion ({sid}, new)"):
            tags.append(v.tag_promotion(root, sid, f"gate passed for {sid}"))
    assert tags == ["user-tower@v0.0.1", "user-tower@v0.0.2"]

    # Standard GTO tags: two versions, prod on the latest; messages carry the snapshot id.
    versions = {row["version"]: row for row in gto_show(root)}
    assert set(versions) == {"v0.0.1", "v0.0.2"}
    assert [s["stage"] for s in versions["v0.0.2"]["stages"]] == ["prod"]
    assert versions["v0.0.1"]["stages"] == []
    assert v.production_version(root) == "v0.0.2"
    assert v.production_snapshot(root) == ids[1]
    for tag, sid in zip(tags, ids):
        assert sid in git(root, "tag", "-l", "--format=%(contents)", tag)
        assert v.tag_for_snapshot(root, sid) == tag
        assert v.snapshot_for_tag(root, tag) == sid
    assert v.snapshot_for_tag(root, "user-tower#prod") == ids[1]
    assert sorted(git(root, "tag", "-l").split()) == [
        "user-tower#prod#1", "user-tower#prod#2", "user-tower@v0.0.1", "user-tower@v0.0.2",
    ]
    history = json.loads(sh(root, str(VENV_BIN / "gto"), "history", v.ARTIFACT_NAME, "--json"))
    assert {e["event"] for e in history} == {"registration", "assignment"}
    assert [p.snapshot_id for p in v.list_promotions(root)] == ids
    with pytest.raises(v.TagNotFound):
        v.tag_for_snapshot(root, "sum-1999-01-01")

    # Idempotent: the same snapshot again is the same tag, no new tags or commits.
    head, n_tags = git(root, "rev-parse", "HEAD"), len(git(root, "tag", "-l").split())
    with timed("tag_promotion (already tagged)"):
        assert v.tag_promotion(root, ids[1], "again") == tags[1]
    assert git(root, "rev-parse", "HEAD") == head and len(git(root, "tag", "-l").split()) == n_tags

    # Restore from the tag after the working copy *and* the local DVC cache are gone (remote only).
    shutil.rmtree(root / "snapshots" / ids[0])
    shutil.rmtree(root / ".dvc" / "cache")
    with timed("restore_snapshot (from remote)"):
        dest = v.restore_snapshot(root, ids[0], root / "snapshots" / ids[0])
    assert read_tree(dest) == originals[ids[0]]
    assert git(root, "status", "--porcelain") == ""
    other = v.restore_snapshot(root, ids[1], root.parent / "restored" / ids[1])
    assert read_tree(other) == originals[ids[1]]
    with pytest.raises(v.VersioningError, match="exists"):
        v.restore_snapshot(root, ids[1], other)
    assert read_tree(v.restore_snapshot(root, ids[1], other, force=True)) == originals[ids[1]]

    # Rollback: re-tagging the earlier snapshot keeps its version and moves prod back to it.
    with timed("tag_promotion (rollback to earlier version)"):
        assert v.tag_promotion(root, ids[0], "rollback") == tags[0]
    assert v.production_version(root) == "v0.0.1"
    versions = {row["version"]: row for row in gto_show(root)}
    assert [s["stage"] for s in versions["v0.0.1"]["stages"]] == ["prod"]

    # The operator's by-stage form: DVC resolves the GTO stage tag and dvc.yaml's artifact path.
    out = root.parent / "prod-by-stage"
    with timed("dvc artifacts get --stage prod"):
        sh(root.parent, str(VENV_BIN / "dvc"), "artifacts", "get", str(root), v.ARTIFACT_NAME,
           "--stage", v.PROD_STAGE, "-o", str(out))
    assert read_tree(out) == originals[ids[0]]

    # A DVC failure surfaces as VersioningError with DVC's stderr (remote and cache both gone).
    shutil.rmtree(remote)
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
    with pytest.raises(v.VersioningError) as err:
        v.restore_snapshot(root, ids[1], root.parent / "nowhere", force=True)
    assert err.value.returncode and err.value.stderr and "dvc get" in str(err.value)


def test_held_dvc_lock_and_stale_git_lock(ws, caplog):
    import zc.lockfile

    root, _ = ws
    part = write_partition(root, "2026-01-05", b"a" * 100)

    # A git lock left behind by a killed git (old mtime) is removed.
    stale = root / ".git" / "index.lock"
    stale.write_text("")
    old = time.time() - 2 * v.STALE_GIT_LOCK_SECONDS
    os.utime(stale, (old, old))
    # DVC's repo lock held by another process (an interactive `dvc`) until the platform says it waits for it:
    # released by the "lock is held" warning itself, so DVC's own retries have surely failed by then.
    lock = zc.lockfile.LockFile(str(root / ".dvc" / "tmp" / "lock"))

    class ReleaseWhenWaitedFor(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "DVC repository lock is held" in record.getMessage():
                lock.close()

    release = ReleaseWhenWaitedFor()
    logging.getLogger(v.__name__).addHandler(release)
    try:
        with caplog.at_level(logging.WARNING, logger=v.__name__), timed("track_paths (waiting for DVC lock)"):
            sha = v.track_paths(root, [part], "events ds=2026-01-05")
    finally:
        logging.getLogger(v.__name__).removeHandler(release)
        lock.close()
    assert sha and not stale.exists()
    assert any("DVC repository lock is held" in r.getMessage() for r in caplog.records)
    assert any("stale git lock" in r.getMessage() for r in caplog.records)
