"""A git lock is stale only when it is old *and* no git works in the repository (a slow git keeps its lock)."""

from __future__ import annotations

import os
import subprocess
import time

from sum_platform import versioning as v


def test_an_old_lock_is_kept_while_a_git_runs_in_the_repository(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    lock = tmp_path / ".git" / "index.lock"
    lock.write_text("")
    old = time.time() - 2 * v.STALE_GIT_LOCK_SECONDS
    os.utime(lock, (old, old))
    output = f"fatal: Unable to create '{lock}': File exists."
    # A long-lived git in the repository (waits on its stdin) stands for a slow one holding the lock.
    slow = subprocess.Popen(["git", "cat-file", "--batch"], cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        assert v._git_lock_to_clear(tmp_path, output) is None
    finally:
        slow.communicate(input=b"")
    assert v._git_lock_to_clear(tmp_path, output) == lock
    young = time.time()
    os.utime(lock, (young, young))
    assert v._git_lock_to_clear(tmp_path, output) is None  # young: a live git's, whatever runs
