"""The top floor: what runs a day and what an operator does. It imports every lower layer; none imports it.

Modules:
    tasks        one function per DAG task (ingest ... verify_serving), idempotent per date; STAGES
    promotion    promote_snapshot, rollback_production, baseline_history, parent_for
    faults       CANDIDATE_FAULTS (the DAG's candidate_fault param), inject_fault
    soak         many simulated days with faults and corrupted partitions through the DAG, scored
    airflow_env  a project-local Airflow (SQLite metadata DB under the workspace), run_date (dag.test)
    cli          ``sumctl`` (Typer)
"""
