"""The DAG folder parses with no import errors and wires the daily loop in the designed order."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sum_pipeline.faults import CANDIDATE_FAULTS
from sum_pipeline.tasks import STAGES
from sum_platform.config import load_params

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dagbag_has_no_import_errors(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    assert "sum_daily" in bag.dag_ids


@pytest.mark.slow
def test_daily_dag_order_and_gate(airflow_db):
    from sum_pipeline.airflow_env import load_dag

    dag = load_dag()
    assert set(dag.task_ids) == set(STAGES) | {"approve_held"}
    # One chain: training reads the offline store through Feast, which refuses a view while it materializes.
    for upstream, downstream in zip(STAGES, STAGES[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids, (upstream, downstream)
    assert dag.get_task("shift_gate").task_type == "_BranchPythonDecoratedOperator"
    # The day's user features reach the online store whatever the gate says.
    assert "materialize_user_features" in dag.get_task("version_data").downstream_task_ids
    # The candidate's id travels as a task argument from training to promotion.
    assert "train_user_model" in dag.get_task("promote").upstream_task_ids
    schedule = load_params().airflow
    assert dag.max_active_runs == 1 and dag.catchup == schedule.catchup
    assert dag.start_date.date().isoformat() == schedule.start_date
    assert (dag.end_date.date().isoformat() if dag.end_date else None) == schedule.end_date
    assert dag.params.get_param("candidate_fault").schema["enum"] == [None, *CANDIDATE_FAULTS]
    # Retries from params, except where a failure is the data's or the model's (a retry would not help).
    rollout = dag.get_task("rollout")
    assert rollout.retries == schedule.task_retries
    assert rollout.retry_delay.total_seconds() == schedule.retry_delay_seconds
    assert {t: dag.get_task(t).retries for t in ("ingest", "validate_data", "train_user_model")} == dict.fromkeys(
        ("ingest", "validate_data", "train_user_model"), 0)


@pytest.mark.slow
def test_held_candidate_waits_for_an_approval_with_the_configured_timeout(airflow_db):
    from datetime import timedelta

    from airflow.providers.standard.operators.hitl import ApprovalOperator

    from sum_pipeline.airflow_env import load_dag
    from sum_platform.config import load_params

    dag = load_dag()
    approve = dag.get_task("approve_held")
    assert isinstance(approve, ApprovalOperator)
    assert approve.upstream_task_ids == {"shift_gate"} and approve.downstream_task_ids == {"promote"}
    assert approve.response_timeout == timedelta(minutes=load_params().airflow.approval_timeout_minutes)
    assert approve.defaults == [ApprovalOperator.REJECT]  # unanswered: stays held
    assert set(approve.params) == {"reason"}  # the DAG's own params are not asked of the approver
    assert "verdict_table" in approve.body and "snapshot_id" in approve.subject
    # promote runs after the gate chose it (approval skipped) or after an approval; a rejection skips it.
    promote = dag.get_task("promote")
    assert {"shift_gate", "approve_held"} <= promote.upstream_task_ids
    assert promote.trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("materialize_embeddings").trigger_rule == "all_success"
    await_approval = dag.params.get_param("await_approval")
    assert await_approval.value is True and await_approval.schema["type"] == "boolean"


@pytest.mark.slow
def test_gate_verdict_is_an_event_of_the_user_tower_asset(airflow_db):
    from airflow.sdk import Asset

    from sum_pipeline.airflow_env import load_dag

    outlets = load_dag().get_task("shift_gate").outlets
    assert outlets == [Asset("sum_user_tower")]


@pytest.mark.slow
def test_downstream_dag_is_scheduled_on_the_promotion(airflow_db):
    from sum_pipeline.airflow_env import load_dag

    daily, downstream = load_dag(), load_dag("sum_downstream")
    assert [a.name for a in daily.get_task("promote").outlets] == ["sum_production_tower"]
    assert [a.name for a in downstream.timetable.asset_condition.objects] == ["sum_production_tower"]
    assert downstream.max_active_runs == 1
    # Frames first (Feast), then the models: the day flows as task arguments.
    assert downstream.get_task("retrain").upstream_task_ids == {"training_frames"}


@pytest.mark.parametrize("dag_file", ["sum_daily.py", "sum_downstream.py"])
def test_parsing_the_dag_imports_no_heavy_library(dag_file):
    """The DAG processor parses the file often: torch, Ray, Feast, GX and DVC are imported by tasks only."""
    code = ("import runpy, sys, json; runpy.run_path(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in ('torch', 'ray', 'feast', 'great_expectations', 'dvc', 'gto') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, str(PROJECT_ROOT / "dags" / dag_file)],
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
