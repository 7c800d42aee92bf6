"""The soak: many simulated days through the real DAG with deliberate faults, and the gate's score.

A plan mixes normal days, days whose candidate is deliberately shifted (``sum_pipeline.faults.CANDIDATE_FAULTS``)
and days whose partition arrives corrupted (``validation.corruptions``). The promise it checks
(issue 5): zero shifted candidates promoted, at least 95% of normal candidates promoted, every
corrupted partition caught. A caught date is then fixed (the simulator redelivers it) and rerun, as an
operator would, so the loop continues.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Any, Callable

from sum_pipeline import airflow_env
from sum_platform.config import Params
from sum_platform.context import context
from sum_platform.feature_store import apply_definitions, feature_spec
from sum_platform.files import write_partition
from sum_platform.partitions import PartitionReadError, read_partition
from sum_platform.simulate import simulate_day, write_day
from sum_platform.workspace import Workspace, snapshot_id_for
from sum_models.spec import FeatureSpec
from validation.corruptions import CATALOGUE, Corruption, CorruptionContext

log = logging.getLogger(__name__)


@dataclass
class SoakDay:
    ds: str
    kind: str  # "normal", "fault", "corrupt"
    detail: str = ""
    state: str = ""
    verdict: str = "-"
    promoted: bool = False
    caught: bool | None = None
    rerun_state: str | None = None
    rerun_promoted: bool | None = None
    seconds: float = 0.0


@dataclass
class SoakReport:
    days: list[SoakDay] = field(default_factory=list)

    @property
    def shifted(self) -> list[SoakDay]:
        return [d for d in self.days if d.kind == "fault"]

    @property
    def normal_outcomes(self) -> list[bool]:
        """Promotion outcome of every normal candidate (including a fixed date's rerun)."""
        out = [d.promoted for d in self.days if d.kind == "normal"]
        out += [bool(d.rerun_promoted) for d in self.days if d.kind == "corrupt" and d.rerun_state is not None]
        return out

    @property
    def corrupted(self) -> list[SoakDay]:
        return [d for d in self.days if d.kind == "corrupt"]

    def summary(self) -> dict[str, Any]:
        normal = self.normal_outcomes
        return {
            "days": len(self.days),
            "shifted_candidates": len(self.shifted),
            "shifted_promoted": sum(d.promoted for d in self.shifted),
            "normal_candidates": len(normal),
            "normal_promoted": sum(normal),
            "normal_promotion_rate": (sum(normal) / len(normal)) if normal else None,
            "corrupted_partitions": len(self.corrupted),
            "corrupted_caught": sum(bool(d.caught) for d in self.corrupted),
            "seconds": round(sum(d.seconds for d in self.days), 1),
        }

    def passed(self, min_normal_rate: float = 0.95) -> bool:
        s = self.summary()
        rate = s["normal_promotion_rate"]
        return (s["shifted_promoted"] == 0 and (rate is None or rate >= min_normal_rate)
                and s["corrupted_caught"] == s["corrupted_partitions"])

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "days": [asdict(d) for d in self.days]}


def plan(days: int, start: str, faults: tuple[str, ...], corruptions: tuple[str, ...],
         fault_every: int = 5, corrupt_every: int = 7) -> list[tuple[str, str, str]]:
    """A deterministic schedule of ``(ds, kind, detail)``: the first two days are always normal.

    Fault days fall on every ``fault_every``-th day from day 3, corrupted days on every
    ``corrupt_every``-th day from day 4, cycling through the given fault and corruption kinds.
    """
    first = date.fromisoformat(start)
    out, f, c = [], 0, 0
    for i in range(days):
        ds = (first + timedelta(days=i)).isoformat()
        if i >= 2 and faults and (i - 2) % fault_every == 0:
            out.append((ds, "fault", faults[f % len(faults)]))
            f += 1
        elif i >= 3 and corruptions and (i - 3) % corrupt_every == 0:
            out.append((ds, "corrupt", corruptions[c % len(corruptions)]))
            c += 1
        else:
            out.append((ds, "normal", ""))
    return out


def run_soak(schedule: list[tuple[str, str, str]], on_day: Callable[[SoakDay], None] | None = None) -> SoakReport:
    """Runs the schedule through the real DAG (``dag.test()`` per date) in the configured workspace.

    Airflow must be configured (``sum_pipeline.airflow_env.configure``) before this is called.
    """
    report = SoakReport()
    ctx = context()
    for ds, kind, detail in schedule:
        t0 = time.perf_counter()
        day = SoakDay(ds=ds, kind=kind, detail=detail)
        if kind == "corrupt":
            deliver_corrupted(ds, detail)
        result = airflow_env.run_date(ds, {"candidate_fault": detail} if kind == "fault" else {})
        day.state = result.state
        day.verdict = (result.xcoms.get("shift_gate.verdict") or {}).get("verdict", "-")
        prod = ctx.registry.production()
        day.promoted = bool(prod and prod.snapshot_id == snapshot_id_for(ds))
        if kind == "corrupt":
            day.caught = result.task_states.get("validate_data") == "failed" and not day.promoted
            redeliver(ds)
            rerun = airflow_env.run_date(ds)
            prod = ctx.registry.production()
            day.rerun_state = rerun.state
            day.rerun_promoted = bool(prod and prod.snapshot_id == snapshot_id_for(ds))
        day.seconds = time.perf_counter() - t0
        report.days.append(day)
        log.info("soak %s %s %s: %s, verdict %s, promoted %s", ds, kind, detail, day.state, day.verdict, day.promoted)
        if on_day:
            on_day(day)
    return report


def deliver_corrupted(ds: str, kind: str) -> None:
    """Writes the day's partitions as the simulator would, corrupted as ``kind`` (``validation.corruptions``)."""
    ctx = context()
    inject(kind, ctx.ws, ds, ctx.params)


def inject(
    name: str, ws: Workspace, ds: str, params: Params, spec: FeatureSpec | None = None, seed: int = 0,
) -> Corruption:
    """Writes a corrupted partition pair for ``ds`` into the workspace (for the soak and drills).

    Today's good frames come from the simulator; the previous day's (stale/stuck kinds) from the workspace's
    partitions of ``ds - 1`` if present, else from the simulator. The partitions are replaced in place, so
    the next DAG run of ``ds`` validates (and quarantines) them; ``ingest`` leaves existing partitions alone.

    Returns:
        The corruption applied (its ``expected_check(spec)`` names the check that must fail).
    """
    corruption = CATALOGUE[name]
    spec = spec or feature_spec(params, apply_definitions(params))
    events, users = simulate_day(ds, params)
    previous = None
    if corruption.needs_history:
        yesterday = (date.fromisoformat(ds) - timedelta(days=1)).isoformat()
        try:
            previous = (read_partition(ws.events_dir(yesterday)), read_partition(ws.users_dir(yesterday)))
        except PartitionReadError:
            previous = simulate_day(yesterday, params)
    events, users = corruption.apply(events, users, CorruptionContext(ds, spec, previous, seed))
    write_partition(events, ws.events_dir(ds))
    write_partition(users, ws.users_dir(ds))
    return corruption


def redeliver(ds: str) -> None:
    """The fix: the upstream (here the simulator) delivers the day's partitions again, correct."""
    ctx = context()
    write_day(ds, ctx.params, ctx.ws, overwrite=True)
