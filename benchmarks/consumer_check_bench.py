"""What the consumer check (``check_consumers``) costs a day, and where its time goes (not a test; issue 27 item 7).

At the default size (the params in force, ``params.yaml`` as shipped: the simulator's default day, ``gate.mode: both``,
``gate.consumer_bootstrap`` resamples), in a workspace of its own, simulated days run through the real daily DAG in this
process (``sum_pipeline.airflow_env.run_date``, ``dag.test()``), and the ``sum_downstream`` DAG after each promoted day
but the last, so that consumers exist. The check is measurable from the third day on: the models saved on day 1 never
saw an embedding (nothing was served before day 1's batch), the ones saved on day 2 did. For each measured day it
prints:

* the day's wall time (the ``run_date`` call) and each task's seconds (its task instance's start to end);
* ``check_consumers``' seconds, its share of the day and what it adds to the day without it (target: <= 20 %);
* inside ``check_consumers``, the split, timed here by calling the library functions the task calls, on the same day,
  the least of three runs (the table they give is compared with the one the task wrote): reading and joining the
  holdout rows, embedding the holdout users with each snapshot (candidate, production, older ones), pooling them into
  what serving hands out now and after, the downstream models' predictions (encoding included), the paired bootstrap;
* the physical floor measured in the same run: the bare forward passes the check cannot avoid (the user tower of
  each snapshot on the holdout users' encoded features, each downstream model on the encoded holdout rows with each
  arm's embeddings), and ``check_consumers / floor``; the fp32 matmul peak of this machine, for scale.

Run (about 4 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.consumer_check_bench --json reports/consumer_check_bench.json
    .venv/bin/python -m benchmarks.consumer_check_bench --smoke --json /tmp/cc.json   # small days: runs to its end

``--smoke``: days of a few users and few resamples, a loose gate so that the small days are promoted (what is
measured is meaningless, the report has every section). ``--workdir``: the folder of its workspace and params
(default: a new folder under ``.sum/bench/``, never the demo workspace). Airflow and Ray: the process's own (a
metadata DB in the benchmark's workspace, a local Ray + Serve on ports offset by ``--port-offset``), or the ones
already set up in the process (the test session's: ``airflow_env.configure`` put its DB in the environment, its Ray
is initialised). Plot: ``<json stem>.png`` (else in the workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from benchmarks.train_bench import matmul_peak
from serving.ray_cluster import ensure_ray, shutdown
from sum_models.shift import POOL_DEPTH
from sum_pipeline import airflow_env
from sum_pipeline.airflow_env import run_date
from sum_pipeline.promotion import baseline_history
from sum_pipeline.retrain_downstream import latest_before, load_downstream
from sum_platform.config import PROJECT_ROOT, load_params, params_path
from sum_platform.context import context
from sum_platform.downstream_inputs import downstream_specs_for
from sum_platform.files import read_json
from sum_platform.partitions import read_partition
from sum_platform.sources import joined_day
from sum_platform.workspace import Workspace, snapshot_id_for
from validation.consumers import consumer_users, measure_consumer
from validation.gate import served_values

TASK = "check_consumers"
TARGET_ADDED = 0.20  # issue 27 item 7: the consumer check adds <= 20 % to a day's wall time
DAYS = 3  # the first day whose consumer check is measurable
PORT_OFFSET = 300  # clear of the operator's stack and of the other benchmarks' (stack 100, scale 200)
SMOKE_USERS = 120
SMOKE_RESAMPLES = 100  # gate.consumer_bootstrap's least
# --smoke: so few users fail the data gate's drift checks on sampling noise alone and give a held candidate (NE above
# gate.max_ne) with "not measurable" evidence; the smoke must still promote its days so that consumers exist and the
# check runs its whole path.
SMOKE_VALIDATION = {"drift_max_kl": 10.0, "sparse_length_max_kl": 10.0}
SMOKE_GATE = {"max_ne": 10.0, "max_ne_regression": 10.0, "min_label_count": 1,
              "not_measurable_without_production": "bless", "consumer_max_ne_regression_pct": 1e6}
SPLIT = ("read_and_join", "embed", "pool", "predict", "bootstrap")
SPLIT_REPEAT = 3  # the pieces are timed this many times, the least kept


def _params(root: Path, users: int | None, resamples: int | None, port_offset: int, smoke: bool) -> Path:
    """The params in force with the benchmark's workspace, ports and (smoke) sizes, written under ``root``."""
    raw = yaml.safe_load(params_path().read_text())
    if users is not None:
        raw["simulator"].update({"initial_users": users, "new_users_per_day": max(users // 15, 1)})
    if resamples is not None:
        raw["gate"]["consumer_bootstrap"] = resamples
    if smoke:
        raw["gate"].update(SMOKE_GATE)
        raw["validation"].update(SMOKE_VALIDATION)
    raw["paths"] = {"workspace": str(root / "workspace"), "dvc_remote": str(root / "remote")}
    for section, key in (("serving", "port"), ("airflow", "port"), ("ray", "gcs_port"), ("ray", "dashboard_port")):
        raw[section][key] += port_offset
    raw["feature_store"]["redis"]["port"] += port_offset
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextmanager
def _in_force(params_file: Path) -> Iterator[None]:
    """The benchmark's params (and their workspace) in force in this process, the previous ones restored after."""
    keys = ("SUM_PARAMS", "SUM_WORKSPACE", "SUM_RAY_ADDRESS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["SUM_PARAMS"] = str(params_file)
    os.environ.pop("SUM_WORKSPACE", None)
    os.environ["SUM_RAY_ADDRESS"] = "local"  # the tasks run in this process, with this process's Ray
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _seconds(ti: dict[str, Any]) -> float:
    """A task instance's run time: its start to its end."""
    start, end = ti.get("start_date"), ti.get("end_date")
    if start and end:
        return (pd.Timestamp(end) - pd.Timestamp(start)).total_seconds()
    return float(ti.get("duration") or 0.0)


class _Clock:
    """Sums wall time per named piece (``with clock("embed"): ...``)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0


def _best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def split_check(ds: str) -> dict[str, Any]:
    """The consumer check of ``ds`` again, piece by piece, with the library calls the task makes (see
    ``sum_pipeline.check_consumers``), and the bare forward passes of it (the floor).

    Returns:
        ``{"split": {piece: s}, "per_snapshot_embed_s", "floor": {...}, "users", "rows", "snapshots",
        "consumers": [ConsumerEffect dicts]}``.
    """
    import torch

    from sum_models.data import encode_users
    from sum_models.downstream_train import DownstreamData, predict_downstream
    from sum_models.runtime import torch_threads
    from sum_models.snapshot import embed_users_finite, load_user_tower

    ctx = context()
    params, ws = ctx.params, ctx.ws
    cfg, ev = params.gate, params.events
    snapshot_id = snapshot_id_for(ds)
    clock = _Clock()
    floor: dict[str, float] = {"tower_forward_s": 0.0, "downstream_forward_s": 0.0}
    with clock("read_and_join"):
        history = baseline_history(snapshot_id, ctx)
        consumers = {}
        for name in params.downstream.models:
            root = ws.root / "downstream" / name
            with_sum = latest_before(root / "with_sum", ds)
            if with_sum is not None:
                consumers[name] = (with_sum, latest_before(root / "without_sum", ds))
        events, users = read_partition(ws.events_dir(ds)), read_partition(ws.users_dir(ds))
        events = events[consumer_users(events[ev.user_id].to_numpy(), cfg.consumer_holdout_users)]
        frame = joined_day(events, users, params).reset_index(drop=True)
        people = (users[users[ev.user_id].isin(frame[ev.user_id].unique())].sort_values(ev.timestamp, kind="stable")
                  .drop_duplicates(ev.user_id, keep="last").sort_values(ev.user_id).reset_index(drop=True))
    snapshots = [snapshot_id, *history[:POOL_DEPTH]]
    embeddings, per_snapshot = [], {}
    skipped = np.zeros(len(people), dtype=bool)
    for sid in snapshots:
        t0 = time.perf_counter()
        with clock("embed"):
            tower, _ = load_user_tower(ws.snapshot_dir(sid))
            emb, why = embed_users_finite(tower, people, tower.spec)
        per_snapshot[sid] = time.perf_counter() - t0
        skipped |= why != ""
        embeddings.append(emb)
        # Floor: the tower's forward on the users' encoded features (no loading, encoding, fp16 or checks).
        inputs = encode_users(people, tower.spec)
        with torch.inference_mode():
            floor["tower_forward_s"] += _best_of(
                lambda: tower(inputs.dense, inputs.sparse_ids, inputs.sparse_offsets))
    with clock("pool"):
        now, after = served_values(embeddings[0], embeddings[1], embeddings[2:], snapshot_id, history[0],
                                   history[1:len(embeddings) - 1], params.serving.pool_unit)
    with clock("read_and_join"):
        at = pd.Index(people[ev.user_id]).get_indexer(frame[ev.user_id])
        rows = (~skipped)[at]
        frame, at = frame[rows].reset_index(drop=True), at[rows]
        specs = downstream_specs_for(params)
        seed = params.seed + int(pd.Timestamp(ds).toordinal())
    table = []
    for name, (with_sum, without_sum) in consumers.items():
        with clock("predict"):
            model = load_downstream(with_sum)
            spec = specs.get(name)
            metrics = read_json(with_sum / "metrics.json") if (with_sum / "metrics.json").is_file() else {}
            if spec is None or model.spec != spec or not metrics.get("embedding_coverage"):
                continue  # the task skips these too (other inputs; trained before anything was served)
            data = {arm: DownstreamData.from_frame(spec, frame, values[at].astype(np.float32))
                    for arm, values in (("now", now), ("after", after))}
            preds = {arm: predict_downstream(model, d) for arm, d in data.items()}
            labels = data["now"].labels.numpy()
            p_without, twin, twin_data = None, None, None
            if without_sum is not None:
                twin = load_downstream(without_sum)
                twin_data = DownstreamData.from_frame(twin.spec, frame, None)
                p_without = predict_downstream(twin, twin_data)
        # Floor: each model's forward on the encoded rows, one thread as predict_downstream runs it.
        with torch_threads(1), torch.inference_mode():
            for arm in data.values():
                floor["downstream_forward_s"] += _best_of(lambda: arm.logits(model))
            if twin is not None:
                floor["downstream_forward_s"] += _best_of(lambda: twin_data.logits(twin))
        with clock("bootstrap"):
            effect = measure_consumer(
                name, frame[ev.user_id].to_numpy(), labels, preds["now"], preds["after"], p_without,
                min_label_count=cfg.min_label_count, max_regression_pct=cfg.consumer_max_ne_regression_pct,
                worse_tolerance=cfg.consumer_worse_tolerance, resamples=cfg.consumer_bootstrap, seed=seed,
                model_day=with_sum.name[3:])
        table.append(effect.to_dict())
    floor["total_s"] = floor["tower_forward_s"] + floor["downstream_forward_s"]
    return {"split": {k: clock.s.get(k, 0.0) for k in SPLIT}, "per_snapshot_embed_s": per_snapshot, "floor": floor,
            "users": int(len(np.unique(at))), "rows": int(len(frame)), "people": int(len(people)),
            "snapshots": snapshots, "consumers": table}


def _least(runs: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The last of ``split_check``'s runs with each piece's and floor's least seconds over all of them (a busy
    machine only adds time)."""
    runs = list(runs)
    out = runs[-1]
    for key in ("split", "floor", "per_snapshot_embed_s"):
        out[key] = {k: min(r[key][k] for r in runs) for k in out[key]}
    out["floor"]["total_s"] = out["floor"]["tower_forward_s"] + out["floor"]["downstream_forward_s"]
    return out


def _same_table(ours: list[dict[str, Any]], task: list[dict[str, Any]]) -> bool:
    """Whether the split's measured consumers are the task's (same NE change and interval)."""
    measured = [c for c in task if c.get("change_pct") is not None or "no embedding had been served" not in
                c.get("why", "")]
    key = ("consumer", "rows", "users", "positives", "change_pct", "change_ci", "outcome")

    def rounded(c: dict[str, Any]) -> tuple:
        return tuple(json.dumps(c.get(k), default=float) if not isinstance(c.get(k), float) else round(c[k], 9)
                     for k in key)

    return [rounded(c) for c in ours] == [rounded(c) for c in measured]


def _plot(day: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(day["tasks"].items(), key=lambda kv: kv[1])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax.barh([t for t, _ in tasks], [s for _, s in tasks],
            color=["tab:red" if t == TASK else "tab:gray" for t, _ in tasks])
    ax.set_xlabel("seconds (task instance start to end)")
    ax.set_title(f"{day['ds']}: day {day['day_s']:.0f} s; {TASK} {day['check_s']:.1f} s = "
                 f"{100 * day['share']:.1f} % of the day, +{100 * day['added']:.1f} % to it (target <= "
                 f"{100 * TARGET_ADDED:.0f} %)", fontsize=9)
    pieces = list(day["split"].items()) + [("floor (bare forwards)", day["floor"]["total_s"])]
    bx.barh([p for p, _ in pieces], [s for _, s in pieces],
            color=["tab:red"] * len(day["split"]) + ["tab:green"])
    bx.set_xlabel("seconds")
    bx.set_title(f"inside {TASK} (task {day['check_s']:.1f} s, {day['floor_ratio']:.0f}x the floor)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextmanager
def _airflow_and_ray(ws_airflow_home: Path) -> Iterator[None]:
    """Airflow and Ray for the ``dag.test()`` runs: the ones this process already set up (the test session's: its
    metadata DB in the environment, its Ray initialised), else a metadata DB in the benchmark's workspace and a local
    Ray + Serve, stopped afterwards."""
    import ray


    if "airflow" not in sys.modules and "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in os.environ:
        airflow_env.configure(ws_airflow_home)
    own_ray = not ray.is_initialized()
    ensure_ray(load_params())
    try:
        yield
    finally:
        if own_ray:
            shutdown()


def day_row(ds: str, result: Any, day_s: float) -> dict[str, Any]:
    """A daily DAG run (``airflow_env.DagRunResult``) as the benchmark's row: the verdict, each task's seconds and the
    consumer check's table."""
    checked = result.xcoms.get(TASK) or {}
    tasks = {t: _seconds(ti) for t, ti in result.task_instances.items()
             if ti.get("state") == "success" and ti.get("start_date")}
    return {"ds": ds, "day_s": day_s, "verdict": (result.xcoms.get("shift_gate.verdict") or {}).get("verdict"),
            "promoted": bool(result.xcoms.get("verify_serving")), "tasks": tasks,
            "check_s": tasks.get(TASK, 0.0), "check_note": checked.get("note", ""),
            "consumers": [{k: c.get(k) for k in ("consumer", "outcome", "change_pct", "change_ci", "why")}
                          for c in checked.get("consumers", [])]}


def measure_day(row: dict[str, Any], result: Any) -> dict[str, Any]:
    """The measured day: ``row`` (:func:`day_row`) with the check's share of the day, what it adds to it, its split
    (the task's library calls again, least of :data:`SPLIT_REPEAT`) and the floor, in the configured workspace."""
    split = _least(split_check(row["ds"]) for _ in range(SPLIT_REPEAT))
    check_s, day_s = row["check_s"], row["day_s"]
    return row | {"share": check_s / day_s, "added": check_s / max(day_s - check_s, 1e-9),
                  "split": split["split"], "split_total_s": sum(split["split"].values()),
                  "task_overhead_s": check_s - sum(split["split"].values()),
                  "per_snapshot_embed_s": split["per_snapshot_embed_s"], "floor": split["floor"],
                  "floor_ratio": check_s / max(split["floor"]["total_s"], 1e-9),
                  "holdout": {"people": split["people"], "users": split["users"], "rows": split["rows"],
                              "snapshots": len(split["snapshots"]), "consumers": len(split["consumers"])},
                  "matches_task": _same_table(split["consumers"], (result.xcoms.get(TASK) or {}).get("consumers", []))}


def show(days: list[dict[str, Any]], measured: list[dict[str, Any]], peak: dict[str, Any], png: Path,
         console: Console) -> None:
    """Prints the tables (the measured days, the last one's tasks and the check's split) and plots the last day."""
    if not measured:
        raise RuntimeError(f"no day's consumer check was measured (days: {[(d['ds'], d['check_note']) for d in days]})")

    table = Table(title=f"{TASK} on a day of the daily DAG ({os.cpu_count()} CPUs, dag.test inline)")
    for col in ("date", "day s", f"{TASK} s", "share", "added", "floor s", "x floor", "same table"):
        table.add_column(col, justify="right")
    for d in measured:
        table.add_row(d["ds"], f"{d['day_s']:.1f}", f"{d['check_s']:.2f}", f"{100 * d['share']:.1f} %",
                      f"{100 * d['added']:.1f} %", f"{d['floor']['total_s']:.3f}", f"{d['floor_ratio']:.0f}x",
                      str(d["matches_task"]))
    console.print(table)
    last = measured[-1]
    tasks_table = Table(title=f"{last['ds']}: each task's seconds")
    for col in ("task", "s", "share of the day"):
        tasks_table.add_column(col, justify="right" if col != "task" else "left")
    for t, s in sorted(last["tasks"].items(), key=lambda kv: -kv[1]):
        tasks_table.add_row(f"[bold red]{t}[/]" if t == TASK else t, f"{s:.2f}", f"{100 * s / last['day_s']:.1f} %")
    console.print(tasks_table)
    split_table = Table(title=f"{last['ds']}: inside {TASK} (the library calls again, same day)")
    for col in ("piece", "s", f"share of {TASK}"):
        split_table.add_column(col, justify="right" if col != "piece" else "left")
    pieces = [*last["split"].items(),
              ("other: the task minus the pieces (< 0: they ran slower here)", last["task_overhead_s"]),
              ("floor: bare forwards (towers + downstream)", last["floor"]["total_s"])]
    for piece, s in pieces:
        split_table.add_row(piece, f"{s:.3f}", f"{100 * s / last['check_s']:.1f} %")
    console.print(split_table)
    console.print(f"holdout: {last['holdout']}; embed per snapshot: "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in last["per_snapshot_embed_s"].items())
                  + f"; floor: towers {last['floor']['tower_forward_s'] * 1e3:.1f} ms + downstream "
                    f"{last['floor']['downstream_forward_s'] * 1e3:.1f} ms; fp32 matmul peak "
                    f"{peak['flops_per_second'] / 1e9:.1f} GFLOP/s")
    verdict = "meets" if last["added"] <= TARGET_ADDED else "MISSES"
    console.print(f"{TASK} adds {100 * last['added']:.1f} % to the day ({100 * last['share']:.1f} % of it): {verdict} "
                  f"the {100 * TARGET_ADDED:.0f} % target")
    png.parent.mkdir(parents=True, exist_ok=True)
    _plot(last, png)
    console.print(f"plot: {png}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=DAYS, help=f"simulated days (>= {DAYS}: measured from day {DAYS})")
    ap.add_argument("--users", type=int, help="simulator.initial_users (default: the params')")
    ap.add_argument("--resamples", type=int, help="gate.consumer_bootstrap (default: the params')")
    ap.add_argument("--port-offset", type=int, default=PORT_OFFSET, help="added to every port of the params")
    ap.add_argument("--workdir", type=Path, help="folder of its workspace (default: a new one under .sum/bench)")
    ap.add_argument("--json", type=Path, help="write the report here (and the plot beside it)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"{DAYS} days of {SMOKE_USERS} users, {SMOKE_RESAMPLES} resamples, a loose gate: proves the "
                         f"benchmark runs to its end, measures nothing (tests/integration/test_soak.py: a soak's "
                         "day measured)")
    args = ap.parse_args(argv)
    if args.days < DAYS:
        ap.error(f"--days must be >= {DAYS}: the consumer check is measurable from day {DAYS}")
    users, resamples = (SMOKE_USERS, SMOKE_RESAMPLES) if args.smoke else (args.users, args.resamples)
    console = Console()
    base = args.workdir or PROJECT_ROOT / ".sum" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="consumer-check-bench-", dir=base))
    params_file = _params(root, users, resamples, args.port_offset, args.smoke)

    days: list[dict[str, Any]] = []
    measured: list[dict[str, Any]] = []
    with _in_force(params_file):
        params = load_params()
        first = date.fromisoformat(params.simulator.start_date)
        with _airflow_and_ray(Workspace(params.workspace).airflow_home):
            for i in range(args.days):
                ds = (first + timedelta(days=i)).isoformat()
                with console.status(f"{ds}: the daily DAG (dag.test)"):
                    t0 = time.perf_counter()
                    result = run_date(ds)
                    day_s = time.perf_counter() - t0
                if not result.ok:
                    raise RuntimeError(f"{ds}: the daily DAG ended {result.state}: {result.failed_tasks()}")
                row = day_row(ds, result, day_s)
                console.print(f"{ds}: {row['verdict']} in {day_s:.1f} s; {TASK} {row['check_s']:.1f} s "
                              f"{row['check_note'] or [c['outcome'] for c in row['consumers']]}")
                if i >= DAYS - 1 and row["consumers"]:
                    with console.status(f"{ds}: {TASK}'s pieces again"):
                        measured.append(measure_day(row, result))
                days.append(row)
                if row["promoted"] and i < args.days - 1:
                    with console.status(f"{ds}: the sum_downstream DAG"):
                        t0 = time.perf_counter()
                        down = run_date(ds, dag_id="sum_downstream")
                        row["downstream_s"] = time.perf_counter() - t0
                    if not down.ok:
                        raise RuntimeError(f"{ds}: sum_downstream ended {down.state}: {down.failed_tasks()}")
    peak = matmul_peak(threads=os.cpu_count() or 1, seconds=0.3 if args.smoke else 2.0)
    png = args.json.with_suffix(".png") if args.json else root / "consumer_check_bench.png"
    show(days, measured, peak, png, console)
    raw = yaml.safe_load(params_file.read_text())
    report = {"config": {"initial_users": raw["simulator"]["initial_users"],
                         "consumer_bootstrap": raw["gate"]["consumer_bootstrap"],
                         "consumer_holdout_users": raw["gate"]["consumer_holdout_users"], "days": args.days,
                         "smoke": args.smoke},
              "days": days, "measured": measured, "matmul_peak": peak, "target_added": TARGET_ADDED,
              "meets_target": measured[-1]["added"] <= TARGET_ADDED, "png": str(png), "cpus": os.cpu_count(),
              "workdir": str(root)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float))
    if args.smoke:  # its workspace holds nothing to look at later
        shutil.rmtree(root, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
