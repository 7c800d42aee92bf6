"""The daily SUM loop: validate -> train -> evaluate -> gate -> promote -> materialize -> rollout -> verify.

Each task is a thin call into :mod:`sum_pipeline.tasks` (torch, Feast, GX and Ray are imported inside
those calls, never when the DAG is parsed). The candidate's id flows from ``train_user_model`` through
evaluation, the gate and promotion as task arguments. A held snapshot is a verdict, not a failure:
``shift_gate`` short-circuits, so promotion, materialization, rollout and verification show as
*skipped* and production keeps serving.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Param, dag, get_current_context, task

from sum_pipeline import tasks
from sum_pipeline.faults import CANDIDATE_FAULTS
from sum_platform.config import load_params
from validation.data_checks import DataValidationError
from validation.gate import verdict_markdown

SCHEDULE = load_params().airflow  # the data's dates and catch-up come from params.yaml


def _date(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=timezone.utc)

DEFAULT_ARGS = {
    "owner": "sum-platform",
    "retries": 1,
    "retry_delay": timedelta(seconds=30),
}


def _ds() -> str:
    return get_current_context()["ds"]


@dag(
    dag_id="sum_daily",
    description="Daily SUM user model: validate, train, gate on embedding shift, promote, serve.",
    schedule="@daily",
    start_date=_date(SCHEDULE.start_date),
    end_date=_date(SCHEDULE.end_date),
    catchup=SCHEDULE.catchup,
    # Each day warm-starts from the previous day's production snapshot, and DVC holds a repo lock:
    # runs go one at a time, in date order.
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "candidate_fault": Param(
            None,
            type=["null", "string"],
            enum=[None, *CANDIDATE_FAULTS],
            description=f"Gate drill: {' | '.join(CANDIDATE_FAULTS)} corrupts the day's candidate on purpose.",
        ),
    },
    tags=["sum", "training", "serving"],
    doc_md=__doc__,
)
def sum_daily():
    @task(retries=0)
    def ingest() -> dict:
        return tasks.ingest(_ds())

    @task(retries=0)
    def validate_data() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        try:
            return tasks.validate_data(_ds())
        except DataValidationError as err:
            # Bad data does not get better on retry: fail now, naming the failed checks.
            raise AirflowFailException(str(err)) from err

    @task
    def version_data() -> dict:
        return tasks.version_data(_ds())

    @task
    def materialize_user_features() -> dict:
        return tasks.materialize_user_features(_ds())

    @task(retries=0)
    def train_user_model() -> dict:
        fault = get_current_context()["params"].get("candidate_fault")
        return tasks.train_user_model(_ds(), candidate_fault=fault)

    @task
    def evaluate(trained: dict) -> dict:
        return tasks.evaluate(_ds(), trained["snapshot_id"])

    @task.short_circuit(doc_md="Judges the candidate against production (cosine, L2 change raw and after "
                         "average pooling, NE non-regression). Held: downstream tasks are skipped, production stays.")
    def shift_gate(evaluation: dict) -> bool:
        verdict = tasks.shift_gate(_ds(), evaluation["snapshot_id"])
        table = verdict_markdown(verdict)
        # Operators read the verdict in the UI: the table in the task log, the numbers in the XComs
        # `verdict` (JSON) and `verdict_table` (markdown).
        ti = get_current_context()["ti"]
        ti.xcom_push(key="verdict", value=verdict)
        ti.xcom_push(key="verdict_table", value=table)
        print(table)
        return bool(verdict["blessed"])

    @task
    def promote(trained: dict) -> dict:
        return tasks.promote(_ds(), trained["snapshot_id"])

    @task
    def materialize_embeddings(promoted: dict) -> dict:
        return tasks.materialize_embeddings(_ds(), promoted["snapshot_id"])

    @task
    def rollout(materialized: dict) -> dict:
        return tasks.rollout(_ds(), materialized["snapshot_id"])

    @task
    def verify_serving(rolled_out: dict) -> dict:
        return tasks.verify_serving(_ds(), rolled_out["snapshot_id"])

    versioned = ingest() >> validate_data() >> version_data()
    versioned >> materialize_user_features()
    trained = train_user_model()
    versioned >> trained
    blessed = shift_gate(evaluate(trained))
    promoted = promote(trained)
    blessed >> promoted
    verify_serving(rollout(materialize_embeddings(promoted)))


sum_daily()
