"""The whole daily loop as deployed: `sumctl`'s stack (a token-authenticated Ray head serving SOAP, Airflow's
api-server, scheduler with LocalExecutor, dag-processor and triggerer, each its own process) runs the real DAG
for seven runs driven over the REST API, with real GX, torch, Feast, Ray Serve over HTTP and DVC:
promotion and serving after the task processes have exited, a promotion triggering the downstream models' DAG
through its asset, a task process killed with SIGKILL and retried,
a Clear-style rerun, a candidate held by its downstream models (the consumer check) and approved from Required
Actions through the HITL endpoint, one left to time out, and a
corrupted partition stopping the run at validation while production, the online store and serving stay
unchanged. Then an operator's `sumctl rollback`, the UI in Debian's Chromium, and `sumctl down`.

One ordered scenario, not independent tests: the module is the life of one stack (module-scoped fixtures bring it
up and drive the seven runs once), and its tests are the scenario's steps in file order. Each step starts from the
state the steps before it left (the doctor's check expects the production the operator's rollback left; the fault
steps rely on each other's `sumctl up` recovery; the last step stops the stack and writes the faults' report), so
run the module as a whole, never one of its tests alone or reordered (README, Tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from fault_setup import cannot_set_up
from params_env import params_in_force
from serving.rollout import served_snapshot_id, served_version
from sum_pipeline import driver
from sum_pipeline.airflow_api import AirflowClient, run_result
from sum_pipeline.airflow_env import DAG_ID
from sum_pipeline.stack import AIRFLOW_COMPONENTS, Stack
from sum_platform.context import context
from sum_platform.files import write_partition
from sum_platform.simulate import simulate_day
from sum_platform.workspace import Workspace

pytestmark = pytest.mark.slow

DAY1, DAY2, DAY3, DAY4, DAY5, DAY6, DAY7 = (f"2026-01-0{i}" for i in range(1, 8))
WATCHED_USERS = list(range(1, 41))  # user 0 is the one verify_serving reads (and so recomputes)
KILLED_TASK = "rollout"  # retries once: killed mid-rollout, the retry must reach the same end state
PROJECT_ROOT = Path(__file__).resolve().parents[2]
REMOTE_MOUNT: dict = {}  # why the DVC remote could not get a filesystem of its own, if it could not
SUMCTL = str(Path(sys.executable).with_name("sumctl"))


@pytest.fixture(scope="module")
def stack_params(session_dir: Path):
    """A params file of the stack's own: its ports, a workspace, a short approval timeout, the test's dates."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    port = int(os.environ["SUM_TEST_PORT"])
    raw["paths"] = {"workspace": "stack-workspace", "dvc_remote": "stack-dvc-remote"}
    # The DVC remote on a filesystem of its own (512 MiB tmpfs; the full-disk fault fills it), when this may mount.
    remote = session_dir / "stack-dvc-remote"
    remote.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs", str(remote)],
                             capture_output=True, text=True)
    raw["serving"].update({"port": port + 1, "ray_address": "stack"})
    # No catch-up: the test creates each date's run itself, one at a time, with its conf (the scheduler's
    # latest interval lies past end_date, so it adds no run of its own).
    raw["airflow"].update({"port": port + 2, "end_date": DAY7, "catchup": False, "approval_timeout_minutes": 0.5,
                           "retry_delay_seconds": 3, "dag_poll_seconds": 1})
    raw["ray"].update({"gcs_port": port + 3, "dashboard_port": port + 4, "client_server_port": port + 6})
    # `sumctl run` (DAY1) would unpause sum_downstream; the test unpauses it for DAY2 only (see `runs`).
    raw["downstream"]["retrain_on_promotion"] = False
    # The scale-out layout as deployed: Redis as the online store (a component of the stack), a second Ray node
    # holding one of the two compute replicas, training on 2 Ray Train workers, the batch embeddings on Ray Data.
    raw["profile"] = ["redis"]
    raw["feature_store"]["redis"]["port"] = port + 5
    raw["ray"]["worker_nodes"] = 1
    raw["serving"]["compute_replicas"] = 2
    raw["train"]["workers"] = 2
    raw["inference"]["engine"] = "ray_data"
    with params_in_force(raw, session_dir / "stack-params.yaml") as params:
        REMOTE_MOUNT["error"] = mounted.stderr.strip() if mounted.returncode else None
        yield params
    if not mounted.returncode:
        subprocess.run(["umount", "-l", str(remote)], capture_output=True)


def _sumctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([SUMCTL, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"sumctl {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def stack(stack_params):
    """`sumctl up` (as an operator runs it), then `sumctl up` again; stopped by the last test (or here)."""
    t0 = time.monotonic()
    first = _sumctl("up")
    up_seconds = time.monotonic() - t0
    second = _sumctl("up")
    s = Stack(stack_params, Workspace(stack_params.workspace))
    yield {"stack": s, "up_seconds": up_seconds, "first": first.stdout, "second": second.stdout,
           "pids": {c.name: c.pid for c in s.status()}}
    if s.live_processes():
        s.down()


@pytest.fixture(scope="module")
def client(stack):
    s = stack["stack"]
    with AirflowClient(s.airflow_url, "admin", s.airflow_password(), timeout=120) as c:
        yield c


def _kill_when_running(client: AirflowClient, run_id: str, task_id: str, out: dict, stop: threading.Event) -> None:
    """SIGKILLs the rollout's task process (its pid as the API reports it) once its log says it is deploying.

    Keyed on the log line, not on a delay: on a fast machine the whole rollout takes about 2 s.
    """
    while not stop.is_set():
        try:
            ti = client.task_instances(DAG_ID, run_id).get(task_id) or {}
            deploying = (ti.get("state") == "running" and ti.get("pid")
                         and "deploying sum-" in client.task_log(DAG_ID, run_id, task_id, int(ti["try_number"])))
        except Exception:  # noqa: BLE001 - a busy API server, or no log yet: ask again
            deploying = False
        if deploying:
            try:
                proc = psutil.Process(int(ti["pid"]))
                out["killed"] = {"pid": proc.pid, "cmdline": proc.cmdline()}
                proc.send_signal(signal.SIGKILL)
            except psutil.Error as exc:
                out["kill_error"] = repr(exc)
            return
        time.sleep(0.2)


def _kill_scheduler_during(s: Stack, task_id: str, log_line: str):
    """A helper for :func:`_drive`: SIGKILLs the scheduler's process (alone, as the OOM killer would) once
    ``task_id``'s log shows ``log_line`` (keyed on the task's own progress, not on a delay: the kill lands while
    the work runs, however fast the machine), then runs `sumctl up` as an operator would three seconds later."""
    def helper(client: AirflowClient, run_id: str, out: dict, stop: threading.Event) -> None:
        def ti() -> dict:
            try:
                return client.task_instances(DAG_ID, run_id).get(task_id) or {}
            except Exception:  # noqa: BLE001 - a busy API server: ask again
                return {}

        def state() -> str | None:
            return ti().get("state")

        def logged() -> bool:
            now = ti()
            try:
                return now.get("state") == "running" and log_line in client.task_log(
                    DAG_ID, run_id, task_id, int(now["try_number"]))
            except Exception:  # noqa: BLE001 - a busy API server, or no log yet: ask again
                return False

        while not stop.is_set() and not logged():
            time.sleep(0.2)
        if stop.is_set():
            return
        scheduler = s._states()["scheduler"]
        at_kill = ti()
        out["killed"] = {"pid": scheduler.pid, "task_state": at_kill.get("state"), "try": at_kill.get("try_number")}
        os.kill(scheduler.pid, signal.SIGKILL)
        out["killed_at"] = time.monotonic()
        time.sleep(3)
        done = _sumctl("up", check=False)
        restarted = s._states()["scheduler"]
        out["up"] = {"returncode": done.returncode, "stdout": done.stdout[-2000:] + done.stderr[-2000:],
                     "seconds": time.monotonic() - out["killed_at"], "pid": restarted.pid,
                     "leftovers": restarted.leftovers, "task_state": state()}
    return helper


def _doctor() -> dict:
    """`sumctl doctor --json` from a shell: its report, with the exit code."""
    done = _sumctl("doctor", "--json", check=False)
    return json.loads(done.stdout[done.stdout.index("{"):]) | {"returncode": done.returncode}


HUMAN_DELAY_S = 5  # an operator reads the verdict before answering; see _answer_when_awaiting


def _answer_when_awaiting(client: AirflowClient, run_id: str, out: dict, stop: threading.Event) -> None:
    """Approves the run's held candidate through the HITL endpoint, as an operator in the UI would.

    Not within a second of the task parking: Airflow 3.3's scheduler fails a HITL task answered before it
    processed the executor's event of the parked workload (same try number; the re-queued task is taken
    for one whose state changed externally: scheduler_job_runner.py, _process_executor_events). No human
    answers that fast; the test waits as one would.
    """
    seen: float | None = None
    while not stop.is_set():
        try:
            state = (client.task_instances(DAG_ID, run_id).get("approve_held") or {}).get("state")
        except Exception:  # noqa: BLE001
            state = None
        if state == "awaiting_input" and seen is None:
            seen = time.monotonic()
        if state == "awaiting_input" and time.monotonic() - seen >= HUMAN_DELAY_S:
            # What the approver reads first: the UI's Required Actions list (the same endpoint), with its body.
            out["pending"] = [a for a in client.pending_approvals(DAG_ID)
                              if run_id in ((a.get("task_instance") or {}).get("dag_run_id"),
                                            (a.get("task_instance") or {}).get("run_id"))]
            out["response"] = client.respond(DAG_ID, run_id, "approve_held", ["Approve"],
                                             {"reason": "drill: downstream team accepts the shift"})
            return
        time.sleep(0.5)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def _drive(client, ds, faults=None, helper=None, consumers=()):
    stop = threading.Event()
    side: dict = {}
    thread = None
    if helper is not None:
        run_id = driver.run_id_for(ds)
        thread = threading.Thread(target=helper, args=(client, run_id, side, stop), daemon=True)
    t0 = time.monotonic()
    try:
        if thread is not None:
            thread.start()
        [result] = driver.drive(client, [ds], faults or {}, poll_s=1, consumers=consumers)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=10)
    return result, side, time.monotonic() - t0


DOWNSTREAM_DAG = "sum_downstream"


def _result_of(client, ds: str):
    """The finished run of ``ds`` read back over the REST API, as ``driver.drive`` returns it."""
    run_id = driver.find_run(client, ds)["dag_run_id"]
    result = run_result(client, DAG_ID, run_id, ds)
    result.run_id, result.task_instances = run_id, client.task_instances(DAG_ID, run_id)
    return result


def _finished_run(client, dag_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [r for r in client.dag_runs(dag_id) if r["state"] in ("success", "failed")]
        if done:
            return done[0]
        time.sleep(2)
    raise AssertionError(f"no finished {dag_id} run within {timeout_s:.0f} s: {client.dag_runs(dag_id)}")


@pytest.fixture(scope="module")
def runs(stack, client, stack_params, stored_rows):
    """Seven runs through the scheduler; after each, what the registry, the server and the store say."""
    params = stack_params
    ctx = context()
    out: dict = {"seconds": {}}

    def observe(key: str) -> None:
        out[f"{key}/production"] = ctx.registry.production().snapshot_id if ctx.registry.production() else None
        out[f"{key}/served"] = served_snapshot_id(params)

    # DAY1 as the README's first command, from a shell: `sumctl run` (exit 0, its table, its --report), then the
    # run read back over the REST API.
    report = stack_params.workspace.parent / "sumctl-run-day1.json"
    t0 = time.monotonic()
    out["sumctl_run"] = _sumctl("run", "--start", DAY1, "--days", "1", "--report", str(report))
    out["seconds"][DAY1] = time.monotonic() - t0
    out["sumctl_run/report"] = json.loads(report.read_text())
    out[DAY1] = _result_of(client, DAY1)
    observe(DAY1)
    # DAY2 as an operator backfills a date from a shell: `airflow backfill create` on the stack's metadata DB;
    # the driver finds the backfill's run by its logical date and follows it.
    s = stack["stack"]
    out["backfill"] = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "backfill", "create", "--dag-id", DAG_ID,
         "--from-date", DAY2, "--to-date", DAY2], env=s.airflow_env(s.database_url()), capture_output=True,
        text=True, timeout=300)
    # DAY2's promotion also triggers sum_downstream through the asset (unpaused for this day only, so that no
    # other day's run shares the two cores with it).
    out[DAY2], _, out["seconds"][DAY2] = _drive(client, DAY2, consumers=(DOWNSTREAM_DAG,))
    observe(DAY2)
    out["downstream"] = _finished_run(client, DOWNSTREAM_DAG, timeout_s=600)
    client.pause(DOWNSTREAM_DAG)
    out["downstream/xcoms"] = client.xcoms(DOWNSTREAM_DAG, out["downstream"]["dag_run_id"])
    # DAY3: the rollout's task process is SIGKILLed mid-run; its retry must finish the day.
    out[DAY3], out["kill"], out["seconds"][DAY3] = _drive(
        client, DAY3, helper=lambda c, r, o, e: _kill_when_running(c, r, KILLED_TASK, o, e))
    observe(DAY3)
    out["store_day3"] = stored_rows(WATCHED_USERS)

    # Rerun DAY3 (the production snapshot's date) as Clear in the UI does, and SIGKILL the scheduler process
    # while train_user_model runs; `sumctl up` restarts it: the same end state as the undisturbed first run.
    out["rerun/before"] = ctx.registry.get(f"sum-{DAY3}")
    out["rerun"], out["scheduler_kill"], out["seconds"]["rerun"] = _drive(
        client, DAY3, helper=_kill_scheduler_during(s, "train_user_model", "training on 2 Ray Train workers"))
    if "killed_at" in out["scheduler_kill"]:
        out["scheduler_kill"]["run_done_after_kill_s"] = time.monotonic() - out["scheduler_kill"]["killed_at"]
    out["rerun/after"] = ctx.registry.get(f"sum-{DAY3}")
    observe("rerun")
    out["doctor/scheduler_kill"] = _doctor()

    # DAY4: a candidate whose embeddings are 20x as large (the `scale` drill) is held by its consumers (DAY2's
    # downstream models, trained on what serving handed out); an operator reads what each consumer would lose in
    # Required Actions and approves it through the HITL endpoint.
    out[DAY4], out["approval"], out["seconds"][DAY4] = _drive(
        client, DAY4, {DAY4: "scale"}, helper=_answer_when_awaiting)
    observe(DAY4)
    ti = out[DAY4].task_instances.get("approve_held") or {}
    if ti.get("state") != "success":  # keep the evidence: the session's folder is gone after the run
        try:
            out["approval_log"] = client.task_log(DAG_ID, out[DAY4].run_id, "approve_held", int(ti.get("try_number") or 1))
        except Exception as exc:  # noqa: BLE001
            out["approval_log"] = repr(exc)
    # DAY5: held again, and nobody answers: the approval times out into held.
    out[DAY5], _, out["seconds"][DAY5] = _drive(client, DAY5, {DAY5: "nan"})
    observe(DAY5)

    # DAY6: the partition arrives corrupted (click labels outside {0, 1}).
    before = stored_rows(WATCHED_USERS)
    events, users = simulate_day(DAY6, params)
    events.loc[events.index[:25], "click"] = 2
    write_partition(events, ctx.ws.events_dir(DAY6))
    write_partition(users, ctx.ws.users_dir(DAY6))
    out["delivered"] = {kind: _digests(folder) for kind, folder in
                        (("events", ctx.ws.events_dir(DAY6)), ("users", ctx.ws.users_dir(DAY6)))}
    out[DAY6], _, out["seconds"][DAY6] = _drive(client, DAY6)
    observe(DAY6)
    out["store_before"], out["store_after"] = before, stored_rows(WATCHED_USERS)
    out["ctx"] = ctx
    print(f"stack up {stack['up_seconds']:.0f}s; run seconds {json.dumps({k: round(v) for k, v in out['seconds'].items()})}")
    return out


def test_up_starts_every_component_once_on_loopback_with_a_login(stack, client):
    s = stack["stack"]
    assert all(c.running for c in s.status()), s.status()
    assert "(started " not in stack["second"], stack["second"]  # `up` names what it started; the second: nothing
    assert {c.name: c.pid for c in s.status()} == stack["pids"]  # the second `up` started nothing new
    assert s.airflow_url.startswith("http://127.0.0.1:")
    import httpx

    assert httpx.get(f"{s.airflow_url}/api/v2/dags", timeout=30).status_code == 401  # no login, no API
    assert client.dag(DAG_ID)["dag_id"] == DAG_ID
    token = Path(s.token_path)
    assert token.stat().st_mode & 0o777 == 0o600
    listeners = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    # (SOAP's port listens once a snapshot is served: the ingress replica is the server; checked after the runs.)
    for port in (s.params.airflow.port, s.params.ray.dashboard_port, s.params.feature_store.redis.port):
        assert any(p == port for _, p in listeners), port
        assert all(ip == "127.0.0.1" for ip, p in listeners if p == port), (port, listeners)
    # Every listener of Airflow's components (and of their children: no task-log server) is on loopback.
    airflow_pids = set()
    for c in s.status():
        if c.name in AIRFLOW_COMPONENTS:
            proc = psutil.Process(c.pid)
            airflow_pids |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
    airflow_listeners = {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("tcp")
                         if c.status == "LISTEN" and c.pid in airflow_pids}
    assert {ip for ip, _, _ in airflow_listeners} == {"127.0.0.1"}, airflow_listeners
    # Redis (the online store) answers nobody without the generated password.
    import redis

    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=s.params.feature_store.redis.port).ping()
    assert [c.name for c in s.status()] == ["redis", "ray", "ray-worker-1", *AIRFLOW_COMPONENTS]


def test_status_reports_each_component_and_where_the_password_is_not_the_password(stack):
    s = stack["stack"]
    done = _sumctl("status")
    for name in ("redis", "ray", "ray-worker-1", "api-server", "scheduler", "dag-processor", "triggerer"):
        assert name in done.stdout
    printed = " ".join(done.stdout.split())  # rich folds long lines
    assert s.passwords_file.name in printed and "--show-password" in printed
    hidden = s.airflow_password() not in done.stdout  # (a bool: an assertion message must not carry the secret)
    assert hidden, "sumctl status printed the Airflow password"
    shown = s.airflow_password() in _sumctl("status", "--show-password", check=False).stdout  # (no output on failure)
    assert shown, "sumctl status --show-password did not print the Airflow password"


def test_a_ray_client_without_the_token_is_refused(stack, tmp_path):
    s = stack["stack"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    code = ("import ray\nfrom serving.ray_cluster import keep_loopback\nkeep_loopback()\n"
            "try:\n    ray.init(address=%r)\nexcept Exception as e:\n    print('REFUSED', type(e).__name__, e)\n"
            "else:\n    print('ADMITTED')\n") % s.ray_address
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED" in done.stdout, (done.stdout[-2000:], done.stderr[-2000:])
    assert "ADMITTED" not in done.stdout
    assert "auth" in (done.stdout + done.stderr).lower()
    # The dashboard (its Jobs API submits code to the cluster): the token or nothing.
    import httpx

    for path in ("/api/jobs/", "/api/v0/actors", "/nodes?view=summary"):
        assert httpx.get(f"{s.ray_dashboard}{path}", timeout=30).status_code == 401, path


def test_first_day_is_promoted_by_rubber_stamp(runs):
    r = runs[DAY1]
    assert r.ok, r.task_states
    assert r.xcoms["shift_gate.verdict"]["verdict"] == "blessed"
    rec = runs["ctx"].registry.get("sum-2026-01-01")
    assert rec.stage in ("production", "retired")
    verdict = rec.record["verdict"]
    assert verdict["blessed"] and verdict["baseline_snapshot_id"] is None
    assert any("first snapshot" in reason for reason in verdict["reasons"])
    validated = r.xcoms["validate_data"]  # GX Data Docs built; the trailing checks wait for a history
    assert validated["success"] and Path(validated["data_docs"]).is_file()
    assert any("no validated day before" in line for line in validated["skipped"]["events"])
    assert runs[f"{DAY1}/production"] == "sum-2026-01-01"


def test_sumctl_run_prints_the_days_table_and_its_report(runs):
    """The README's first command on one day: exit 0 (checked by _sumctl), a table row that says what happened."""
    stdout = runs["sumctl_run"].stdout
    assert "SUM daily runs" in stdout, stdout[-3000:]
    [row] = [line for line in stdout.splitlines() if line.startswith(f"│ {DAY1} ")]
    cells = [c.strip() for c in row.strip("│").split("│")]
    date_, rows, validation, ne_click, ne_conv, *shift, verdict, served, _seconds = cells
    assert (date_, validation, verdict, served) == (DAY1, "passed", "blessed", f"sum-{DAY1}"), cells
    assert int(rows) > 1000 and 0 < float(ne_click) < 2 and 0 < float(ne_conv) < 2
    assert set(shift) == {"-"}  # the first snapshot has no baseline to shift from
    [reported] = runs["sumctl_run/report"]["rows"]
    assert reported["state"] == "success" and reported["served"] == f"sum-{DAY1}" and reported["rows"] == int(rows)
    assert runs[DAY1].run_id == driver.run_id_for(DAY1)  # the run it created, read back


def test_a_promotion_triggers_the_downstream_models_retraining(runs):
    run, xcoms = runs["downstream"], runs["downstream/xcoms"]
    assert run["state"] == "success" and run["run_type"] == "asset_triggered", run
    # The days come with the asset events: every promotion since the DAG's previous run (DAY1's happened while
    # it was still paused), retrained in date order.
    assert xcoms["promoted_days"] == [DAY1, DAY2]
    first, second = xcoms["training_frames"]
    assert first["coverage"] == 0.0  # nothing was served before the first day's batch
    assert second["rows"] > 1000 and second["coverage"] > 0.5  # DAY1's batch served DAY2's users
    days = {d["ds"]: d["models"] for d in xcoms["retrain"]}
    assert set(days) == {DAY1, DAY2} and set(days[DAY2]) == {"click", "conversion", "inbox"}
    for name, m in days[DAY2].items():  # scored on DAY2 before training on it, warm-started from DAY1
        assert m["warm_start_with_sum"] == DAY1 and 0 < m["ne_with_sum"] < 2 and 0 < m["ne_without_sum"] < 2, name


def test_a_backfill_created_from_the_cli_runs_through_the_scheduler(runs):
    done = runs["backfill"]
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    r = runs[DAY2]
    assert r.run_id.startswith("backfill__"), r.run_id  # the backfill's own run, not one the driver made
    assert r.ok, r.task_states
    assert runs[f"{DAY2}/production"] == runs[f"{DAY2}/served"] == f"sum-{DAY2}"


def test_served_snapshot_follows_each_promotion(runs, stack):
    for ds in (DAY1, DAY2, DAY3):
        assert runs[ds].ok, (ds, runs[ds].task_states)
        assert runs[f"{ds}/production"] == f"sum-{ds}"
        assert runs[f"{ds}/served"] == runs[f"{ds}/production"]
    # The SOAP ingress replica is the HTTP listener of the read path: on loopback only, no Serve proxy anywhere.
    port = stack["stack"].params.serving.port
    listeners = {(c.laddr.ip, c.pid) for c in psutil.net_connections("tcp")
                 if c.status == "LISTEN" and c.laddr.port == port}
    assert listeners and {ip for ip, _ in listeners} == {"127.0.0.1"}, listeners
    assert all("SoapIngress" in " ".join(psutil.Process(pid).cmdline()) for _, pid in listeners), listeners


def test_normal_days_have_shift_numbers_within_thresholds(runs):
    gate = runs["ctx"].params.gate
    rec = runs["ctx"].registry.get(f"sum-{DAY2}")
    shift = rec.record["verdict"]["shift"]
    assert len(shift) == 2
    for m in shift:
        assert gate.min_mean_cosine <= m["mean_cosine"] <= 1.0
        assert 0.0 <= m["relative_l2_change"] <= gate.max_relative_l2_change
    ne = rec.record["evaluation"]["ne"]
    assert 0 < ne["click"] < 1.0


def test_online_store_holds_embeddings_for_the_users(runs):
    stored = runs["store_day3"]
    assert len(stored) == len(WATCHED_USERS)
    for user_id, row in stored.items():
        assert row["snapshot_id"] == f"sum-{DAY3}", (user_id, row["snapshot_id"])
        emb = np.asarray(row["embeddings"], dtype=np.float32)
        assert emb.shape == (2, 96) and np.isfinite(emb).all()


PLACEMENT_SCRIPT = """
import json, ray
from ray.util.state import list_actors, list_nodes
from serving.ray_cluster import keep_loopback
keep_loopback()  # the stack's head listens on 127.0.0.1 only
ray.init(address="auto", namespace="sum", log_to_driver=False)
head = {n.node_id for n in list_nodes() if n.is_head_node}
alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith("ServeReplica:")]
print(json.dumps({"head": sorted(head), "nodes": len([n for n in list_nodes() if n.state == "ALIVE"]),
                  "replicas": [[a.class_name.split(":")[-1], a.node_id] for a in alive],
                  "pids": [[a.class_name.split(":")[-1], a.pid] for a in alive]}))
"""


def _placement(stack) -> dict:
    """Where Serve's replicas run, asked of the stack's Ray from a process of its own (this one stays off Ray)."""
    s = stack["stack"]
    env = {**os.environ, **s.ray_env(), "RAY_ADDRESS": s.ray_address}
    done = subprocess.run([sys.executable, "-c", PLACEMENT_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _reading(params, clients: int = 8):
    """``clients`` threads reading the watched users' embeddings over HTTP until the block ends; yields the list
    of their status codes (-1: no answer)."""
    import httpx

    results: list[int] = []
    stop = threading.Event()

    def reader(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = 0
            while not stop.is_set():
                user = WATCHED_USERS[(i * 7 + n) % len(WATCHED_USERS)]
                try:
                    results.append(c.get(f"http://{params.serving.host}:{params.serving.port}/users/{user}/embeddings").status_code)
                except httpx.HTTPError:
                    results.append(-1)
                n += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def _compute_replicas(stack) -> set:
    """The nodes of the alive compute replicas (two replicas on one node count once)."""
    return {node for name, node in _placement(stack)["replicas"] if name == "ComputeCenter"}


def _health(params) -> dict:
    import httpx

    return httpx.get(f"http://{params.serving.host}:{params.serving.port}/healthz", timeout=30).json()


def test_training_and_batch_embeddings_ran_on_the_stacks_ray(runs):
    for ds in (DAY1, DAY2):
        assert runs[ds].xcoms["materialize_embeddings"]["engine"] == "ray_data"
        assert runs["ctx"].registry.get(f"sum-{ds}").record["train_workers"] == 2


def test_compute_runs_on_two_nodes_and_reads_survive_losing_the_worker_node(runs, stack):
    """Two compute replicas on two nodes, the ingress on the head; 8 clients read while the worker node's raylet
    is SIGKILLed: no read fails (they are answered from the store), write-backs go on through the head's replica;
    `sumctl up` brings the node back and Serve places the second replica on it again."""
    s, params = stack["stack"], stack["stack"].params
    placed = _placement(stack)
    compute_nodes = {node for name, node in placed["replicas"] if name == "ComputeCenter"}
    ingress_nodes = {node for name, node in placed["replicas"] if name == "SoapIngress"}
    assert placed["nodes"] == 2 and len(compute_nodes) == 2, placed
    assert ingress_nodes <= set(placed["head"]), placed
    before = _health(params)
    worker = s._states()["ray-worker-1"].process()
    raylet = next(p for p in worker.children(recursive=True) if "raylet" in p.name())
    with _reading(params) as results:
        time.sleep(3)
        raylet.send_signal(signal.SIGKILL)
        at_kill = _health(params)
        time.sleep(12)
    after = _health(params)
    assert results and set(results) == {200}, {code: results.count(code) for code in set(results)}
    # The write path goes on on the head's replica: recomputes scheduled after the kill are written back (calls
    # that were on the dead replica are counted failed, unless Serve re-routed them).
    assert after["compute_written"] > at_kill["compute_written"], (before, at_kill, after)
    assert after["compute_scheduled"] > at_kill["compute_scheduled"], (at_kill, after)
    # Only recomputes scheduled in the window can fail in it (a counter that grew otherwise is miscounting).
    failed = after["compute_failed"] - before["compute_failed"]
    assert 0 <= failed <= after["compute_scheduled"] - before["compute_scheduled"], (before, after)

    _sumctl("up")  # restarts whatever is not running: the worker node
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        placed = _placement(stack)
        if placed["nodes"] == 2 and len({n for name, n in placed["replicas"] if name == "ComputeCenter"}) == 2:
            break
        time.sleep(3)
    assert placed["nodes"] == 2 and len({n for name, n in placed["replicas"] if name == "ComputeCenter"}) == 2, placed
    assert served_version(params)["snapshot_id"] == runs["ctx"].registry.production().snapshot_id


def test_the_rollout_outlives_its_task_and_a_killed_task_is_retried_to_the_same_end(runs, stack):
    kill = runs["kill"]
    assert "killed" in kill, kill  # the helper found the running task process and killed it
    r = runs[DAY3]
    assert r.ok, r.task_states
    assert int(r.task_instances[KILLED_TASK]["try_number"]) == 2
    assert not psutil.pid_exists(kill["killed"]["pid"]) or psutil.Process(kill["killed"]["pid"]).status() == "zombie"
    assert runs[f"{DAY3}/production"] == runs[f"{DAY3}/served"] == f"sum-{DAY3}"
    # Every task process of the day has exited, and the stack's Ray still serves the registry's production.
    version = served_version(stack["stack"].params)
    assert version and version["snapshot_id"] == runs["ctx"].registry.production().snapshot_id


def test_verdict_is_in_the_run_note_and_on_the_user_tower_asset(runs, client):
    run = client.dag_run(DAG_ID, runs[DAY2].run_id)
    assert "blessed" in run["note"] and "sum-2026-01-02" in run["note"]
    held = client.dag_run(DAG_ID, driver.run_id_for(DAY5))
    assert "held" in held["note"]
    events = [e for e in client.asset_events(DAG_ID) if e.get("name") == "sum_user_tower"]
    by_snapshot = {e["extra"].get("snapshot_id"): e["extra"] for e in events if e.get("extra")}
    assert by_snapshot[f"sum-{DAY2}"]["verdict"] == "blessed"
    assert by_snapshot[f"sum-{DAY5}"]["verdict"] == "held"


def test_a_candidate_held_by_its_consumers_is_approved_from_required_actions_and_promoted_with_who_and_why(runs):
    r = runs[DAY4]
    assert r.ok, (r.task_states, runs.get("approval_log", "")[-4000:])
    assert runs["approval"].get("response"), runs["approval"]
    verdict = r.xcoms["shift_gate.verdict"]
    held_by = [c for c in verdict["consumers"] if c["outcome"] == "fail"]
    assert held_by and all(c["change_ci"][0] > 0 and c["model_day"] == DAY2 for c in held_by), verdict["consumers"]
    # The request Required Actions listed carried the consumer table: what each consumer would lose.
    [request] = runs["approval"]["pending"]  # the one request of this run in the list
    body = request["body"]
    assert "| consumer | NE now | NE after |" in body, body
    for c in held_by:
        row = next(line for line in body.splitlines() if line.startswith(f"| {c['consumer']} |"))
        assert row.endswith("| NO |") and f"{c['change_pct']:+.2f}" in row, row
    assert r.task_states["approve_held"] == "success"
    for downstream in ("promote", "materialize_embeddings", "rollout", "verify_serving"):
        assert r.task_states[downstream] == "success", (downstream, r.task_states)
    rec = runs["ctx"].registry.get(f"sum-{DAY4}")
    assert rec.record["verdict"]["verdict"] == "held"  # the gate's verdict stands in the lineage ...
    assert rec.promoted_by == "admin"  # ... next to who overrode it, and why
    last = [e for e in runs["ctx"].registry.events(f"sum-{DAY4}") if e["action"] == "promote"][-1]
    assert last["actor"] == "admin" and "downstream team accepts" in last["detail"]["reason"]
    assert runs[f"{DAY4}/production"] == runs[f"{DAY4}/served"] == f"sum-{DAY4}"


def test_an_unanswered_approval_times_out_into_held_and_production_stays(runs):
    r = runs[DAY5]
    assert r.state == "success", r.task_states  # a held snapshot is a verdict, not a failure
    assert r.task_states["shift_gate"] == "success"
    for downstream in ("promote", "materialize_embeddings", "rollout", "verify_serving"):
        assert r.task_states[downstream] == "skipped", (downstream, r.task_states)
    rec = runs["ctx"].registry.get(f"sum-{DAY5}")
    assert rec.stage == "held" and rec.record["verdict"]["verdict"] == "held"
    assert any("needs" in reason for reason in rec.record["verdict"]["reasons"]), rec.record["verdict"]["reasons"]
    # The NaN weight (the first row of an embedding table) makes the predictions of the impressions whose users hit
    # that row NaN: those rows are counted, NE is measured on the others, the verdict names them; no crashed task.
    evaluation = rec.record["evaluation"]
    bad = evaluation["nonfinite"]["candidate"]["count"]
    assert 0 < bad and evaluation["scored_rows"] == evaluation["holdout_rows"] - bad, evaluation
    assert all(v is not None for v in evaluation["ne"].values()), evaluation
    assert any(f"{bad} holdout row(s) give the candidate NaN/inf predictions" in r
               for r in rec.record["verdict"]["reasons"]), rec.record["verdict"]["reasons"]
    assert rec.promoted_by is None
    assert runs[f"{DAY5}/production"] == runs[f"{DAY5}/served"] == runs[f"{DAY4}/production"]


def test_corrupted_partition_stops_at_validation_and_changes_nothing(runs):
    r = runs[DAY6]
    assert r.state == "failed"
    assert r.task_states["validate_data"] == "failed"
    assert r.task_states["train_user_model"] in ("upstream_failed", "skipped")
    assert runs["ctx"].registry.get(f"sum-{DAY6}") is None
    assert runs[f"{DAY6}/production"] == runs[f"{DAY6}/served"] == runs[f"{DAY4}/production"]
    assert runs["store_after"] == runs["store_before"]
    # The day's record names the check that failed: labels outside {0, 1} in the events partition only.
    validation = runs["ctx"].day(DAY6).validation
    assert validation["success"] is False and set(validation["failed_checks"]) == {"events"}
    assert any("expect_column_values_to_be_in_set(click)" in line for line in validation["failed_checks"]["events"])
    assert "Quarantined to:" in validation["error"] and Path(validation["data_docs"]).is_file()
    # Quarantined, not deleted: the partitions as delivered, byte for byte, with the failed check as reason.
    from validation.quarantine import quarantined

    ws = runs["ctx"].ws
    assert not ws.events_dir(DAY6).exists() and not ws.users_dir(DAY6).exists()
    [record] = quarantined(ws, DAY6)
    folder = Path(record["folder"])
    assert validation["quarantine"] == str(folder) and record["status"] == "quarantined"
    assert any("expect_column_values_to_be_in_set(click)" in line for line in record["reason"]["failed_checks"]["events"])
    assert {kind: _digests(folder / kind) for kind in ("events", "users")} == runs["delivered"]


def test_rerunning_a_promoted_date_gives_the_same_end_state(runs):
    before, after = runs["rerun/before"], runs["rerun/after"]
    assert runs["rerun"].ok, runs["rerun"].task_states
    assert runs["rerun"].run_id == runs[DAY3].run_id  # the same run, cleared
    assert after.stage == "production" and runs["rerun/production"] == f"sum-{DAY3}"
    assert runs["rerun/served"] == f"sum-{DAY3}"
    assert after.parent_id == before.parent_id == f"sum-{DAY2}"
    # Deterministic training from the same parent on the same data: the same weights, NE and shift.
    assert after.record["weights_sha256"] == before.record["weights_sha256"]
    manifest = json.loads((runs["ctx"].ws.snapshot_dir(f"sum-{DAY3}") / "manifest.json").read_text())
    assert manifest["sha256"]["user_tower.safetensors"] == before.record["weights_sha256"]["user_tower.safetensors"]
    assert after.record["evaluation"]["ne"] == before.record["evaluation"]["ne"]
    assert after.record["verdict"]["shift"] == before.record["verdict"]["shift"]
    assert after.record["data_version"] == before.record["data_version"]


def test_a_scheduler_killed_during_training_is_restarted_by_up_and_the_run_ends_as_undisturbed(runs, stack):
    """The scheduler's process SIGKILLed while train_user_model runs (the rerun above): `sumctl up` starts a new
    scheduler, stops the dead one's idle executor workers and leaves the one running the training to finish (it
    reports to the API server); the run completes with the end state of the undisturbed run (the test above),
    and `sumctl doctor` is green."""
    kill, up = runs["scheduler_kill"], runs["scheduler_kill"].get("up", {})
    assert kill.get("killed", {}).get("task_state") == "running", kill
    assert up.get("returncode") == 0 and "scheduler" in up["stdout"], up
    assert up["pid"] != kill["killed"]["pid"]
    # Still running when the new scheduler started: its executor worker was left to finish it (and the same try
    # ended it: not retried), then stopped by `down` (the last test checks every pid the stack knows of).
    if up["task_state"] == "running":
        assert up["leftovers"], up
        assert int(runs["rerun"].task_instances["train_user_model"]["try_number"]) == int(kill["killed"]["try"])
    assert runs["rerun"].ok, runs["rerun"].task_states
    report = runs["doctor/scheduler_kill"]
    FAULTS["scheduler SIGKILLed during train_user_model, then `sumctl up`"] = {
        "failed reads": 0, "train try at kill": kill["killed"]["try"],
        "train try at end": int(runs["rerun"].task_instances["train_user_model"]["try_number"]),
        "recover_s": round(up["seconds"], 1), "run_done_after_kill_s": round(kill["run_done_after_kill_s"], 1),
        "left to finish": len(up["leftovers"]), "task at up": up["task_state"],  # which branch above ran
        "doctor after": report["healthy"]}
    assert report["returncode"] == 0 and report["healthy"], report["findings"]


def test_promoted_snapshots_are_tagged_and_restorable_with_dvc(runs, tmp_path):
    from sum_platform.versioning import restore_snapshot, tag_for_snapshot

    ws = runs["ctx"].ws
    tag = tag_for_snapshot(ws.root, f"sum-{DAY2}")
    assert tag
    tags = subprocess.run(["git", "tag"], cwd=ws.root, capture_output=True, text=True, check=True).stdout
    assert tag in tags
    restored = restore_snapshot(ws.root, f"sum-{DAY2}", tmp_path / "restored")
    original = ws.snapshot_dir(f"sum-{DAY2}") / "user_tower.safetensors"
    assert (restored / "user_tower.safetensors").read_bytes() == original.read_bytes()


def test_the_ui_shows_the_runs_and_their_verdicts_in_a_real_browser(runs, stack, client):
    """Debian's Chromium (Playwright): login required, the grid's run states, the verdict in each run's note,
    the gate's XCom table and the user-tower asset event; screenshots under reports/ui/."""
    import httpx

    import ui_browser  # tests/integration/ui_browser.py (this folder is on sys.path, as for conftest)

    s = stack["stack"]
    url, password = s.airflow_url, s.airflow_password()
    shown_runs = {runs[ds].run_id: ds for ds in (DAY2, DAY5, DAY6)}
    expected = {run_id: client.dag_run(DAG_ID, run_id)["state"] for run_id in shown_runs}
    assert expected == {runs[DAY2].run_id: "success", runs[DAY5].run_id: "success",
                        runs[DAY6].run_id: "failed"}
    assert httpx.get(f"{url}/api/v2/dags/{DAG_ID}/dagRuns", timeout=30,
                     headers={"Authorization": "Bearer not-a-token"}).status_code in (401, 403)
    with ui_browser.open_browser() as page:
        page.goto(f"{url}/dags/{DAG_ID}")
        page.wait_for_url("**/auth/login?next=**")
        ui_browser.screenshot(page, "login.png")
        with pytest.raises(ui_browser.UIError, match="Invalid credentials"):
            ui_browser.login(page, url, "admin", password + "-wrong")
        ui_browser.login(page, url, "admin", password)
        assert ui_browser.run_states(page, url, DAG_ID, list(shown_runs), screenshot_prefix="grid") == expected
        for run_id, ds in shown_runs.items():
            note = client.dag_run(DAG_ID, run_id)["note"]
            if ds == DAY6:  # stopped at validation: no verdict, the note names the failed task
                assert ui_browser.open_run(page, url, DAG_ID, run_id) == expected[run_id]
                shown_note = ui_browser.open_run_note(page, url, DAG_ID, run_id, opened=True)
                ui_browser.screenshot(page, f"verdict-{ds}-note.png")
                ui_browser.close_dialog(page)
                assert ui_browser.shows_text(shown_note, note), (run_id, shown_note, note)
                continue
            asset = "sum_user_tower" if ds == DAY2 else None
            shown = ui_browser.open_verdict(page, url, DAG_ID, run_id, asset_name=asset,
                                            screenshot_prefix=f"verdict-{ds}")
            assert shown["run_state"] == expected[run_id], (run_id, shown)
            assert ui_browser.shows_text(shown["note"], note), (run_id, shown["note"], note)
            table = runs[ds].xcoms["shift_gate.verdict_table"]
            assert ui_browser.shows_text(shown["xcom"], table), (run_id, shown["xcom"])
            if asset:
                assert "blessed" in shown["asset_event"].lower() and f"sum-{DAY2}" in shown["asset_event"]
    for name in ("login.png", *(f"grid-{r}.png" for r in shown_runs), f"verdict-{DAY2}-note.png"):
        assert (ui_browser.SCREENSHOT_DIR / name).stat().st_size > 10_000, name


def test_operator_rollback_returns_the_previous_production_and_rerolls_the_stack(runs):
    """`sumctl rollback` from a shell, as an operator runs it: production and the stack's server go back."""
    from sum_platform.versioning import production_snapshot

    ctx = runs["ctx"]
    done = _sumctl("rollback", "--reason", "bad downstream metrics", "--actor", "operator-x")
    out = json.loads(done.stdout[done.stdout.index("{"):])
    current, previous = runs[f"{DAY6}/production"], f"sum-{DAY3}"
    assert current == f"sum-{DAY4}"  # the approved candidate
    assert (out["from"], out["to"]) == (current, previous)
    assert ctx.registry.production().snapshot_id == previous
    assert ctx.registry.get(current).stage == "retired"
    assert served_snapshot_id(ctx.params) == previous
    assert production_snapshot(ctx.ws.root) == previous
    last = ctx.registry.events(previous)[-1]
    assert last["action"] == "promote" and last["actor"] == "operator-x"
    assert "rollback from" in last["detail"]["reason"]


def test_doctor_finds_registry_tags_remote_store_and_serving_in_agreement(runs):
    """After every run, approval, rejection, quarantine and rollback above: `sumctl doctor` from a shell is green."""
    done = _sumctl("doctor", "--json", check=False)
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert done.returncode == 0 and report["healthy"], report["findings"]
    checked = report["checked"]
    assert checked["registry"]["promoted"] >= 4 and checked["manifests"] == checked["registry"]["promoted"]
    assert checked["online_store"]["rows"] > 0 and checked["serving"]["snapshot_id"] == f"sum-{DAY3}"


def _files(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_fresh_and_soak_refuse_the_live_stacks_workspace_and_change_no_file(runs, stack):
    """`sumctl run --fresh` and `sumctl soak` (with and without --fresh) pointed at the deployed stack's workspace,
    which holds promotions: each refuses naming them and the running stack, and changes no file. The stack's own
    folders (`stack/`, `airflow/`: logs, heartbeats, Ray's session) change by themselves while it runs: of those,
    the stack's state, token and secrets (the files directly in `stack/`) are compared."""
    s = stack["stack"]
    root, remote = s.ws.root, Path(s.params.dvc_remote)
    live = ("stack", "airflow")

    def still() -> dict[str, str]:
        """Every file of the remote and of the workspace outside its live folders (path -> sha256)."""
        return _files(remote) | {f: h for f, h in _files(root).items() if Path(f).relative_to(root).parts[0] not in live}

    def state() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in s.dir.iterdir() if p.is_file()}

    before, before_state = still(), state()
    assert str(s.ws.registry_db) in before and "stack.json" in before_state
    assert any(f.startswith(f"{remote}/files/") for f in before)  # the promoted snapshots' only other copy
    for argv in (["run", "--days", "1", "--fresh"], ["run", "--days", "1", "--fresh", "--demo"],
                 ["soak", "--days", "3", "--workspace", str(root)], ["soak", "--days", "3", "--fresh", "--workspace", str(root)]):
        done = _sumctl(*argv, check=False)
        text = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 2, (argv, text[-3000:])
        assert str(root) in text and "promotions (production sum-" in text and "GTO promotion tags" in text, text
        assert "a running stack: " in text and ("--force-wipe" in text) == ("--fresh" in argv), text
    assert still() == before
    assert state() == before_state
    assert s.is_up(), s.status()


def _until(what: str, check, timeout_s: float, interval_s: float = 1.0):
    """Polls ``check`` until it returns something true; returns ``(value, seconds waited)``."""
    t0 = time.monotonic()
    while True:
        value = check()
        if value or time.monotonic() - t0 > timeout_s:
            break
        time.sleep(interval_s)
    assert value, f"no {what} within {timeout_s:.0f} s (last: {value!r})"
    return value, time.monotonic() - t0


FAULTS: dict[str, dict] = {}  # what each fault test observed: printed as a table by the last test


def test_a_compute_replica_killed_under_load_fails_no_read(runs, stack):
    """8 clients read while one of the two compute replicas is SIGKILLed: every read is answered (from the store),
    the recomputes on the dead replica are counted failed (lost, not retried: the next read schedules them again),
    Serve starts a new replica, and `sumctl doctor` stays green."""
    params = stack["stack"].params
    [victim, *_] = [pid for name, pid in _placement(stack)["pids"] if name == "ComputeCenter"]
    before = _health(params)
    with _reading(params) as results:
        time.sleep(3)
        psutil.Process(victim).send_signal(signal.SIGKILL)
        at_kill = _health(params)
        pids, recovered_s = _until("second compute replica", lambda: [
            pid for name, pid in _placement(stack)["pids"] if name == "ComputeCenter" and pid != victim][1:], 120)
        time.sleep(3)
    after = _health(params)
    codes = {code: results.count(code) for code in set(results)}
    FAULTS["compute replica SIGKILLed under load (8 clients)"] = {
        "reads": len(results), "failed reads": len(results) - codes.get(200, 0),
        "recomputes lost": after["compute_failed"] - before["compute_failed"],
        "recover_s": round(recovered_s, 1)}
    assert results and set(results) == {200}, codes
    assert victim not in pids
    assert after["compute_written"] > at_kill["compute_written"], (at_kill, after)
    report = _doctor()
    FAULTS["compute replica SIGKILLed under load (8 clients)"]["doctor after"] = report["healthy"]
    assert report["returncode"] == 0 and report["healthy"], report["findings"]


def test_the_ray_head_restarted_serves_production_and_frozen_again_after_up(runs, stack):
    """Every process of the Ray head SIGKILLed (a crash of its machine): serving is down; `sumctl up` alone starts a
    new head, restarts the worker node (joined to the dead one), and deploys the registry's production with the
    frozen snapshot; reads answer again and `sumctl doctor` is green."""
    import httpx

    from sum_pipeline.promotion import frozen_snapshot

    s, params, ctx = stack["stack"], stack["stack"].params, runs["ctx"]
    states = s._states()
    worker_node = psutil.Process(states["ray-worker-1"].pid)
    worker = {worker_node.pid, *(p.pid for p in worker_node.children(recursive=True))}
    head = [p for p in s._ray_processes(states) if p.pid not in worker]
    for p in head:
        p.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _until("serving down", lambda: served_version(params, timeout_s=2) is None, 30)
    before = _doctor()
    done = _sumctl("up")
    version, _ = _until("the production snapshot served", lambda: served_version(params), 120)
    recover_s = time.monotonic() - t0
    production = ctx.registry.production().snapshot_id
    assert version["snapshot_id"] == production, version
    assert version["frozen_snapshot_id"] == frozen_snapshot(ctx)[1] == f"sum-{DAY1}", version
    assert "ray" in done.stdout and "ray-worker-1" in done.stdout, done.stdout
    base = f"http://{params.serving.host}:{params.serving.port}"
    frozen = httpx.get(f"{base}/users/{WATCHED_USERS[0]}/embeddings", params={"mode": "frozen"}, timeout=60)
    assert frozen.status_code == 200 and frozen.json()["snapshot_id"] == f"sum-{DAY1}", frozen.text
    with _reading(params) as results:
        time.sleep(3)
    assert results and set(results) == {200}
    _until("two compute replicas on two nodes", lambda: len(_compute_replicas(stack)) == 2, 180)
    after = _doctor()
    FAULTS["Ray head SIGKILLed, then `sumctl up`"] = {
        "failed reads": "all, until up", "recover_s": round(recover_s, 1),
        "doctor before": before["healthy"], "doctor after": after["healthy"],
        "findings before": [f["component"] for f in before["findings"]]}
    assert after["returncode"] == 0 and after["healthy"], after["findings"]


def test_the_online_store_lost_is_named_by_doctor_and_rebuilt_while_serving(runs, stack, stored_rows):
    """Redis loses its data (FLUSHALL: an operator's slip, or a restart without its append-only file): reads answer
    404 (no stored value: the store cannot tell lost from unknown), `sumctl doctor` names the users the last daily
    batch wrote that have no row and prints `sumctl rebuild-online`; run as printed, every row comes back as it
    was (the offline log holds each row as written), reads answer 200 with no restart, and doctor is green."""
    from serving.store_io import redis_client
    from sum_platform.feature_store import get_store

    params = stack["stack"].params
    _until("no compute call in flight", lambda: _health(params)["compute_inflight"] == 0, 60, 0.2)
    before = stored_rows(WATCHED_USERS)
    redis_client(get_store(params).config.online_store.connection_string).flushall()
    t0 = time.monotonic()
    with _reading(params) as lost:
        time.sleep(2)
    report = _doctor()
    [finding] = [f for f in report["findings"] if f["component"] == "online_store"]
    assert "have no embeddings row" in finding["problem"] and "rebuild-online" in finding["repair"], finding
    _sumctl(*finding["repair"].split("#")[0].split()[1:])
    rebuilt_s = time.monotonic() - t0
    after = stored_rows(WATCHED_USERS)  # before any read: each read recomputes its user, rewriting the row's time
    with _reading(params) as results:
        time.sleep(2)
    doctor_after = _doctor()
    FAULTS["online store lost (Redis FLUSHALL), then `sumctl rebuild-online`"] = {
        "reads while lost": {code: lost.count(code) for code in set(lost)}, "rows lost": len(WATCHED_USERS),
        "rows back equal": sum(after.get(u) == row for u, row in before.items()), "recover_s": round(rebuilt_s, 1),
        "doctor before": report["healthy"], "doctor after": doctor_after["healthy"]}
    assert set(lost) == {404}, {code: lost.count(code) for code in set(lost)}
    assert after == before
    assert results and set(results) == {200}
    assert doctor_after["returncode"] == 0 and doctor_after["healthy"], doctor_after["findings"]


def test_a_full_remote_fails_the_day_at_versioning_and_the_cleared_run_completes(runs, stack, client):
    """DAY7 through the scheduler with the stack's DVC remote (its own tmpfs) filled to 16 KiB: `version_data` fails
    with `no space left on device` naming the remote, nothing of the day is versioned or trained; once space is
    back, the run cleared (as in the UI) completes, and `sumctl doctor` is green."""
    params, ctx = stack["stack"].params, runs["ctx"]
    if REMOTE_MOUNT.get("error"):
        cannot_set_up(f"no size-limited DVC remote here: {REMOTE_MOUNT['error']}")  # fails under CI
    remote = Path(params.dvc_remote)
    free = os.statvfs(remote).f_bavail * os.statvfs(remote).f_frsize
    filler = remote / ".filler"
    with open(filler, "wb") as fh:
        for _ in range((free - 16 * 1024) // (1 << 20)):
            fh.write(b"\0" * (1 << 20))
        fh.write(b"\0" * ((free - 16 * 1024) % (1 << 20)))
    t0 = time.monotonic()
    failed, _, _ = _drive(client, DAY7)
    ti = failed.task_instances["version_data"]
    log_text = client.task_log(DAG_ID, failed.run_id, "version_data", int(ti["try_number"]))
    assert failed.state == "failed" and failed.task_states["version_data"] == "failed", failed.task_states
    assert failed.task_states["train_user_model"] in ("upstream_failed", "skipped"), failed.task_states
    assert f"no space left on device versioning data/events/ds={DAY7}" in log_text and str(remote) in log_text
    assert ctx.day(DAY7).read("data_version") is None and ctx.registry.get(f"sum-{DAY7}") is None
    log = subprocess.run(["git", "log", "--format=%s"], cwd=ctx.ws.root, capture_output=True, text=True).stdout
    assert f"partitions of {DAY7}" not in log
    before = _doctor()
    filler.unlink()
    done, _, _ = _drive(client, DAY7)  # cleared and rerun, as Clear in the UI
    recover_s = time.monotonic() - t0
    assert done.state == "success" and done.task_states["version_data"] == "success", done.task_states
    assert done.run_id == failed.run_id
    after = _doctor()
    FAULTS["DVC remote full during DAY7's versioning, then space back and the run cleared"] = {
        "failed requests": 0, "task": "version_data failed: no space left on device", "versioned before": False,
        "recover_s (fault to rerun done)": round(recover_s, 1),
        "doctor before": before["healthy"], "doctor after": after["healthy"]}
    assert after["returncode"] == 0 and after["healthy"], after["findings"]


def _refused_without_the_token(port: int) -> bool:
    """Whether a Serve replica's inter-deployment gRPC server on ``port`` refuses a call that carries no token."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        try:
            call(b"", timeout=30)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_every_listening_socket_of_the_stack_is_on_loopback(runs, stack):
    """After the runs and the faults (a new Ray head, replicas moved, SOAP serving): every listening socket of every
    process of the stack (its components' trees and Ray's, found by `live_processes`: two Ray nodes with their
    GCS, raylets, agents, Ray Client server, metrics exporters, Serve's replicas, Airflow's components, Redis) is on
    127.0.0.1, and Ray's node IP is 127.0.0.1. One exception, which no setting of Ray 2.60 moves: each Serve
    replica's inter-deployment gRPC server binds `[::]:0` (ray/serve/_private/replica.py); each one is probed
    without the token and must refuse (UNAUTHENTICATED)."""
    s = stack["stack"]
    listening, wider, replica_grpc = {}, [], []
    for proc in s.live_processes():
        try:
            conns = [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for c in conns:
            listening[(c.laddr.ip, c.laddr.port)] = cmdline
            if c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1"):
                continue
            if c.laddr.ip == "::" and cmdline.startswith("ray::ServeReplica:"):
                replica_grpc.append(c.laddr.port)
            else:
                wider.append(f"{c.laddr.ip}:{c.laddr.port} pid {proc.pid} {cmdline[:200]}")
    assert not wider, "listening beyond loopback:\n" + "\n".join(wider)
    assert len(replica_grpc) >= 3  # the ingress and two compute replicas
    admitted = [port for port in replica_grpc if not _refused_without_the_token(port)]
    assert not admitted, f"Serve replicas' gRPC answering without the token on ports {admitted}"
    ports = {port for _, port in listening}
    params = s.params
    for port in (params.ray.gcs_port, params.ray.dashboard_port, params.ray.client_server_port, params.airflow.port,
                 params.feature_store.redis.port, params.serving.port):
        assert port in ports, (port, sorted(listening.items()))
    raylets = [cmd for cmd in listening.values() if "/raylet " in cmd]
    assert len({cmd for cmd in raylets}) == 2 and all("--node_ip_address=127.0.0.1 " in cmd for cmd in raylets), raylets
    print(f"{len(listening)} listening sockets, all on 127.0.0.1:\n" + "\n".join(
        f"  {port:>5} {cmd[:110]}" for (_, port), cmd in sorted(listening.items(), key=lambda kv: kv[0][1])))


def test_secrets_are_owner_only_and_in_no_log(runs, stack):
    """Every file of `stack/` is 0600 (the secrets, the state, every log), `stack/`, `stack/logs/`, the Airflow home,
    Redis's data folder and the parent of Ray's temp dir are 0700; no log of the stack (its components', Airflow's
    task logs, Ray's session logs of both heads, Redis's) holds a secret: the Airflow password, the Ray token, the
    JWT secret, the API secret key, the Fernet key, the Redis password. (Messages name files, never a secret.)"""
    import stat

    from sum_platform.feature_store import redis_password, redis_paths

    s = stack["stack"]
    folders = {s.dir: 0o700, s.logs: 0o700, s.ws.airflow_home: 0o700, redis_paths(s.params)[0]: 0o700,
               s.ray_temp_dir.parent: 0o700}
    modes = {str(d): oct(stat.S_IMODE(d.stat().st_mode)) for d in folders}
    assert modes == {str(d): oct(m) for d, m in folders.items()}
    assert s.ray_temp_dir.parent.stat().st_uid == os.getuid()
    ray_dir = s.ray_temp_dir if s.ray_temp_dir.parent == s.dir else None
    loose = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in s.dir.rglob("*")
             if f.is_file() and not f.is_symlink() and not (ray_dir and ray_dir in f.parents)
             and stat.S_IMODE(f.stat().st_mode) != 0o600}
    assert not loose, loose
    assert {p.name for p in s.logs.glob("*.log")} >= {f"{n}.log" for n in s.components}
    found = {
        "the Airflow password": s.airflow_password(), "the Ray token": s.token_path.read_text().strip(),
        **{name: (s.dir / name).read_text().strip()
           for name in ("airflow_jwt_secret", "airflow_secret_key", "airflow_fernet_key")},
        "the Redis password": redis_password(s.params)}
    assert all(len(secret) >= 16 for secret in found.values()), "a secret is missing or short"
    logs = [*s.logs.rglob("*"), *(s.ws.airflow_home / "logs").rglob("*"), *s.ray_temp_dir.rglob("*"),
            *redis_paths(s.params)[0].glob("*.log")]
    leaks, read = [], 0
    for f in logs:
        if not f.is_file() or f.is_symlink() or stat.S_ISSOCK(f.lstat().st_mode):
            continue
        try:
            data = f.read_bytes()
        except OSError:
            continue
        read += 1
        leaks += [f"{name} in {f}" for name, secret in found.items() if secret.encode() in data]
    assert read > 50 and any("session_" in str(f) for f in logs)  # the logs were there to read
    assert not leaks, leaks


def test_down_stops_every_process_of_the_stack_even_with_its_state_files_gone(runs, stack):
    """Last in the module: with `stack.json` and `ray.json` deleted, `sumctl down` still finds the stack's processes
    (they carry the workspace's identity, `SUM_WORKSPACE_ID`, or write to its logs) and leaves none (checked by pid)."""
    s = stack["stack"]
    pids = [p.pid for p in s.live_processes()]
    assert len(pids) >= 5
    assert {p.pid for p in s._processes(s._states())} <= set(pids)
    s.state_file.unlink()
    (s.dir / "ray.json").unlink()
    _sumctl("down")
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []
    # Nor anything a killed component left behind (the scheduler's executor workers): every process of the stack
    # started in its folder.
    in_stack_dir = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == str(s.dir) and proc.status() != "zombie":
                in_stack_dir.append(" ".join(proc.cmdline())[:100])
        except psutil.Error:
            pass
    assert in_stack_dir == []
    assert not s.state_file.exists()
    assert _sumctl("status", check=False).returncode == 1
    report = PROJECT_ROOT / "reports" / "faults" / "deployed_stack.json"  # what the closing table of faults reads
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(FAULTS, indent=2) + "\n")
    print("faults on the deployed stack:\n" + "\n".join(f"  {k}: {json.dumps(v)}" for k, v in FAULTS.items()))
