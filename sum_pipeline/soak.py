"""The soak: many simulated days through the real DAG with deliberate faults, and the gate's score.

A plan mixes normal days, days whose candidate is deliberately shifted (``sum_pipeline.faults.CANDIDATE_FAULTS``)
and days whose partition arrives corrupted (``validation.corruptions``). The promise it checks
(issue 5): zero shifted candidates promoted, at least 95% of normal candidates promoted, every
corrupted partition caught. A caught date is then fixed (the simulator redelivers it) and rerun, as an
operator would, so the loop continues.

As deployed, every promotion triggers ``sum_downstream`` (the consumers retrain on the promoted day), so the soak
runs it after each promoted day; the next days' consumer checks then ask those models. Each day records what every
family of the gate's checks (``validation.gate.CHECK_FAMILIES``: sanity, proxies, consumers) said, enforced by
``gate.mode`` or only reported, so the summary scores the proxy and consumer checks side by side: a family's false
promotions (shifted candidates it passed) and false holds (normal candidates it held).
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
from validation.gate import CHECK_FAMILIES, check_family

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
    # What each check family said of the candidate (family_outcomes; empty: no verdict, e.g. a caught partition),
    # the consumer rows of the verdict, and sum_downstream's state after a promotion.
    families: dict[str, str] = field(default_factory=dict)
    consumers: list[dict[str, Any]] = field(default_factory=list)
    downstream_state: str | None = None
    rerun_families: dict[str, str] | None = None  # the fixed date's rerun (a normal candidate)


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

    @property
    def normal_families(self) -> list[dict[str, str]]:
        """What the check families said of every normal candidate (including a fixed date's rerun)."""
        out = [d.families for d in self.days if d.kind == "normal"]
        out += [d.rerun_families or {} for d in self.corrupted if d.rerun_state is not None]
        return out

    def family_scores(self) -> dict[str, dict[str, int]]:
        """Per check family: shifted and normal candidates it judged, its false promotions (shifted candidates it
        passed) and false holds (normal candidates it failed), whether or not ``gate.mode`` enforced it."""
        out = {}
        for family in CHECK_FAMILIES:
            shifted = [d.families.get(family) for d in self.shifted]
            normal = [f.get(family) for f in self.normal_families]
            out[family] = {
                "shifted_judged": sum(o in ("pass", "fail") for o in shifted),
                "false_promotions": shifted.count("pass"),
                "normal_judged": sum(o in ("pass", "fail") for o in normal),
                "false_holds": normal.count("fail"),
            }
        return out

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
            "families": self.family_scores(),
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


def run_soak(schedule: list[tuple[str, str, str]], on_day: Callable[[SoakDay], None] | None = None,
             on_run: Callable[[str, airflow_env.DagRunResult], None] | None = None) -> SoakReport:
    """Runs the schedule through the real DAG (``dag.test()`` per date) in the configured workspace.

    Airflow must be configured (``sum_pipeline.airflow_env.configure``) before this is called.

    Args:
        schedule: ``(ds, kind, detail)`` per day (:func:`plan`).
        on_day: Called with each day's record once the day is done.
        on_run: Called with every daily DAG run's result (its xcoms: the verdict, the consumer table), keyed by the
            date, or ``"<ds> rerun"`` for a fixed date's rerun.
    """
    report = SoakReport()
    for ds, kind, detail in schedule:
        t0 = time.perf_counter()
        day = SoakDay(ds=ds, kind=kind, detail=detail)
        if kind == "corrupt":
            deliver_corrupted(ds, detail)
        result = airflow_env.run_date(ds, {"candidate_fault": detail} if kind == "fault" else {})
        if on_run:
            on_run(ds, result)
        day.state = result.state
        verdict = result.xcoms.get("shift_gate.verdict") or {}
        day.verdict = verdict.get("verdict", "-")
        day.families = family_outcomes(verdict)
        day.consumers = consumer_rows(verdict)
        day.promoted = _promoted(ds)
        if kind == "corrupt":
            day.caught = result.task_states.get("validate_data") == "failed" and not day.promoted
            redeliver(ds)
            rerun = airflow_env.run_date(ds)
            if on_run:
                on_run(f"{ds} rerun", rerun)
            day.rerun_state = rerun.state
            day.rerun_families = family_outcomes(rerun.xcoms.get("shift_gate.verdict") or {})
            day.rerun_promoted = _promoted(ds)
        if day.promoted or day.rerun_promoted:  # the promotion's asset event triggers sum_downstream, as deployed
            day.downstream_state = airflow_env.run_date(ds, dag_id="sum_downstream").state
        day.seconds = time.perf_counter() - t0
        report.days.append(day)
        log.info("soak %s %s %s: %s, verdict %s, promoted %s", ds, kind, detail, day.state, day.verdict, day.promoted)
        if on_day:
            on_day(day)
    return report


def _promoted(ds: str) -> bool:
    prod = context().registry.production()
    return bool(prod and prod.snapshot_id == snapshot_id_for(ds))


def family_outcomes(verdict: dict[str, Any]) -> dict[str, str]:
    """What each check family said of a candidate (``validation.gate.Verdict.to_dict``), enforced or not.

    Returns:
        ``{family: "fail" | "pass"}``: ``fail`` when any of its checks failed, ``pass`` when at least one was
        measured and none failed; a family with no measured check (no consumer yet, all not measurable) is absent.
    """
    out: dict[str, str] = {}
    for check in verdict.get("checks") or []:
        outcome = check.get("outcome") or ("pass" if check["passed"] else "fail")
        if outcome == "not_measurable":
            continue
        family = check_family(check["name"])
        out[family] = "fail" if outcome == "fail" or out.get(family) == "fail" else "pass"
    return out


def consumer_rows(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict's consumer rows, as the soak reports them: model, NE change %, its 95 % interval, outcome."""
    return [{"consumer": c["consumer"], "change_pct": c.get("change_pct"), "change_ci": c.get("change_ci"),
             "outcome": c["outcome"]} for c in verdict.get("consumers") or []]


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
