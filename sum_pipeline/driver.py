"""Drives the daily DAG through the deployed stack's real scheduler, over Airflow's REST API.

For each logical date :func:`drive` makes sure a run exists (a new one is created with the date's conf; a
finished one is cleared, so the date reruns; a queued or running one is awaited), unpauses the DAG, then
waits for the runs in date order, telling ``on_progress`` the running task of each. It reads task states
and XComs over the REST API and writes each run's verdict into the run's note, where the UI shows it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import httpx

from sum_pipeline.airflow_api import AirflowClient, run_result
from sum_pipeline.airflow_env import DAG_ID, DagRunResult

#: Dag run states after which nothing more happens to the run.
FINISHED = ("success", "failed")


@dataclass
class DayProgress:
    ds: str
    state: str
    running: list[str]
    done: int
    total: int
    awaiting: list[str] = field(default_factory=list)  # tasks waiting for a human (Required Actions)


def run_id_for(ds: str) -> str:
    return f"sumctl__{ds}"


def find_run(client: AirflowClient, ds: str) -> dict | None:
    """The DAG's run of logical date ``ds`` (there is at most one), or None."""
    return client.run_of_date(DAG_ID, ds)


def ensure_run(client: AirflowClient, ds: str, conf: dict[str, Any]) -> str:
    """The run of ``ds``: created when missing, cleared (so it reruns) when finished, else as it is."""
    existing = find_run(client, ds)
    if existing is None:
        # run_after = the end of the date's interval, as for a scheduled run: queued runs go in date order.
        after = datetime.combine(date.fromisoformat(ds) + timedelta(days=1), datetime.min.time(), timezone.utc)
        return client.trigger(DAG_ID, ds, conf=conf, run_id=run_id_for(ds), run_after=after.isoformat())
    run_id = existing["dag_run_id"]
    if existing["state"] in FINISHED:
        if conf != (existing.get("conf") or {}):
            raise ValueError(f"{ds} already has run {run_id} with conf {existing.get('conf')}; a rerun keeps the "
                             f"run's conf: delete the run in the UI to run the date with {conf}")
        client.clear_run(DAG_ID, run_id)  # every task again: they are idempotent per date
    return run_id


def wait_run(client: AirflowClient, ds: str, run_id: str, poll_s: float,
             on_progress: Callable[[DayProgress], None], timeout_s: float) -> DagRunResult:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run = client.dag_run(DAG_ID, run_id)
            tis = client.task_instances(DAG_ID, run_id)
        except httpx.TimeoutException:  # a busy API server: ask again, the run goes on regardless
            continue
        states = {t: (ti.get("state") or "none") for t, ti in tis.items()}
        done = sum(s in ("success", "skipped", "failed", "upstream_failed") for s in states.values())
        running = [t for t, s in states.items() if s in ("running", "queued", "up_for_retry", "deferred",
                                                          "awaiting_input", "scheduled")]
        awaiting = [t for t, s in states.items() if s == "awaiting_input"]
        on_progress(DayProgress(ds, run["state"], running, done, len(states), awaiting))
        if run["state"] in FINISHED:
            result = run_result(client, DAG_ID, run_id, ds)
            result.run_id, result.task_instances = run_id, tis
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run {run_id} of {ds} did not finish within {timeout_s:.0f}s "
                               f"(state {run['state']}, running {running})")
        time.sleep(poll_s)


#: Airflow's limit on a run's note.
NOTE_MAX = 1000


def verdict_note(result: DagRunResult) -> str:
    """The run's note (markdown, at most :data:`NOTE_MAX` characters): the verdict, what is served, NE and
    shift per embedding, and the reasons of a hold; the whole table is the XCom ``verdict_table``."""
    verdict = result.xcoms.get("shift_gate.verdict") or {}
    if not verdict:
        failed = [t for t, state in result.task_states.items() if state == "failed"]  # not the upstream_failed
        return f"**{result.state}**" + (f" - stopped at {', '.join(failed)}" if failed else "")
    served = (result.xcoms.get("verify_serving") or {}).get("served_snapshot_id")
    approved = result.task_states.get("approve_held") == "success" and result.task_states.get("promote") == "success"
    head = f"**{verdict.get('verdict')}** `{verdict.get('snapshot_id')}`" + (" - approved by a human" if approved else "")
    lines = [head + (f" - serving `{served}`" if served else ""), ""]
    ne = (result.xcoms.get("evaluate") or {}).get("ne") or {}
    if ne:
        lines.append("NE " + ", ".join(f"{task} {_number(value, '.4f')}" for task, value in ne.items()))
    for i, m in enumerate(verdict.get("shift") or []):
        lines.append(f"e{i}: cos {_number(m.get('mean_cosine'), '.3f')}, "
                     f"ΔL2 {_number(m.get('relative_l2_change'), '.3f')}")
    for c in verdict.get("consumers") or []:  # what each downstream model would lose (check_consumers)
        ci = c.get("change_ci") or [None, None]
        lines.append(f"consumer {c['consumer']}: " + ("not measurable" if c["outcome"] == "not_measurable" else
                     f"NE {_number(c.get('change_pct'), '+.2f')} % [{_number(ci[0], '+.2f')}, "
                     f"{_number(ci[1], '+.2f')}]" + (" HOLDS" if c["outcome"] == "fail" else "")))
    if not verdict.get("blessed"):
        lines += ["", *(f"- {reason}" for reason in verdict.get("reasons") or [])]
    note = "\n".join(lines)
    return note if len(note) <= NOTE_MAX else note[: NOTE_MAX - 1] + "…"


def _number(value: Any, spec: str) -> str:
    """A verdict number for the note; "n/a" for a NaN candidate's (the gate stores non-finite as null)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return format(number, spec) if math.isfinite(number) else "n/a"


def drive(client: AirflowClient, dates: list[str], faults: dict[str, str], poll_s: float,
          on_progress: Callable[[DayProgress], None] = lambda p: None, timeout_s: float = 3600,
          consumers: tuple[str, ...] = ()) -> list[DagRunResult]:
    """Runs ``dates`` through the scheduler in date order; returns each run's result.

    ``consumers`` are DAGs scheduled on the daily DAG's assets (``sum_downstream``), unpaused with it so that
    each promotion triggers them; the scheduler runs them beside the daily runs, nobody waits for them here.

    Raises:
        ValueError: A date lies after the DAG's end date (its tasks would never run).
    """
    end = (client.dag_details(DAG_ID).get("end_date") or "")[:10] if dates else ""
    late = [ds for ds in dates if end and ds > end]
    if late:
        raise ValueError(f"{', '.join(late)} after the DAG's end date {end}: raise params.yaml airflow.end_date "
                         f"(then `sumctl down` and `sumctl up`, so the DAG is parsed again)")
    client.wait_dag(DAG_ID, timeout_s=300)
    run_ids = [ensure_run(client, ds, {"candidate_fault": faults[ds]} if ds in faults else {}) for ds in dates]
    for consumer in consumers:
        client.wait_dag(consumer, timeout_s=300)
        client.unpause(consumer)
    client.unpause(DAG_ID)
    results = []
    for ds, run_id in zip(dates, run_ids):
        result = wait_run(client, ds, run_id, poll_s, on_progress, timeout_s)
        client.set_note(DAG_ID, run_id, verdict_note(result))
        results.append(result)
    return results


def task_log_path(airflow_home: Path, run_id: str, task_id: str, try_number: int) -> Path:
    """Where the scheduler's task processes write a task's log (Airflow's default log template)."""
    return (airflow_home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
            / f"attempt={try_number}.log")
