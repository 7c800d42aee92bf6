"""Downstream ranking models retrained on each promoted day: what the SUM embeddings are worth to them.

Scheduled on the asset ``sum_production_tower``, which the daily DAG's ``promote`` updates with the promoted
day in the event's ``extra``; several promotions queued while a run was busy are retrained in date order.
An operator can also trigger it by hand with ``{"ds": "YYYY-MM-DD"}`` (a backfill of one day).

``training_frame`` joins the day's impressions with the embeddings serving returned at their time (Feast's
point-in-time join over the logged writes); ``retrain`` scores every model of ``downstream.models`` with and
without the embeddings on that unseen day, then trains each on it (warm start from its previous day). The NEs
with and without SUM are the run's XCom and the ``sum_downstream_models`` asset event's ``extra``.
"""

from __future__ import annotations

from datetime import datetime, timezone

from airflow.sdk import Asset, Param, dag, get_current_context, task

from sum_pipeline import retrain_downstream
from sum_platform.config import load_params

SCHEDULE = load_params().airflow

#: Updated by sum_daily's promote (the same asset, by name); this DAG's trigger.
PRODUCTION_TOWER = Asset("sum_production_tower")
#: The retrained downstream models: each run's NEs with and without SUM, on the event.
DOWNSTREAM_MODELS = Asset("sum_downstream_models")


@dag(
    dag_id="sum_downstream",
    description="Downstream models retrained with and without the SUM embeddings on each promoted day.",
    schedule=[PRODUCTION_TOWER],
    start_date=datetime.fromisoformat(SCHEDULE.start_date).replace(tzinfo=timezone.utc),
    catchup=False,
    # Each model warm-starts from its previous day: runs go one at a time.
    max_active_runs=1,
    default_args={"owner": "sum-platform", "retries": 0},
    params={"ds": Param(None, type=["null", "string"], format="date",
                        description="Retrain on this day (a manual run); asset-triggered runs take the promoted days.")},
    tags=["sum", "downstream"],
)
def sum_downstream():
    @task
    def promoted_days() -> list[str]:
        ctx = get_current_context()
        events = [e for evs in (ctx.get("triggering_asset_events") or {}).values() for e in evs]
        days = sorted({str(e.extra["ds"]) for e in events if (e.extra or {}).get("ds")})
        manual = ctx["params"].get("ds")
        if manual:
            days = sorted(set(days) | {manual})
        if not days:
            raise ValueError("no day to retrain on: trigger with {\"ds\": \"YYYY-MM-DD\"} or from a promotion")
        return days

    @task
    def training_frames(days: list[str]) -> list[dict]:
        return [retrain_downstream.training_frame(ds) for ds in days]

    @task(outlets=[DOWNSTREAM_MODELS])
    def retrain(frames: list[dict]) -> list[dict]:
        results = [retrain_downstream.retrain(f["ds"], f["frame"]) for f in frames]
        get_current_context()["outlet_events"][DOWNSTREAM_MODELS].extra = {
            r["ds"]: {name: {k: m[k] for k in ("ne_with_sum", "ne_without_sum", "ne_diff_pct")}
                      for name, m in r["models"].items()} for r in results}
        for r in results:  # the task log shows the day's table
            for name, m in r["models"].items():
                print(f"{r['ds']} {name:<11} NE with SUM {m['ne_with_sum']}  without {m['ne_without_sum']}  "
                      f"diff {m['ne_diff_pct']} %  coverage {m['embedding_coverage']:.3f}")
        return results

    retrain(training_frames(promoted_days()))


sum_downstream()
