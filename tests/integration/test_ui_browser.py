"""The Airflow UI in a real browser (Debian's Chromium driven by Playwright): login, the grid's run
states, the gate's verdict on the DAG run's note and in the task's XCom view.

``ui_stack`` is a toy Airflow of this module's own (api-server, scheduler and dag-processor as
subprocesses, LocalExecutor, SQLite) running a two-task DAG shaped like the gate: ``shift_gate`` pushes the
XCom ``verdict_table`` (markdown) and the run's note is set to the verdict through the REST API. One run
succeeds, one fails, so the states on the page are not all the same. Screenshots go to ``reports/ui/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.integration import ui_browser

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REPORT_DIR = PROJECT_ROOT / "reports" / "ui"
PORT = int(os.environ.get("SUM_UI_TEST_PORT", "18082"))
DAG_ID = "ui_toy_gate"
USERNAME = "admin"

ASSET = "sum_user_tower"
VERDICT_NOTES = {  # what the fixture sets as the runs' notes (markdown, as an operator would read it)
    "blessed": "**Gate verdict: BLESSED** sum-toy\n\n| check | value | threshold | ok |\n|---|---|---|---|\n"
               "| mean cosine | 0.981 | 0.9 | yes |\n| NE | 0.930 | 1.0 | yes |\n",
    "held": "Gate verdict: HELD sum-toy (mean cosine 0.112 < 0.9)",
}


def _verdict_table(blessed: bool) -> str:
    """The markdown the toy gate pushes as XCom ``verdict_table``."""
    return ("| check | value | threshold | ok |\n|---|---|---|---|\n"
            f"| mean cosine | {'0.981' if blessed else '0.112'} | 0.9 | {'yes' if blessed else 'NO'} |\n"
            f"| verdict | {'BLESSED' if blessed else 'HELD'} sum-toy | | |\n")


TOY_DAG = textwrap.dedent('''
    """A DAG shaped like sum_daily's gate, for the UI test: shift_gate pushes the verdict table."""
    from datetime import datetime

    from airflow.sdk import Asset, dag, get_current_context, task

    USER_TOWER = Asset("sum_user_tower")
    VERDICT_TABLES = {True: %r, False: %r}


    @dag(dag_id="ui_toy_gate", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         tags=["sum", "ui-test"], default_args={"retries": 0})
    def ui_toy_gate():
        @task
        def evaluate() -> dict:
            return {"snapshot_id": "sum-toy", "ne": 0.93}

        @task(outlets=[USER_TOWER])
        def shift_gate(evaluation: dict) -> dict:
            context = get_current_context()
            params = context["dag_run"].conf or {}
            blessed = not params.get("hold", False)
            table = VERDICT_TABLES[blessed]
            context["ti"].xcom_push(key="verdict_table", value=table)
            context["outlet_events"][USER_TOWER].extra = {"verdict": "BLESSED" if blessed else "HELD",
                                                          "snapshot_id": evaluation["snapshot_id"]}
            if not blessed:
                raise RuntimeError("toy gate held the candidate")
            return {"blessed": blessed, "snapshot_id": evaluation["snapshot_id"]}

        shift_gate(evaluate())


    ui_toy_gate()
''') % (_verdict_table(True), _verdict_table(False))


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _airflow_env(home: Path, dags: Path, jwt_secret: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{PORT}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
        "AIRFLOW__API__SECRET_KEY": jwt_secret,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(PORT),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{PORT}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "PYTHONUNBUFFERED": "1",
    })
    return env


class ToyAirflow:
    """api-server + scheduler + dag-processor of one throwaway home; :meth:`stop` kills every one."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.dags = root / "dags"
        self.url = f"http://127.0.0.1:{PORT}"
        self.procs: list[subprocess.Popen] = []
        self.env = _airflow_env(self.home, self.dags, secrets.token_urlsafe(32))
        self.airflow = str(Path(sys.executable).with_name("airflow"))

    def start(self, timeout: float = 180.0) -> None:
        if not _free(PORT):
            raise RuntimeError(f"port {PORT} is taken: another Airflow api-server is running")
        self.home.mkdir(parents=True)
        self.dags.mkdir(parents=True)
        (self.dags / "ui_toy_gate.py").write_text(TOY_DAG)
        subprocess.run([self.airflow, "db", "migrate"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for name, args in (("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(PORT)]),
                           ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"])):
            log = open(self.root / f"{name}.log", "wb")
            self.procs.append(subprocess.Popen([self.airflow, *args], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"api-server not up after {timeout}s: {self.logs()}")

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"airflow {p.args[1]} exited with {p.returncode}: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted(self.root.glob("*.log")))

    @property
    def password(self) -> str:
        path = self.home / "simple_auth_manager_passwords.json.generated"
        return json.loads(path.read_text())[USERNAME]

    def client(self) -> httpx.Client:
        token = httpx.post(f"{self.url}/auth/token", json={"username": USERNAME, "password": self.password},
                           timeout=10).raise_for_status().json()["access_token"]
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def wait_for_dag(self, api: httpx.Client, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200:
                return
            time.sleep(1)
        raise TimeoutError(f"{DAG_ID} not parsed after {timeout}s: {self.logs()}")

    def wait_for_runs(self, api: httpx.Client, run_ids: list[str], timeout: float = 180.0) -> dict[str, str]:
        states: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                states = {r: api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{r}").json()["state"] for r in run_ids}
            except httpx.TimeoutException:  # SQLite busy with the scheduler on a loaded machine: ask again
                continue
            if all(s in ("success", "failed") for s in states.values()):
                return states
            time.sleep(1)
        raise TimeoutError(f"runs not finished after {timeout}s: {states}\n{self.logs()}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        # LocalExecutor workers and task supervisors live in the same process groups; make sure none is left.
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def toy_stack():
    """A toy Airflow with two finished runs of ``ui_toy_gate`` (one success, one failed), notes set to the
    verdict through the REST API; everything killed and removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="sum-ui-airflow-"))
    stack = ToyAirflow(root)
    t0 = time.monotonic()
    try:
        stack.start()
        with stack.client() as api:
            stack.wait_for_dag(api)
            api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
            runs = {}
            for kind, conf in (("blessed", {}), ("held", {"hold": True})):
                run_id = f"ui_test_{kind}"
                api.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                         json={"dag_run_id": run_id, "logical_date": None, "conf": conf}).raise_for_status()
                runs[run_id] = {"note": VERDICT_NOTES[kind], "verdict_table": _verdict_table(kind == "blessed")}
            states = stack.wait_for_runs(api, list(runs))
            for run_id, info in runs.items():
                api.patch(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", json={"note": info["note"]}).raise_for_status()
                info["state"] = states[run_id]
        yield {"url": stack.url, "username": USERNAME, "password": stack.password, "dag_id": DAG_ID,
               "runs": runs, "asset": ASSET, "seconds_to_start": time.monotonic() - t0}
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ui_stack():
    """``{"url", "username", "password", "dag_id", "runs": {run_id: {"state", "note"}}}`` of a running
    Airflow. The lead swaps this for the session's deployed stack."""
    with toy_stack() as stack:
        yield stack


@pytest.mark.timeout(900)
def test_airflow_ui_shows_runs_and_gate_verdicts(ui_stack):
    url, dag_id, runs = ui_stack["url"], ui_stack["dag_id"], ui_stack["runs"]
    assert {info["state"] for info in runs.values()} - {"success", "failed"} == set(), runs
    t0 = time.monotonic()
    timings = {}

    # Without a login the REST API refuses and the UI sends the browser to the login page.
    assert httpx.get(f"{url}/api/v2/dags/{dag_id}/dagRuns", timeout=30).status_code == 401
    assert httpx.get(f"{url}/api/v2/dags/{dag_id}/dagRuns", timeout=30,
                     headers={"Authorization": "Bearer not-a-token"}).status_code in (401, 403)

    with ui_browser.open_browser() as page:
        page.goto(f"{url}/dags/{dag_id}")
        page.wait_for_url("**/auth/login?next=**")
        assert ui_browser.is_login_page(page), page.url
        ui_browser.screenshot(page, "login.png")
        with pytest.raises(ui_browser.UIError, match="Invalid credentials"):
            ui_browser.login(page, url, ui_stack["username"], ui_stack["password"] + "-wrong")
        ui_browser.screenshot(page, "login-refused.png")
        ui_browser.login(page, url, ui_stack["username"], ui_stack["password"])
        timings["login"] = time.monotonic() - t0

        # The grid shows every run with the state it finished in (tooltip of each run's bar), and so
        # does the Runs tab.
        expected = {run_id: info["state"] for run_id, info in runs.items()}
        assert ui_browser.run_states(page, url, dag_id, list(runs), screenshot_prefix="grid") == expected
        assert ui_browser.run_states(page, url, dag_id, list(runs), source="runs",
                                     screenshot_prefix="runs") == expected
        timings["states"] = time.monotonic() - t0

        # The gate's verdict: the run's note (whole markdown, in the note dialog) and the XCom table.
        for run_id, info in runs.items():
            # only a run whose gate task succeeded emits the asset event
            asset = ui_stack.get("asset") if info["state"] == "success" else None
            shown = ui_browser.open_verdict(page, url, dag_id, run_id, asset_name=asset,
                                            screenshot_prefix=f"verdict-{run_id}")
            assert shown["run_state"] == info["state"], (run_id, shown)
            assert ui_browser.shows_text(shown["note"], info["note"]), (run_id, shown["note"], info["note"])
            assert shown["xcom"], (run_id, shown)
            if "verdict_table" in info:
                assert ui_browser.shows_text(shown["xcom"], info["verdict_table"]), (run_id, shown["xcom"])
            if asset:
                assert "BLESSED" in shown["asset_event"], (run_id, shown["asset_event"])
        # The notes differ between the runs, so the check above cannot pass on another run's page.
        notes = [info["note"] for info in runs.values()]
        assert len(set(notes)) == len(notes)
        timings["verdicts"] = time.monotonic() - t0

    for name in ["login.png", "login-refused.png", *(f"grid-{r}.png" for r in runs), "runs.png",
                 *(f"verdict-{r}-{part}.png" for r in runs for part in ("note", "xcom"))]:
        assert (REPORT_DIR / name).stat().st_size > 10_000, name
    print(f"UI test timings (s, cumulative): {timings}; stack start {ui_stack.get('seconds_to_start')}")
