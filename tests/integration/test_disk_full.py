"""A full disk during a day's work, on small filesystems of the test's own (tmpfs mounts of a few MiB, filled up to
a margin): the DVC remote while the day's partitions are versioned and while a snapshot is promoted, and the
snapshots folder while the candidate is exported. Each task fails with an error that says what ran out of space
and where; nothing half-written is versioned, exported or promoted; once space is back the rerun succeeds and
`sumctl doctor` finds the workspace consistent. The tasks run as the scheduler runs them (the same functions, in
this process), on real git, DVC, GTO, Feast and torch."""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from fault_setup import cannot_set_up

pytestmark = pytest.mark.slow

DS = "2026-01-01"
SID = f"sum-{DS}"


@contextmanager
def _small_mounts(sizes: dict[Path, str]) -> Iterator[list[Path]]:
    """A tmpfs of ``size`` (``64m``) on each folder, all unmounted at exit, also when a later mount fails.

    A mount that fails skips the test (fails it under CI: ``fault_setup.cannot_set_up``).
    """
    mounted: list[Path] = []
    try:
        for folder, size in sizes.items():
            folder.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                cannot_set_up(f"cannot mount a size-limited tmpfs on {folder} (needs root and CAP_SYS_ADMIN): "
                              f"{done.stderr.strip()}")
            mounted.append(folder)
        yield mounted
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path, leave_bytes: int) -> Path:
    """A filler file that leaves ``leave_bytes`` free on ``folder``'s filesystem."""
    st = os.statvfs(folder)
    filler = folder / ".filler"
    with open(filler, "wb") as fh:
        fh.truncate(0)
        remaining = st.f_bavail * st.f_frsize - leave_bytes
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            fh.write(chunk[: min(remaining, len(chunk))])
            remaining -= len(chunk)
    return filler


@pytest.fixture()
def ctx(tmp_path, monkeypatch):
    """A workspace whose DVC remote and snapshots folder are 64 MiB tmpfs mounts (unmounted afterwards)."""
    with _small_mounts({tmp_path / "remote": "64m", tmp_path / "ws" / "snapshots": "64m"}) as mounted:
        monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "ws"))
        monkeypatch.setenv("SUM_DVC_REMOTE", str(tmp_path / "remote"))
        from sum_platform.context import context
        from sum_platform.versioning import init_workspace_repo

        c = context()
        assert c.ws.snapshot_dir(SID).parent == mounted[1]
        init_workspace_repo(c.ws.root, c.params.dvc_remote)
        yield c


def _git_log(ctx) -> str:
    return subprocess.run(["git", "log", "--format=%s"], cwd=ctx.ws.root, capture_output=True, text=True,
                          check=True).stdout


def test_a_full_disk_fails_the_task_clearly_keeps_nothing_half_written_and_the_rerun_succeeds(ctx):
    from sum_pipeline import tasks
    from sum_pipeline.doctor import diagnose
    from sum_pipeline.promotion import promote_snapshot
    from sum_platform.versioning import VersioningError, production_snapshot

    remote, snapshots = Path(ctx.params.dvc_remote), ctx.ws.snapshot_dir(SID).parent
    tasks.ingest(DS)
    tasks.validate_data(DS)

    # 1. Versioning the day's partitions with the remote full: `dvc push` fails, nothing is committed.
    filler = _fill(remote, 16 * 1024)
    with pytest.raises(VersioningError) as err:
        tasks.version_data(DS)
    message = str(err.value)
    assert message.startswith(f"no space left on device versioning data/events/ds={DS}"), message
    assert "`dvc push`" in message and str(remote) in message and "MiB free" in message, message
    assert ctx.day(DS).read("data_version") is None
    assert f"partitions of {DS}" not in _git_log(ctx)
    filler.unlink()
    versioned = tasks.version_data(DS)
    assert f"partitions of {DS}" in _git_log(ctx) and set(versioned["versions"]) == {
        f"data/events/ds={DS}", f"data/users/ds={DS}"}

    # 2. Exporting the candidate with the snapshots folder full: no snapshot, no temporary folder, no candidate.
    filler = _fill(snapshots, 256 * 1024)
    with pytest.raises(OSError) as err:
        tasks.train_user_model(DS)
    assert err.value.errno == errno.ENOSPC
    assert f"no space left on device exporting snapshot {SID}" in str(err.value) and str(snapshots) in str(err.value)
    assert sorted(p.name for p in snapshots.iterdir()) == [".filler"]
    assert ctx.registry.get(SID) is None
    filler.unlink()
    trained = tasks.train_user_model(DS)
    assert trained["snapshot_id"] == SID and ctx.registry.get(SID).stage == "candidate"
    ctx.registry.record_verdict(SID, True, {"blessed": True, "verdict": "blessed"})

    # 3. Promoting it with the remote full: no GTO tag, no production; the registry keeps the candidate.
    filler = _fill(remote, 16 * 1024)
    with pytest.raises(VersioningError, match=f"no space left on device versioning snapshots/{SID}"):
        promote_snapshot(ctx, SID, actor="test", reason="daily")
    assert ctx.registry.production() is None and ctx.registry.get(SID).stage == "candidate"
    tags = subprocess.run(["git", "tag"], cwd=ctx.ws.root, capture_output=True, text=True, check=True).stdout
    assert tags.strip() == "" and f"snapshot {SID}" not in _git_log(ctx).lower()  # no GTO tag, no snapshot commit
    filler.unlink()
    promote_snapshot(ctx, SID, actor="test", reason="daily")
    assert ctx.registry.production().snapshot_id == SID == production_snapshot(ctx.ws.root)

    report = diagnose(ctx, serving=False)
    assert report.healthy, report.findings
    assert report.checked["registry"]["promoted"] == 1 and report.checked["manifests"] == 1


@pytest.mark.parametrize("required", [False, True])
def test_a_failed_second_mount_leaves_no_mount_and_skips_or_under_ci_fails(tmp_path, monkeypatch, required):
    """The setup itself: the first tmpfs is unmounted when the second cannot be mounted (a size tmpfs refuses)."""
    first, second = tmp_path / "first", tmp_path / "second"
    with _small_mounts({tmp_path / "probe": "1m"}):
        pass  # a machine that cannot mount at all skips (fails under CI) here, before the interesting part
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("SUM_REQUIRE_ALL_TESTS", "1" if required else "0")
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match=f"cannot mount a size-limited tmpfs on {second}"):
        with _small_mounts({first: "1m", second: "not-a-size"}):
            raise AssertionError("unreachable: the second mount fails")
    assert not os.path.ismount(first) and not os.path.ismount(second)
