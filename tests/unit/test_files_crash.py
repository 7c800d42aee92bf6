"""A partition replace killed by a real SIGKILL at every step of it: the path holds exactly the old content or the
new one, never none and never a mix, and the next write succeeds and leaves no stray sibling. Both swaps are
driven: the atomic exchange (``renameat2``) and the rename-aside fallback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sum_models import atomic
from sum_platform.files import write_json, write_partition

#: Runs in a child process: replaces the partition at argv[1] with the frame of argv[2] (JSON rows); the hook
#: SIGKILLs the process at the step named argv[3] ("" = none), and prints each step it passes.
CHILD = """
import json, os, signal, sys
import pandas as pd
from sum_models import atomic
from sum_platform.files import write_partition

folder, rows, stop, exchange = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
atomic.USE_EXCHANGE = exchange

def hook(step):
    print(step, flush=True)
    if step == stop:
        os.kill(os.getpid(), signal.SIGKILL)

atomic.STEP_HOOK = hook
write_partition(pd.DataFrame(rows), folder)
"""

OLD = {"user_id": [1, 2, 3], "age": [20, 30, 40]}
NEW = {"user_id": [7, 8], "age": [50, 60]}


def _run(folder: Path, rows: dict, stop: str, exchange: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(folder), json.dumps(rows), stop, "1" if exchange else "0"],
                          capture_output=True, text=True, timeout=120)


def _content(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _reference(tmp_path: Path, rows: dict, name: str) -> dict[str, bytes]:
    import pandas as pd

    ref = tmp_path / name
    write_partition(pd.DataFrame(rows), ref)
    return _content(ref)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_a_partition_replace_killed_at_every_step_leaves_old_or_new_and_the_next_write_cleans_up(tmp_path, exchange):
    import pandas as pd

    old, new = _reference(tmp_path, OLD, "ref-old"), _reference(tmp_path, NEW, "ref-new")
    assert old != new
    data = tmp_path / "data" / "users"
    folder = data / "ds=2026-01-02"
    done = _run(folder, OLD, "", exchange)
    assert done.returncode == 0, done.stderr
    assert _content(folder) == old
    steps = _run(folder, NEW, "", exchange).stdout.split()  # every step a replace passes, in order
    assert _content(folder) == new
    expected = ["written", "synced", "exchanged", "exchange-synced", "old-removed"] if exchange else \
        ["written", "synced", "aside", "renamed-in", "rename-synced", "old-removed"]
    assert steps == expected, steps

    for step in steps:
        write_partition(pd.DataFrame(OLD), folder)
        killed = _run(folder, NEW, step, exchange)
        assert killed.returncode == -signal.SIGKILL, (step, killed.returncode, killed.stderr)
        assert killed.stdout.split()[-1] == step
        if folder.exists():
            assert _content(folder) in (old, new), step
            after_swap = steps.index(step) >= steps.index("renamed-in" if not exchange else "exchanged")
            assert _content(folder) == (new if after_swap else old), step
        else:  # only the fallback's instant between its two renames; the next replace restores the old content
            assert not exchange and step == "aside", step
            atomic.recover(folder)
            assert _content(folder) == old, step
        leftovers = [p.name for p in data.iterdir() if p.name != folder.name]
        write_partition(pd.DataFrame(NEW), folder)  # the next write succeeds and removes the dead writer's siblings
        assert _content(folder) == new, step
        assert [p.name for p in data.iterdir()] == [folder.name], (step, leftovers)


def test_a_live_writers_temporary_is_not_cleaned_by_another_replace(tmp_path):
    path = tmp_path / "runs" / "gate.json"
    write_json(path, {"v": 1})
    live = atomic.temp_sibling(path)  # this process's own, in flight
    live.write_text("in flight")
    write_json(path, {"v": 2})
    assert live.read_text() == "in flight"
    live.unlink()
    dead = path.with_name(f".{path.name}.999999999-0123abcd.tmp")  # no such process
    dead.write_text("left by a killed writer")
    write_json(path, {"v": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["gate.json"]
    assert json.loads(path.read_text()) == {"v": 3}
