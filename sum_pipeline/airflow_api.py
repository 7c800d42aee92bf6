"""A small client of Airflow 3.3's public REST API (``/api/v2``), for driving a running stack.

Authentication is the simple auth manager's: ``POST /auth/token`` with a username and password gives a
JWT, sent as a bearer token and fetched again when the API answers 401 (it expires after
``[api_auth] jwt_expiration_time``) or 403 "Invalid JWT token" (signed with a secret the api-server no
longer has). Every non-2xx answer raises :class:`AirflowApiError` carrying the
API's ``detail``. Only httpx is imported: the client does not need Airflow in the calling process.

The paths are those of ``airflow/api_fastapi/core_api/routes/public/`` (and the simple auth manager's
``routes/login.py``) of the installed Airflow.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import httpx

from sum_pipeline.airflow_env import DagRunResult

API = "/api/v2"
PAGE = 100  # the API's default [api] maximum_page_limit is 100


class AirflowApiError(RuntimeError):
    """A non-2xx answer of the Airflow API."""

    def __init__(self, status: int, method: str, path: str, detail: Any):
        self.status = status
        self.method = method
        self.path = path
        self.detail = detail
        super().__init__(f"{method} {path} -> {status}: {detail}")


def _stamp(logical_date: str) -> str:
    """A date's logical date as the API writes it: midnight UTC."""
    return f"{logical_date}T00:00:00+00:00"


def _q(part: str) -> str:
    """One path segment (run ids hold ':' and '+')."""
    return quote(part, safe="")


class AirflowClient:
    """The Airflow API of one api-server, as one user."""

    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30):
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._token: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------
    def _login(self) -> str:
        resp = self._http.post("/auth/token", json={"username": self.username, "password": self._password})
        if resp.status_code not in (200, 201):
            raise AirflowApiError(resp.status_code, "POST", "/auth/token", _detail(resp))
        self._token = resp.json()["access_token"]
        return self._token

    def _request(self, method: str, path: str, *, auth: bool = True, params: dict | None = None,
                 json_body: Any = None, headers: dict | None = None) -> httpx.Response:
        url = API + path
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            if auth:
                hdrs["Authorization"] = f"Bearer {self._token or self._login()}"
            try:
                resp = self._http.request(method, url, params=params, json=json_body, headers=hdrs)
            except httpx.TimeoutException:
                if method != "GET" or attempt:
                    raise
                continue  # a read is safe to repeat (a busy SQLite metadata DB can stall one)
            if auth and attempt == 0 and _stale_token(resp):
                self._token = None  # expired, or signed before the stack restarted with another secret
                continue
            break
        if not resp.is_success:
            raise AirflowApiError(resp.status_code, method, url, _detail(resp))
        return resp

    def _get(self, path: str, **params) -> Any:
        return self._request("GET", path, params=params or None).json()

    def _get_all(self, path: str, key: str, **params) -> list[dict]:
        """Every item of a paginated collection (``limit``/``offset``, ``total_entries``)."""
        items: list[dict] = []
        while True:
            page = self._get(path, **params, limit=PAGE, offset=len(items))
            batch = page[key]
            items.extend(batch)
            if not batch or len(items) >= page["total_entries"]:
                return items

    # -- health and DAGs -------------------------------------------------------------------------
    def health(self) -> dict:
        """``GET /monitor/health`` (no authentication): metadatabase, scheduler, triggerer, dag processor."""
        return self._request("GET", "/monitor/health", auth=False).json()

    def wait_healthy(self, timeout_s: float, poll_s: float = 1.0,
                     components: tuple[str, ...] = ("metadatabase", "scheduler")) -> None:
        """Until the api-server answers and reports ``components`` healthy (of ``metadatabase``,
        ``scheduler``, ``dag_processor``, ``triggerer``: the last three from their jobs' heartbeats).

        Raises:
            TimeoutError: naming the URL and the last answer (or connection error).
        """
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            try:
                last = self.health()
                if all((last.get(name) or {}).get("status") == "healthy" for name in components):
                    return
            except (httpx.HTTPError, AirflowApiError) as err:
                last = err
            if time.monotonic() > deadline:
                raise TimeoutError(f"Airflow at {self.base_url}{API}/monitor/health not healthy after "
                                   f"{timeout_s:.0f}s: {last}")
            time.sleep(poll_s)

    def dag(self, dag_id: str) -> dict:
        return self._get(f"/dags/{_q(dag_id)}")

    def dag_details(self, dag_id: str) -> dict:
        """The parsed DAG's details: start and end date, catch-up, params, ..."""
        return self._get(f"/dags/{_q(dag_id)}/details")

    def import_errors(self) -> list[dict]:
        return self._get_all("/importErrors", "import_errors")

    def wait_dag(self, dag_id: str, timeout_s: float, poll_s: float = 1.0) -> dict:
        """Until the dag-processor has parsed ``dag_id`` (``GET /dags/{dag_id}`` answers 200).

        Raises:
            TimeoutError: it never appeared; the message holds the import errors the API lists.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.dag(dag_id)
            except AirflowApiError as err:
                if err.status != 404:
                    raise
            if time.monotonic() > deadline:
                errors = {e["filename"]: e["stack_trace"] for e in self.import_errors()}
                raise TimeoutError(f"DAG {dag_id!r} not parsed by {self.base_url} after {timeout_s:.0f}s; "
                                   f"import errors: {errors or 'none'}")
            time.sleep(poll_s)

    def _set_paused(self, dag_id: str, paused: bool) -> dict:
        return self._request("PATCH", f"/dags/{_q(dag_id)}", params={"update_mask": "is_paused"},
                             json_body={"is_paused": paused}).json()

    def unpause(self, dag_id: str) -> dict:
        return self._set_paused(dag_id, False)

    def pause(self, dag_id: str) -> dict:
        return self._set_paused(dag_id, True)

    # -- runs ------------------------------------------------------------------------------------
    def dag_runs(self, dag_id: str) -> list[dict]:
        """Every run of a DAG (e.g. the asset-triggered runs of ``sum_downstream``, which have no logical date)."""
        return self._get_all(f"/dags/{_q(dag_id)}/dagRuns", "dag_runs")

    def run_of_date(self, dag_id: str, logical_date: str) -> dict | None:
        """The run of ``logical_date`` (``YYYY-MM-DD``, midnight UTC), or None (a DAG has at most one)."""
        stamp = _stamp(logical_date)
        runs = self._get_all(f"/dags/{_q(dag_id)}/dagRuns", "dag_runs",
                             logical_date_gte=stamp, logical_date_lte=stamp)
        return runs[0] if runs else None

    def trigger(self, dag_id: str, logical_date: str, conf: dict | None = None, run_id: str | None = None,
                run_after: str | None = None) -> str:
        """Creates a manual run for ``logical_date`` (``YYYY-MM-DD``, midnight UTC); returns its run id.

        The data interval is left to the API, which infers it from the DAG's timetable as ``dag.test()``
        does; ``run_after`` (ISO timestamp) orders queued runs as the scheduler's own would be. Idempotent:
        if the run id (or a run of that logical date) exists already (409), the existing run's id is
        returned.
        """
        body: dict[str, Any] = {"logical_date": _stamp(logical_date), "conf": conf or {}}
        if run_id is not None:
            body["dag_run_id"] = run_id
        if run_after is not None:
            body["run_after"] = run_after
        try:
            return self._request("POST", f"/dags/{_q(dag_id)}/dagRuns", json_body=body).json()["dag_run_id"]
        except AirflowApiError as err:
            if err.status != 409:
                raise
            if run_id is not None:
                try:
                    return self.dag_run(dag_id, run_id)["dag_run_id"]
                except AirflowApiError as missing:
                    if missing.status != 404:
                        raise
            existing = self.run_of_date(dag_id, logical_date)
            if existing is None:
                raise
            return existing["dag_run_id"]

    def clear_run(self, dag_id: str, run_id: str) -> list[dict]:
        """What *Clear* on a run does in the UI: every task of the run queued again; returns the cleared
        task instances."""
        body = {"dag_run_id": run_id, "dry_run": False, "only_failed": False, "reset_dag_runs": True,
                "include_downstream": True}
        return self._request("POST", f"/dags/{_q(dag_id)}/clearTaskInstances",
                             json_body=body).json().get("task_instances", [])

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self._get(f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def set_note(self, dag_id: str, run_id: str, note: str) -> dict:
        """The run's note (markdown, shown on the run's page; at most 1000 characters)."""
        return self._request("PATCH", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}", params={"update_mask": "note"},
                             json_body={"note": note}).json()

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        """``{task_id: task instance}`` (``state``, ``try_number``, ``start_date``, ``end_date``, ...);
        a mapped task's instances are keyed ``task_id[map_index]``."""
        tis = self._get_all(f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances", "task_instances")
        return {ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]": ti for ti in tis}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """One XCom's value as stored: JSON values (what the daily tasks push) come back as pushed; an
        object Airflow serializes (a tuple, a datetime) comes back as its serde form
        (``{"__classname__": ..., "__data__": ...}``).

        Not ``deserialize=true``: in Airflow 3.3 that runs ``json.loads`` over the stored value, so a
        string XCom that reads as JSON (``"123"``) comes back as another type (``123``).
        """
        entry = self._get(f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/xcomEntries/{_q(key)}",
                          map_index=map_index)
        return entry["value"]

    def xcoms(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Every XCom of the run, keyed as :func:`sum_pipeline.airflow_env.run_date` keys them: ``task_id``
        for ``return_value``, else ``task_id.key``."""
        entries = self._get_all(f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/~/xcomEntries", "xcom_entries")
        out: dict[str, Any] = {}
        for e in entries:
            name = e["task_id"] if e["key"] == "return_value" else f"{e['task_id']}.{e['key']}"
            out[name] = self.xcom(dag_id, run_id, e["task_id"], e["key"], e["map_index"])
        return out

    def asset_events(self, dag_id: str, run_id: str | None = None, task_id: str | None = None) -> list[dict]:
        """Asset events a DAG's tasks emitted (``asset_id``, ``uri``, ``name``, ``extra``, ``timestamp``,
        ``source_run_id``, ...), oldest first."""
        filters = {"source_dag_id": dag_id, "source_run_id": run_id, "source_task_id": task_id}
        return self._get_all("/assets/events", "asset_events", order_by="timestamp",
                             **{k: v for k, v in filters.items() if v is not None})

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The text of one try's log (its structured records, one line each)."""
        resp = self._request("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/logs/{try_number}",
                             params={"full_content": "true", "map_index": map_index},
                             headers={"Accept": "application/json"}).json()
        return "\n".join(_log_line(rec) for rec in resp["content"])

    # -- human in the loop -----------------------------------------------------------------------
    def pending_approvals(self, dag_id: str | None = None) -> list[dict]:
        """Human-in-the-loop requests awaiting an answer (every DAG's, or ``dag_id``'s); each has the
        request (``subject``, ``body``, ``options``, ``defaults``, ``params``) and its ``task_instance``."""
        return self._get_all(f"/dags/{_q(dag_id or '~')}/dagRuns/~/hitlDetails", "hitl_details",
                             response_received="false", state="awaiting_input")

    def approval(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict:
        """One task's human-in-the-loop request and its answer (``chosen_options``, ``responded_by_user``
        (None when the timeout applied the defaults), ``params_input``, ``response_received``)."""
        return self._get(f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/{map_index}/hitlDetails")

    def respond(self, dag_id: str, run_id: str, task_id: str, chosen_options: list[str],
                params_input: dict | None = None, map_index: int = -1) -> dict:
        """Answers a human-in-the-loop request as this client's user; the task resumes at once.

        Raises:
            AirflowApiError: 409 if it was answered already (or timed out), 400 for an unknown option.
        """
        return self._request(
            "PATCH", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/{map_index}/hitlDetails",
            json_body={"chosen_options": list(chosen_options), "params_input": params_input or {}},
        ).json()


def run_result(client: AirflowClient, dag_id: str, run_id: str, ds: str) -> DagRunResult:
    """A run's state, task states and XComs, as :func:`sum_pipeline.airflow_env.run_date` returns them."""
    run = client.dag_run(dag_id, run_id)
    tis = client.task_instances(dag_id, run_id)
    return DagRunResult(ds=ds, state=run["state"], task_states={t: ti["state"] for t, ti in tis.items()},
                        xcoms=client.xcoms(dag_id, run_id), run_id=run_id)


def _stale_token(resp: httpx.Response) -> bool:
    """401 is an expired (or missing) token; 403 "Invalid JWT token" one the api-server cannot verify."""
    return resp.status_code == 401 or (resp.status_code == 403 and _detail(resp) == "Invalid JWT token")


def _detail(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:2000]
    return body.get("detail", body) if isinstance(body, dict) else body


def _log_line(rec: Any) -> str:
    if not isinstance(rec, dict):
        return str(rec)
    head = " ".join(str(rec[k]) for k in ("timestamp", "level", "logger") if rec.get(k))
    extra = {k: v for k, v in rec.items() if k not in ("timestamp", "level", "logger", "event")}
    line = f"{head} {rec.get('event', '')}".strip()
    return f"{line} {extra}" if extra else line
