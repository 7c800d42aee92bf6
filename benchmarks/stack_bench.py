"""A simulated day through the deployed stack's scheduler against ``sumctl run --inline`` (not a test).

Both modes run the same dates from an empty workspace of their own, in this one invocation: ``--inline``
runs each date with ``dag.test()`` in one process (every module imported once, the floor of the DAG's own
work), the stack runs it through Airflow's scheduler, one process per task (forked from a LocalExecutor
worker that preloaded the tasks' modules, ``airflow_settings/airflow_local_settings.py``). It prints each
day's wall time in both modes and their ratio (target: scheduler <= 1.3x inline), the stack's per-task
overhead (the tasks' own run time in both modes, the scheduler's wait from a task's end to the next one's
queueing, queued -> running, and the whole gap spread over the tasks), and the physical floors of a
task process: a bare ``fork()``, a bare interpreter start, and an interpreter importing the Task SDK.

Run::

    .venv/bin/python -m benchmarks.stack_bench --days 2 --json reports/stack_bench.json
    .venv/bin/python -m benchmarks.stack_bench --smoke      # one small day per mode: runs to its end, measures nothing

``--workdir``: the folder of its workspaces, params and reports (default: a new temporary folder; the test session
passes one of its own, so that its end stops a stack a failed run left up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from sum_platform.config import PROJECT_ROOT

SUMCTL = str(Path(sys.executable).with_name("sumctl"))
PORT_OFFSET = 100  # the benchmark's stack must not meet a stack the operator runs on the default ports


SMOKE_USERS = 150  # the smoke run's simulated day (about 2,000 impressions)
APPROVAL_TIMEOUT_MINUTES = 0.5  # a held candidate must not stall the benchmark for an hour
# --smoke: its small day's candidate is usually held (NE above gate.max_ne on so few rows); the smoke proves the
# run reaches its end, not how long a human may take, so the approval times out after seconds.
SMOKE_APPROVAL_TIMEOUT_MINUTES = 0.05


def _params(root: Path, name: str, days: int, users: int | None = None,
            approval_timeout_minutes: float = APPROVAL_TIMEOUT_MINUTES) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    if users is not None:
        raw["simulator"].update({"initial_users": users, "new_users_per_day": max(users // 15, 1)})
    raw["paths"] = {"workspace": str(root / name / "workspace"), "dvc_remote": str(root / name / "remote")}
    raw["serving"]["port"] += PORT_OFFSET
    raw["airflow"]["port"] += PORT_OFFSET
    raw["ray"]["gcs_port"] += PORT_OFFSET
    raw["ray"]["dashboard_port"] += PORT_OFFSET
    # Only the runs the benchmark creates: no catch-up, and no scheduled run past its last date.
    last = date.fromisoformat(raw["airflow"]["start_date"]) + timedelta(days=days - 1)
    raw["airflow"].update({"end_date": last.isoformat(), "catchup": False})
    raw["airflow"]["approval_timeout_minutes"] = approval_timeout_minutes
    # The same work in both modes: `dag.test()` runs no downstream DAG, so the stack's promotion triggers none either.
    raw["downstream"]["retrain_on_promotion"] = False
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sumctl(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([SUMCTL, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={k: v for k, v in os.environ.items() if k not in ("SUM_WORKSPACE", "SUM_PARAMS")})
    return time.perf_counter() - t0


def _median_seconds(argv: list[str], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fork_seconds(repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _breakdown(task_instances: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Where a day's time went: the tasks' own run time, and (the daily DAG is one chain) the scheduler's
    wait between a task's end and the next task's queueing, and the executor's from queued to started."""
    ran = sorted((ti for ti in task_instances.values() if ti.get("state") == "success" and ti.get("start_date")),
                 key=lambda ti: ti["start_date"])
    waits, starts, prev_end = [], [], None
    for ti in ran:
        queued, started = _ts(ti.get("queued_when")), _ts(ti["start_date"])
        if queued and prev_end:
            waits.append(max((queued - prev_end).total_seconds(), 0.0))
        if queued:
            starts.append((started - queued).total_seconds())
        prev_end = _ts(ti.get("end_date"))
    return {"tasks_run": len(ran), "task_s": sum(float(ti.get("duration") or 0) for ti in ran),
            "end_to_queued_s": sum(waits), "queued_to_start_s": statistics.mean(starts) if starts else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=2, help="consecutive simulated days per mode")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--smoke", action="store_true",
                    help=f"one day of {SMOKE_USERS} simulated users per mode, floors measured once: proves the "
                         f"benchmark runs to its end (tests/integration/test_benchmarks_smoke.py), measures nothing")
    ap.add_argument("--workdir", type=Path, help="folder of its workspaces and reports (default: a new temporary one)")
    args = ap.parse_args(argv)
    users, repeat = (SMOKE_USERS, 1) if args.smoke else (None, 5)
    approval = SMOKE_APPROVAL_TIMEOUT_MINUTES if args.smoke else APPROVAL_TIMEOUT_MINUTES
    if args.smoke:
        args.days = 1
    console = Console()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="sum-stack-bench-", dir=args.workdir))
    inline_params = _params(root, "inline", args.days, users, approval)
    stack_params = _params(root, "stack", args.days, users, approval)

    floors = {
        "fork_s": _fork_seconds(repeat=4 * repeat),
        "python_start_s": _median_seconds([sys.executable, "-c", "pass"], repeat=repeat),
        "task_sdk_import_s": _median_seconds([sys.executable, "-c", "import airflow.sdk"], repeat=min(repeat, 3)),
    }
    with console.status("inline: dag.test() per date"):
        inline_total = _sumctl("run", "--inline", "--days", str(args.days), "--params", str(inline_params),
                               "--report", str(root / "inline.json"))
    with console.status("stack: sumctl up"):
        up_s = _sumctl("up", "--params", str(stack_params))
    try:
        with console.status("stack: the scheduler per date"):
            stack_total = _sumctl("run", "--days", str(args.days), "--params", str(stack_params),
                                  "--report", str(root / "stack.json"))
    finally:
        with console.status("stack: sumctl down"):
            down_s = _sumctl("down", "--params", str(stack_params))

    inline = json.loads((root / "inline.json").read_text())
    stack = json.loads((root / "stack.json").read_text())
    table = Table(title=f"A simulated day: scheduler vs inline ({args.days} days, {os.cpu_count()} CPUs)")
    for col in ("date", "inline s", "scheduler s", "ratio", "tasks", "task time s (inline)",
                "end->queued s (sum)", "queued->start s/task", "gap s/task"):
        table.add_column(col, justify="right")
    days = []
    for irow, srow in zip(inline["rows"], stack["rows"]):
        over = _breakdown(stack["task_instances"][srow["ds"]])
        inline_task_s = _breakdown(inline["task_instances"][irow["ds"]])["task_s"]
        gap = (srow["seconds"] - irow["seconds"]) / max(over["tasks_run"], 1)
        day = {"ds": srow["ds"], "inline_s": irow["seconds"], "scheduler_s": srow["seconds"],
               "ratio": srow["seconds"] / irow["seconds"], "gap_per_task_s": gap, "inline_task_s": inline_task_s,
               **over}
        days.append(day)
        table.add_row(day["ds"], f"{day['inline_s']:.1f}", f"{day['scheduler_s']:.1f}", f"{day['ratio']:.2f}x",
                      str(over["tasks_run"]), f"{over['task_s']:.1f} ({inline_task_s:.1f})",
                      f"{over['end_to_queued_s']:.1f}", f"{over['queued_to_start_s']:.2f}", f"{gap:.2f}")
    console.print(table)
    console.print(f"floors per task process: fork {floors['fork_s'] * 1e3:.1f} ms, python start "
                  f"{floors['python_start_s']:.2f} s, python + Task SDK import {floors['task_sdk_import_s']:.2f} s")
    console.print(f"stack up {up_s:.0f} s, down {down_s:.0f} s; totals: inline {inline_total:.0f} s (one process, "
                  f"its own Ray), scheduler {stack_total:.0f} s")
    last = days[-1]
    verdict = "meets" if last["ratio"] <= 1.3 else "misses"
    console.print(f"last (warm) day: scheduler {last['ratio']:.2f}x inline - {verdict} the 1.3x target")
    results = {"days": days, "floors": floors, "up_s": up_s, "down_s": down_s, "inline_total_s": inline_total,
               "stack_total_s": stack_total}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.smoke:  # its workspaces hold nothing to look at later
        shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
