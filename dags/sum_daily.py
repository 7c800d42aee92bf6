"""The daily SUM loop (DESIGN.md): validate -> train -> evaluate -> gate -> promote -> materialize -> rollout.

Each task is a thin call into :mod:`sum_platform.pipeline`; heavy libraries are imported inside the
tasks. A held snapshot is a verdict, not a failure: ``shift_gate`` short-circuits, so promotion,
materialization, rollout and verification show as *skipped* and production keeps serving.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

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
    start_date=datetime(2026, 1, 1),
    catchup=True,
    # Each day warm-starts from the previous day's production snapshot, and DVC holds a repo lock:
    # runs go one at a time, in date order.
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "candidate_fault": Param(
            None,
            type=["null", "string"],
            enum=[None, "reinit", "perturb", "explode_lr", "nan"],
            description="Gate drill: reinit | perturb | explode_lr | nan corrupts the day's candidate on purpose.",
        ),
    },
    tags=["sum", "training", "serving"],
    doc_md=__doc__,
)
def sum_daily():
    @task(retries=0)
    def ingest() -> dict:
        from sum_platform import pipeline

        return pipeline.ingest(_ds())

    @task(retries=0)
    def validate_data() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from sum_platform import pipeline
        from validation.data_checks import DataValidationError

        try:
            return pipeline.validate_data(_ds())
        except DataValidationError as err:
            # Bad data does not get better on retry: fail now, naming the failed checks.
            raise AirflowFailException(str(err)) from err

    @task
    def version_data() -> dict:
        from sum_platform import pipeline

        return pipeline.version_data(_ds())

    @task
    def materialize_user_features() -> dict:
        from sum_platform import pipeline

        return pipeline.materialize_user_features(_ds())

    @task(retries=0)
    def train_user_model() -> dict:
        from sum_platform import pipeline

        fault = get_current_context()["params"].get("candidate_fault")
        return pipeline.train_user_model(_ds(), candidate_fault=fault)

    @task
    def evaluate() -> dict:
        from sum_platform import pipeline

        return pipeline.evaluate(_ds())

    @task.short_circuit(doc_md="Judges the candidate against production (cosine, L2 change raw and after "
                         "average pooling, NE non-regression). Held: downstream tasks are skipped, production stays.")
    def shift_gate() -> bool:
        from sum_platform import pipeline

        verdict = pipeline.shift_gate(_ds())
        ctx = get_current_context()
        lines = [f"**{verdict['snapshot_id']}: {verdict['verdict'].upper()}**", "", "| check | value | threshold | ok |",
                 "|---|---|---|---|"]
        lines += [f"| {c['name']} | {'-' if c['value'] is None else format(c['value'], '.4g')} | {c['op']} {c['threshold']:.4g} | {'yes' if c['passed'] else 'NO'} |"
                  for c in verdict["checks"]]
        lines += [""] + [f"- {r}" for r in verdict["reasons"]]
        # Operators read the verdict in the UI: the table in the task log, the numbers in the XComs
        # `verdict` (JSON) and `verdict_table` (markdown).
        ctx["ti"].xcom_push(key="verdict", value=verdict)
        ctx["ti"].xcom_push(key="verdict_table", value="\n".join(lines))
        print("\n".join(lines))
        return bool(verdict["blessed"])

    @task
    def promote() -> dict:
        from sum_platform import pipeline

        return pipeline.promote(_ds())

    @task
    def materialize_embeddings() -> dict:
        from sum_platform import pipeline

        return pipeline.materialize_embeddings(_ds())

    @task
    def rollout() -> dict:
        from sum_platform import pipeline

        return pipeline.rollout(_ds())

    @task
    def verify_serving() -> dict:
        from sum_platform import pipeline

        return pipeline.verify_serving(_ds())

    versioned = ingest() >> validate_data() >> version_data()
    versioned >> materialize_user_features()
    gate = versioned >> train_user_model() >> evaluate() >> shift_gate()
    gate >> promote() >> materialize_embeddings() >> rollout() >> verify_serving()


sum_daily()
