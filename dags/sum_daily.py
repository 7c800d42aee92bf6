"""The daily SUM loop: validate -> train -> evaluate -> check consumers -> gate -> promote -> materialize -> rollout
-> verify.

Each task is a thin call into :mod:`sum_pipeline.tasks` (torch, Feast, GX and Ray are imported inside
those calls, never when the DAG is parsed). The candidate's id flows from ``train_user_model`` through
evaluation, the consumer check, the gate and promotion as task arguments. ``check_consumers`` scores each saved
downstream model with what serving would hand it after the promotion against what it gets now (``gate.mode``
decides whether that, the proxies, or both can hold the candidate).

``shift_gate`` branches on its verdict (and records it as an event of the asset ``sum_user_tower``,
whose ``extra`` the UI shows on the asset's page): a blessed candidate goes straight to ``promote``
(``approve_held`` shows as *skipped*); a held one waits in ``approve_held`` for a human (the
Required Actions page) for ``airflow.approval_timeout_minutes``. *Approve* promotes it in the same
run, forced, with the responding user and their reason in the registry's lineage; *Reject*, or no
answer before the timeout, keeps it held: promotion, materialization, rollout and verification show
as *skipped* and production keeps serving. A held snapshot is a verdict, not a failure. With the
run parameter ``await_approval`` false (``dag.test()`` runs: nothing would ever answer them), a held
candidate skips the approval too.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.definitions.param import ParamsDict

from sum_pipeline import tasks
from sum_pipeline.faults import CANDIDATE_FAULTS
from sum_platform.config import load_params
from validation.data_checks import DataValidationError
from validation.gate import verdict_markdown, verdict_summary

SCHEDULE = load_params().airflow  # the data's dates, catch-up, retries and the approval timeout: params.yaml


def _date(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=timezone.utc)

DEFAULT_ARGS = {
    "owner": "sum-platform",
    "retries": SCHEDULE.task_retries,
    "retry_delay": timedelta(seconds=SCHEDULE.retry_delay_seconds),
}


#: The production user tower: every gate verdict is an event of it, its numbers in the event's ``extra``.
USER_TOWER = Asset("sum_user_tower")
#: A promotion: the DAG sum_downstream (downstream models retrained on the day) is scheduled on it.
PRODUCTION_TOWER = Asset("sum_production_tower")


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
        "await_approval": Param(
            True,
            type="boolean",
            description="A held candidate waits for a human in approve_held (false: it stays held at once, "
                        "as dag.test() runs need: they never resolve an approval).",
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

    @task(doc_md="What each saved downstream model would lose if the candidate were promoted: its NE on the day's "
                 "consumer holdout with what serving hands out now vs after the promotion (paired interval over "
                 "users), the share of impressions made worse, and the change against no SUM.")
    def check_consumers(evaluation: dict) -> dict:
        return tasks.check_consumers(_ds(), evaluation["snapshot_id"])

    @task.branch(outlets=[USER_TOWER],
                 doc_md="Judges the candidate against production (cosine, L2 change raw and after average pooling, "
                        "NE non-regression) and by its consumers (check_consumers), as gate.mode says. Blessed: promote. Held: approve_held (or nothing when the run does "
                        "not await approval); production stays unless a human approves.")
    def shift_gate(evaluation: dict, consumers: dict) -> list[str]:
        verdict = tasks.shift_gate(_ds(), consumers["snapshot_id"])
        table = verdict_markdown(verdict)
        # Operators read the verdict in the UI: the numbers on the sum_user_tower asset event, the table in
        # the task log and the approval's body, the whole verdict in the XComs `verdict` (JSON) and
        # `verdict_table` (markdown).
        ctx = get_current_context()
        ctx["outlet_events"][USER_TOWER].extra = verdict_summary(verdict, evaluation["ne"])
        ctx["ti"].xcom_push(key="verdict", value=verdict)
        ctx["ti"].xcom_push(key="verdict_table", value=table)
        print(table)
        if verdict["blessed"]:
            return ["promote"]
        return ["approve_held"] if ctx["params"].get("await_approval", True) else []

    approve_held = ApprovalOperator(
        task_id="approve_held",
        subject="Promote the held snapshot {{ ti.xcom_pull(task_ids='shift_gate', key='verdict')['snapshot_id'] }}?",
        body="{{ ti.xcom_pull(task_ids='shift_gate', key='verdict_table') }}",
        params=ParamsDict({"reason": Param("", type="string", description="Why it may go to production (recorded).")}),
        defaults=ApprovalOperator.REJECT,  # no answer in time: the candidate stays held
        response_timeout=timedelta(minutes=SCHEDULE.approval_timeout_minutes),
        retries=0,
        doc_md="A held candidate waits here for a human: Approve promotes it (forced, the responding user and "
               "the reason recorded), Reject or the timeout keeps it held and skips what follows.",
    )

    # Runs when the gate chose it, or after an approval (a rejection skips it). Blessed: approve_held is
    # skipped, which the trigger rule lets through.
    @task(trigger_rule="none_failed_min_one_success", outlets=[PRODUCTION_TOWER])
    def promote(trained: dict) -> dict:
        ctx = get_current_context()
        approval = ctx["ti"].xcom_pull(task_ids="approve_held")
        promoted = tasks.promote(_ds(), trained["snapshot_id"], **tasks.approval_override(approval))
        # The event names the day, so sum_downstream knows what to retrain on (an asset-triggered run has no date).
        ctx["outlet_events"][PRODUCTION_TOWER].extra = {"ds": _ds(), "snapshot_id": promoted["snapshot_id"]}
        return promoted

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
    trained = train_user_model()
    # Training reads the offline store through Feast, which refuses a view that is MATERIALIZING: under a
    # scheduler that runs tasks side by side, training waits for the day's materialization.
    versioned >> materialize_user_features() >> trained
    evaluation = evaluate(trained)
    gate = shift_gate(evaluation, check_consumers(evaluation))
    promoted = promote(trained)
    gate >> [promoted, approve_held]
    approve_held >> promoted
    verify_serving(rollout(materialize_embeddings(promoted)))


sum_daily()
