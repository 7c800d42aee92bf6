"""Every benchmark of ``benchmarks/`` runs to its end in its ``--smoke`` mode, so a change that breaks one fails here.

A smoke run uses small sizes and measures nothing worth reading: the tests check that each benchmark reached its
report, with every section in it. The benchmarks that need no service of their own run in this process (the
session's imports, params and, for scale_bench's engines, the session's Ray from ``ray_serve``); the two that
bring up a stack or their own Ray Serve with an HTTP proxy (stack_bench, serving_bench) run as the documented
command, in a process of their own. The two that bring up a stack keep its workspace in the session's folder
(``--workdir``): a stack a failed run leaves up is stopped at the session's end (tests/conftest.py).
consumer_check_bench's measurement runs on a day the soak already ran (tests/integration/test_soak.py): its own
three days would repeat the soak's first three.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ne_days, scale_bench, train_bench, validation_bench

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _command(module: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<module> --smoke ...`` as documented, outside the session's params and workspace."""
    env = {k: v for k, v in os.environ.items() if k not in ("SUM_PARAMS", "SUM_WORKSPACE")}
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--smoke", *args], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_train_bench(tmp_path):
    out = tmp_path / "train.json"
    results = train_bench.main(["--smoke", "--json", str(out)])
    compact = results["presets"]["compact"]
    assert compact["steps"] == 3 and compact["examples_per_second"] > 0 and 0 < compact["mfu"]
    assert set(compact["inference"]) >= {"unbatched_users_per_second", "batched_users_per_second", "speedup"}
    assert results["paper_scale"]["flops_per_user"] > 0
    assert json.loads(out.read_text())["presets"]["compact"]["batch_size"] == 64


def test_ne_days(tmp_path):
    out = tmp_path / "ne.json"
    rows = ne_days.main(["--smoke", "--json", str(out)])
    assert [r["model"] for r in rows] == ["compact", "logistic_regression"]
    assert all(r["train_rows"] > 0 and "click" in r["holdout_ne"] and "click" in r["next_day_ne"] for r in rows)
    assert json.loads(out.read_text()) == rows


def test_validation_bench(tmp_path):
    before = {k: os.environ.get(k) for k in ("SUM_PARAMS", "SUM_WORKSPACE")}
    rows = validation_bench.main(["--smoke", "--json", str(tmp_path / "validation.json")])
    assert [r["users"] for r in rows] == [validation_bench.SMOKE_USERS] and rows[0]["events"] > 0
    assert rows[0]["cold_s"] > 0 and "warm_s" not in rows[0]  # --smoke validates once
    assert {k: os.environ.get(k) for k in before} == before  # the session's params and workspace in force again


def test_scale_bench(tmp_path, monkeypatch, ray_serve, session_dir):
    """One small day through a stack of the scale profile, then the engines on the session's Ray."""
    import ray

    monkeypatch.setenv("SUM_PARAMS", os.environ["SUM_PARAMS"])  # the benchmark points it at its own; restored
    monkeypatch.delenv("SUM_WORKSPACE")  # its params name their workspace, as when run from a shell
    report = scale_bench.main(["--smoke", "--json", str(tmp_path / "scale.json"),
                               "--workdir", str(session_dir / "benchmarks")])
    [day] = report["days"]
    assert day["impressions"] == scale_bench.SMOKE_IMPRESSIONS and len(day["verdicts"]) == 1
    assert day["tasks"] and all(seconds > 0 for seconds in day["tasks"].values())
    assert report["training"]["rows"] > 0 and report["training"]["ray_train_2x1_ex_s"] > 0
    assert report["batch_embeddings"]["users"] > 0 and report["batch_embeddings"]["ray_data_users_s"] > 0
    assert set(report["online_stores"]) == {"sqlite", "redis"}
    assert (tmp_path / "scale.png").is_file() and json.loads((tmp_path / "scale.json").read_text())["cpus"]
    assert ray.is_initialized()  # the session's Ray, used and left running


def test_stack_bench(tmp_path, session_dir):
    out = tmp_path / "stack.json"
    _command("stack_bench", "--json", str(out), "--workdir", str(session_dir / "benchmarks"), timeout_s=1500)
    results = json.loads(out.read_text())
    [day] = results["days"]
    assert day["inline_s"] > 0 and day["scheduler_s"] > 0 and day["tasks_run"] > 0
    assert set(results["floors"]) == {"fork_s", "python_start_s", "task_sdk_import_s"}


def test_serving_bench(tmp_path):
    out = tmp_path / "serving.json"
    port = int(os.environ["SUM_TEST_PORT"]) + 40  # clear of the session's and the stacks' ports
    _command("serving_bench", "--port", str(port), "--json", str(out), timeout_s=1500)
    report = json.loads(out.read_text())
    measured = {(c["size"], c["concurrency"], c["path"]) for c in report["cells"]}
    assert {(s, c, p) for s in ("1x", "10x") for c in (1, 8) for p in ("floor", "noop", "offline", "async",
                                                                          "realtime")} <= measured
    assert ("1x", 8, "async/own-cpu") in measured
    assert set(report["write_back"]) >= {"batched", "unbatched", "serve_batch", "store_one_call"}
    assert report["ratios"] and report["in_process"]["async"]["n"] == 50
