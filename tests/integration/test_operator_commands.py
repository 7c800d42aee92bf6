"""The commands an operator or a data scientist types, run as they type them (subprocesses of the venv's tools):
``dvc repro`` (each stage a ``sumctl stage`` call) and ``sumctl calibrate``.

``sumctl run`` (the README's first command) runs in the deployed-stack scenario, on that stack
(tests/integration/test_deployed_stack.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REPRO_STAGES = ["ingest", "validate_data", "version_data", "train_user_model", "evaluate", "check_consumers",
                "shift_gate"]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> dict:
    """The project's committed files in a git repository of their own (``dvc repro`` writes dvc.lock and
    reports/ into the project it runs in: never into this checkout), with a workspace and remote of their own."""
    root = tmp_path_factory.mktemp("repro")
    proj = root / "project"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = PROJECT_ROOT / rel
        if src.is_file():
            (proj / rel).parent.mkdir(parents=True, exist_ok=True)
            (proj / rel).write_bytes(src.read_bytes())
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run([*git, *args], cwd=proj, check=True, capture_output=True)
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        "SUM_WORKSPACE": str(root / "workspace"), "SUM_DVC_REMOTE": str(root / "remote")}
    return {"root": root, "project": proj, "env": env}


@pytest.fixture(scope="module")
def repro(project_copy) -> dict:
    proj, env = project_copy["project"], project_copy["env"]
    first = _run([str(BIN / "dvc"), "repro", "shift_gate"], proj, env)
    lock_after_first = (proj / "dvc.lock").read_text()
    again = _run([str(BIN / "dvc"), "repro", "shift_gate"], proj, env)
    return {"first": first, "again": again, "lock": lock_after_first, **project_copy}


def test_dvc_repro_runs_the_daily_stages_through_sumctl_stage(repro):
    from sum_platform.config import load_params

    proj = repro["project"]
    ds = load_params().repro.ds
    summaries = {name: json.loads((proj / "reports" / "stages" / f"{name}.json").read_text()) for name in REPRO_STAGES}
    assert summaries["ingest"]["ds"] == ds and summaries["ingest"]["events"] > 0
    # The first date has no production to compare with: the gate blesses it without a baseline.
    assert summaries["shift_gate"]["blessed"] is True and summaries["shift_gate"]["baseline_snapshot_id"] is None
    assert set(summaries["evaluate"]["ne"]) == {"click", "conversion"}
    assert 0 < summaries["evaluate"]["ne"]["click"] < 1  # better than predicting the base rate
    # The stages left their artifacts in the workspace: the day's partitions tracked by DVC and pushed, a snapshot.
    ws = Path(repro["env"]["SUM_WORKSPACE"])
    tracked = subprocess.run(["git", "ls-files"], cwd=ws, capture_output=True, text=True, check=True).stdout.split()
    assert f"data/events/ds={ds}.dvc" in tracked and f"data/users/ds={ds}.dvc" in tracked
    assert (ws / "snapshots" / f"sum-{ds}").is_dir()
    assert any(Path(repro["env"]["SUM_DVC_REMOTE"]).rglob("*")), "nothing was pushed to the remote"
    lock = repro["lock"]
    assert all(f"  {name}:" in lock for name in REPRO_STAGES)


def test_dvc_repro_again_reruns_nothing(repro):
    out = repro["again"].stdout + repro["again"].stderr
    assert "Running stage" not in out, out[-2000:]
    assert (repro["project"] / "dvc.lock").read_text() == repro["lock"]


def test_dvc_metrics_show_reads_the_evaluation(repro):
    done = _run([str(BIN / "dvc"), "metrics", "show", "--json"], repro["project"], repro["env"])
    metrics = json.loads(done.stdout)
    values = json.dumps(metrics)
    evaluate = json.loads((repro["project"] / "reports" / "stages" / "evaluate.json").read_text())
    assert f"{evaluate['ne']['click']}" in values


def test_calibrate_measures_each_day_against_the_days_before(tmp_path):
    from sum_platform.config import load_params
    from sum_platform.simulate import simulate_day

    out = tmp_path / "days.csv"
    done = _run([str(BIN / "sumctl"), "calibrate", "--days", "4", "--csv", str(out)], tmp_path, dict(os.environ))
    assert "3 days measured against their trailing days" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert [r["ds"] for r in rows] == ["2026-01-02", "2026-01-03", "2026-01-04"]
    # Day 2's row-count ratio is its rows over day 1's (the only trailing day): read from the simulator itself.
    params = load_params()
    day1, _ = simulate_day("2026-01-01", params)
    day2, _ = simulate_day("2026-01-02", params)
    assert float(rows[0]["events.rows_ratio"]) == pytest.approx(len(day2) / len(day1))
    # Normal simulated days sit inside the thresholds in force (what calibration is for): each printed
    # "observed extreme" of a ratio check lies between the min and max ratio bounds.
    v = params.validation
    ratios = [float(r["events.rows_ratio"]) for r in rows]
    assert all(v.row_count_min_ratio <= x <= v.row_count_max_ratio for x in ratios)
    assert f"{max(ratios):.4g}" in done.stdout


def test_calibrate_gate_trains_and_judges_each_day_and_prints_every_check_against_its_threshold(tmp_path):
    """`sumctl calibrate --gate`: the daily loop in one process on the source's first days; every check's observed
    range printed next to the threshold in force and the margin, every day's check in the CSV."""
    out = tmp_path / "gate.csv"
    done = _run([str(BIN / "sumctl"), "calibrate", "--gate", "--days", "3", "--csv", str(out)], tmp_path,
                dict(os.environ))
    assert "the snapshot gate on 3 days (3 blessed)" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert {r["ds"] for r in rows} == {"2026-01-01", "2026-01-02", "2026-01-03"}
    checks = {r["check"] for r in rows}
    assert {"ne.click", "embedding_0.cosine_across_users", "embedding_0.mean_cosine",
            "embedding_1.pooled_relative_l2_change"} <= checks
    # The first day has no production: no shift, no regression; the later days have both.
    first = {r["check"] for r in rows if r["ds"] == "2026-01-01"}
    assert "embedding_0.mean_cosine" not in first and "ne_regression.click" not in first
    cosines = [float(r["value"]) for r in rows if r["check"].endswith(".mean_cosine")
               and not r["check"].endswith("pooled_mean_cosine")]
    low = f"{min(cosines):.4g}"
    line = next(x for x in done.stdout.splitlines() if "embedding_k.mean_cosine" in x and "pooled" not in x)
    assert low in line and ">= 0.5" in line
    # The consumers: day 1's promotion trains them with nothing served (day 2 cannot use them: not measurable),
    # day 2's with what was served; day 3's candidate is scored on them, in the summary next to its threshold.
    click = {r["ds"]: r for r in rows if r["check"] == "consumer.click.ne_change_pct"}
    assert "2026-01-01" not in click and click["2026-01-02"]["outcome"] == "not_measurable", click
    assert click["2026-01-03"]["outcome"] == "pass" and click["2026-01-03"]["value"], click
    line = next(x for x in done.stdout.splitlines() if "consumer.click.ne_change_pct" in x)
    assert f"{float(click['2026-01-03']['value']):.4g}" in line and "<= 1" in line
