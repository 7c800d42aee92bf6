"""How long the data gate takes on a day of growing size (not a test; numbers depend on the machine).

For each size, a simulated day (``--users`` initial users, the simulator's other settings as in params.yaml)
is ingested into an empty workspace of its own and validated twice with ``tasks.validate_data``, as the DAG's
``validate_data`` task does: the first run creates the GX project, its suites and Data Docs (cold), the second
finds them (warm, a rerun). Prints events, seconds and events/s of each run. Target (the speed that used to
be asserted in a data test): a day of 10k events validates within 15 s, warm.

Run::

    .venv/bin/python -m benchmarks.validation_bench --users 700,7000 --json reports/validation_bench.json
    .venv/bin/python -m benchmarks.validation_bench --smoke    # one small day validated once, no target
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sum_pipeline import tasks
from sum_platform.config import params_path

DS = "2026-01-01"
TARGET_EVENTS, TARGET_S = 10_000, 15.0
SMOKE_USERS = 100


def measure(users: int, root: Path, warm: bool = True) -> dict[str, Any]:
    """Ingests a day of ``users`` initial users into a workspace under ``root`` and times its validation
    (cold, then warm unless ``warm`` is false)."""
    raw = yaml.safe_load(params_path().read_text())
    raw["simulator"]["initial_users"] = users
    raw["paths"] = {"workspace": str(root / "workspace"), "dvc_remote": str(root / "dvc-remote")}
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    saved = {k: os.environ.get(k) for k in ("SUM_PARAMS", "SUM_WORKSPACE")}
    os.environ["SUM_PARAMS"] = str(params_file)
    os.environ.pop("SUM_WORKSPACE", None)
    try:
        tasks.ingest(DS)
        runs = []
        for _ in range(2 if warm else 1):
            t0 = time.perf_counter()
            result = tasks.validate_data(DS)
            runs.append(time.perf_counter() - t0)
            if not result["success"]:
                raise RuntimeError(f"the simulated day of {users} users failed validation: {result}")
        events = len(pd.read_parquet(Path(raw["paths"]["workspace"]) / "data" / "events" / f"ds={DS}"))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    row = {"users": users, "events": events, "cold_s": round(runs[0], 2)}
    if warm:
        row |= {"warm_s": round(runs[1], 2), "warm_events_per_s": round(events / runs[1])}
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=lambda s: [int(x) for x in s.split(",")], default=[700, 7000],
                    help="comma-separated initial users per day (x 0.7 active x 20 impressions = events)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"one day of {SMOKE_USERS} users validated once, no target check: proves the benchmark "
                         f"runs to its end (tests/integration/test_benchmarks_smoke.py)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    sizes = [SMOKE_USERS] if args.smoke else args.users
    rows = []
    with tempfile.TemporaryDirectory(prefix="sum-validation-bench-") as tmp:
        for users in sizes:
            root = Path(tmp) / f"users-{users}"
            root.mkdir()
            rows.append(measure(users, root, warm=not args.smoke))
            print(json.dumps(rows[-1]), flush=True)
    if not args.smoke:
        at_target = [r for r in rows if r["events"] >= TARGET_EVENTS]
        for r in at_target:
            print(f"{r['events']} events validated warm in {r['warm_s']} s: target {TARGET_S:.0f} s for "
                  f"{TARGET_EVENTS} events {'met' if r['warm_s'] <= TARGET_S * r['events'] / TARGET_EVENTS else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
