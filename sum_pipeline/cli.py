"""``sumctl``: the SUM platform's command line (Typer).

Heavy libraries (Airflow, torch, Feast, Ray) are imported inside the commands, after the workspace and
Airflow environment are set, so ``sumctl --help`` stays fast. Each command is a thin call into
:mod:`sum_pipeline.tasks`, :mod:`sum_pipeline.promotion` or the base's registry.
"""

from __future__ import annotations

import logging
from enum import Enum
import os
import socket
import time
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from serving.ray_cluster import ensure_ray, shutdown, started_local
from serving.rollout import rollout as serve_rollout
from serving.store_io import migrate_rows, retire_snapshot
from sum_pipeline import airflow_env, driver, tasks
from sum_pipeline.airflow_api import AirflowClient
from sum_pipeline.calibrate_gate import calibrate_gate
from sum_pipeline.doctor import diagnose
from sum_pipeline.faults import CANDIDATE_FAULTS
from sum_pipeline.online_rebuild import RebuildError, rebuild_online_store
from sum_pipeline.promotion import frozen_snapshot, promote_snapshot, rollback_production
from sum_pipeline.restore import RestoreError, restore_workspace
from sum_pipeline.soak import plan, run_soak
from sum_pipeline.stack import Stack, StackError
from sum_pipeline.study import run_study
from sum_pipeline.wipe import FORCE_FLAG, WipeIncomplete, WipeRefused, guard, wipe
from sum_platform.config import load_params, load_profile
from sum_platform.context import Context
from sum_platform.feature_store import apply_definitions, spec_from_fields, user_feature_fields
from sum_platform.sources import first_date, source_dates
from sum_platform.files import write_json
from sum_platform.registry import Registry
from sum_platform.versioning import VersioningError
from sum_platform.workspace import Workspace, claim_remote
from validation.calibrate import calibrate as run_calibration
from validation.corruptions import failing_kinds
from validation.quarantine import quarantined, release_partition

app = typer.Typer(help="Operate the SUM platform: daily runs, snapshots, promotion, serving.", no_args_is_help=True)
console = Console(width=None if os.isatty(1) else 160)

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Artifact workspace (default: params paths.workspace or $SUM_WORKSPACE)."),
]
ParamsOpt = Annotated[Optional[Path], typer.Option("--params", help="params.yaml to use (default: $SUM_PARAMS or the project's).")]


ForceWipeOpt = Annotated[bool, typer.Option(
    FORCE_FLAG, help="With --fresh: delete the workspace even when it holds promotions or runs a stack (stopped first).")]


def _setup(workspace: Optional[Path], params: Optional[Path]):
    """Fixes params, workspace and DVC remote for this process (and for the stack's and Airflow's tasks, which
    inherit the environment).

    A workspace other than the configured one (``--workspace`` or ``$SUM_WORKSPACE``) keeps the remote its DVC
    config names, else gets one of its own beside it (:attr:`Workspace.own_remote`); the configured remote
    belongs to the configured workspace. ``$SUM_DVC_REMOTE`` names a remote for any workspace.
    """
    if params:
        os.environ["SUM_PARAMS"] = str(params.resolve())
    if workspace:
        os.environ["SUM_WORKSPACE"] = str(workspace.resolve())
    p = load_params()
    os.environ["SUM_WORKSPACE"] = str(p.workspace)
    ws = Workspace(p.workspace)
    if not os.environ.get("SUM_DVC_REMOTE") and p.workspace != p.resolve(p.paths.workspace):
        os.environ["SUM_DVC_REMOTE"] = ws.dvc_remote() or str(ws.own_remote)
    return p, ws


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def day_row(result) -> dict[str, Any]:
    """Flattens one DAG run into the per-day table row."""
    x = result.xcoms
    verdict_xcom = x.get("shift_gate.verdict") or {}
    row: dict[str, Any] = {
        "ds": result.ds,
        "state": result.state,
        "rows": (x.get("ingest") or {}).get("events"),
        "validation": "passed" if "validate_data" in x else ("FAILED" if result.task_states.get("validate_data") == "failed" else "-"),
        "ne": (x.get("evaluate") or {}).get("ne", {}),
        "shift": verdict_xcom.get("shift", []),
        "verdict": verdict_xcom.get("verdict", "-"),
        "served": (x.get("verify_serving") or {}).get("served_snapshot_id"),
        "failed_tasks": result.failed_tasks(),
    }
    return row


def _actor(actor: str) -> str:
    """Who an operator command records: ``--actor``, else ``$USER``."""
    return actor or os.environ.get("USER", "operator")


def _prepare(p, ws, *, own: str, purpose: str, fresh: bool, force: bool = False, drill: bool = False,
             ready: Optional[Callable[[Any], None]] = None) -> None:
    """Guards, stops and deletes as asked (:mod:`sum_pipeline.wipe`), then marks the workspace and its remote.

    Args:
        own: The marker purpose of the workspaces this command makes for itself and may recreate.
        purpose: What a new workspace's marker records.
        fresh: Delete the workspace (and a remote created for it alone) first.
        force: ``--force-wipe``.
        drill: The command's drills may only run in a workspace of its own or one that holds nothing (soak).
        ready: The command's own last check (``ready(params)`` raises ``typer.Exit``), after the guard and before
            anything is stopped or deleted.
    """
    if fresh or drill:
        try:
            held = guard(p, ws, own=own, wiping=fresh, force=force)
        except WipeRefused as exc:
            console.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
            raise typer.Exit(2) from exc
    if ready is not None:
        ready(p)
    if fresh or drill:
        if held.processes:
            console.print(f"stopping the stack of {ws.root} ({len(held.processes)} processes) first")
            left = Stack(p, ws).down()["left"]
            if left:
                console.print(f"[red]the stack of {escape(str(ws.root))} did not stop: {left} still alive; nothing "
                              f"deleted[/red]")
                raise typer.Exit(1)
        if fresh:
            try:
                done = wipe(p, ws)
            except WipeIncomplete as exc:
                console.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
                raise typer.Exit(1) from exc
            for line in done:
                console.print(line, markup=False, highlight=False)
    ws.claim(purpose)
    claim_remote(p.dvc_remote, ws)


@contextmanager
def _driving_the_dag(workspace: Optional[Path], params: Optional[Path], fresh: bool, keep_serving: bool = False,
                     *, own: str = "demo", purpose: str = "workspace", force: bool = False, drill: bool = False,
                     ready: Optional[Callable[[Any], None]] = None):
    """Yields ``(params, workspace)`` with Airflow configured and this process's own local Ray + Serve for
    the ``dag.test()`` runs it drives (the ``--inline`` debugging path, the soak); Ray stops afterwards unless
    ``keep_serving``. ``own`` .. ``drill``: see :func:`_prepare`.
    """
    p, ws = _setup(workspace, params)
    _prepare(p, ws, own=own, purpose=purpose, fresh=fresh, force=force, drill=drill, ready=ready)
    airflow_env.configure(ws.airflow_home)
    os.environ["SUM_RAY_ADDRESS"] = "local"  # the tasks run in this process, with this process's Ray
    try:
        ensure_ray(p)
        yield p, ws
    finally:
        if not keep_serving:
            shutdown()


def _log_to_file(path: Path | None = None) -> None:
    """Sends this process's log records (ours, Ray's, Serve's, Airflow's) to ``path``, not over the table
    (without ``path``: only takes the terminal handlers that Ray and Serve added since)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in ("ray", "ray.serve", "ray.data", "ray.train"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True


@contextmanager
def _stderr_to(path: Path):
    """This process's stderr (file descriptor 2, so Ray's C++ core and Serve's handlers too) appended to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _deploy_production(p, ws) -> Any:
    """The stack's deploy step: Serve on the stack's Ray, with the registry's production snapshot if any."""
    def deploy(stack: Stack) -> None:
        os.environ["SUM_RAY_ADDRESS"] = "stack"
        with _stderr_to(stack.logs / "sumctl.log"):  # Ray and Serve write to stderr past logging's handlers
            ensure_ray(p)
        _log_to_file()  # Serve adds a terminal handler when it starts
        try:
            prod = Registry(ws.registry_db).production() if ws.registry_db.exists() else None
            if prod is not None:
                # Frozen mode keeps the registry's first snapshot, whatever (re)started the app.
                serve_rollout(p, ws.snapshot_dir(prod.snapshot_id), prod.snapshot_id,
                              frozen=frozen_snapshot(Context(p, ws)))
        finally:
            shutdown(stop_serve=False)  # disconnect; Serve lives on in the stack's Ray

    return deploy


def _stack_up(p, ws) -> Stack:
    stack = Stack(p, ws)
    _log_to_file(stack.logs / "sumctl.log")
    t0 = time.perf_counter()
    with console.status("bringing the stack up") as status:
        try:
            info = stack.up(deploy=_deploy_production(p, ws), on_step=lambda step: status.update(step))
        except StackError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
    if info["started"]:
        console.print(f"stack up in {time.perf_counter() - t0:.0f}s (started {', '.join(info['started'])}); "
                      f"UI {info['airflow_url']} as {info['airflow_user']} (password in {info['passwords_file']})")
    return stack


def _client(stack: Stack) -> AirflowClient:
    return AirflowClient(stack.airflow_url, stack.info()["airflow_user"], stack.airflow_password() or "", timeout=120)


@app.command()
def up(workspace: WorkspaceOpt = None, params: ParamsOpt = None) -> None:
    """Starts the deployed stack (Ray head serving SOAP, Airflow api-server, scheduler, dag-processor, triggerer)."""
    p, ws = _setup(workspace, params)
    stack = _stack_up(p, ws)
    _print_status(stack)


def _print_status(stack: Stack, show_password: bool = False) -> None:
    info = stack.info()
    table = Table(title=f"Stack of {stack.ws.root}")
    for col in ("component", "state", "pid", "port", "listening", "log"):
        table.add_column(col, overflow="fold")
    dead = []
    for c in stack.status():
        state = "[green]running[/green]" if c.running else "[red]stopped[/red]"
        table.add_row(c.name, state, str(c.pid or "-"), str(c.port or "-"),
                      "-" if c.listening is None else ("yes" if c.listening else "[red]no[/red]"), c.log or "-")
        if not c.running and c.log:
            dead.append(c)
    console.print(table)
    # The password itself only when asked: a terminal's scrollback and a CI log are not private.
    password = (f"[bold]{stack.airflow_password() or '(not generated yet)'}[/bold]" if show_password
                else f"in {info['passwords_file']} (owner only; `sumctl status --show-password` prints it)")
    console.print(f"Airflow UI/API: {info['airflow_url']}  user [bold]{info['airflow_user']}[/bold]  password {password}")
    console.print(f"SOAP: {info['serving_url']}   Ray: {info['ray_address']} (token auth), dashboard {info['ray_dashboard']}")
    for c in dead:
        console.print(f"[red]{c.name} is not running[/red]; {c.log} ends with:\n{c.log_tail}")


@app.command()
def status(workspace: WorkspaceOpt = None, params: ParamsOpt = None,
           show_password: bool = typer.Option(False, "--show-password", help="Print the Airflow admin's password "
                                              "(by default only the file that holds it).")) -> None:
    """Reports each stack component: pid, port, log; a stopped one with its log tail. Exit 1 unless all run."""
    p, ws = _setup(workspace, params)
    stack = Stack(p, ws)
    _print_status(stack, show_password)
    if not stack.is_up():
        raise typer.Exit(1)


@app.command()
def down(workspace: WorkspaceOpt = None, params: ParamsOpt = None) -> None:
    """Stops every stack component and checks that none of their processes is left."""
    p, ws = _setup(workspace, params)
    t0 = time.perf_counter()
    out = Stack(p, ws).down()
    console.print(f"stopped {', '.join(out['stopped']) or 'nothing'} ({len(out['pids'])} processes) in "
                  f"{time.perf_counter() - t0:.0f}s" + (f"; [red]still alive: {out['left']}[/red]" if out["left"] else ""))
    if out["left"]:
        raise typer.Exit(1)


def _progress_line(progress, task_of: dict, p: "driver.DayProgress", approvals_url: str = "") -> None:
    running = ", ".join(p.running) or p.state
    if p.awaiting:
        running += f" - held: approve or reject at {approvals_url} (else it stays held when the approval times out)"
    progress.update(task_of[p.ds], completed=p.done, total=max(p.total, 1), description=f"{p.ds} {running}")


def _readable_log(path: Path, lines: int = 12) -> str:
    """The end of a task's log (Airflow writes JSON lines): time, level, message, and an error's type and value."""
    import json

    out = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            out.append(raw)
            continue
        line = f"{rec.get('timestamp', '')[11:19]} {rec.get('level', '')} {rec.get('event', '')}"
        for err in rec.get("error_detail") or []:
            line += f"\n    {err.get('exc_type')}: {err.get('exc_value')}"
        out.append(line)
    return "\n".join(out[-lines:])


def _print_failures(stack: Stack, result) -> None:
    """A failed task's log tail, with the log's path (upstream_failed tasks have no log of their own)."""
    for task_id, state in result.task_states.items():
        if state != "failed":
            continue
        ti = result.task_instances.get(task_id, {})
        path = driver.task_log_path(stack.ws.airflow_home, result.run_id, task_id, int(ti.get("try_number") or 1))
        tail = _readable_log(path) if path.exists() else "(no log file)"
        console.print(f"[red]{result.ds} {task_id} failed[/red]; log {path}:\n{tail}", markup=True, highlight=False)


def _faults(values: list[str]) -> dict[str, str]:
    """``--fault DATE=KIND`` values as ``{date: kind}``; a malformed one is a clear usage error."""
    out = {}
    for value in values:
        ds, sep, kind = value.partition("=")
        try:
            date.fromisoformat(ds)
        except ValueError:
            sep = ""
        if not sep or kind not in CANDIDATE_FAULTS:
            raise typer.BadParameter(f"{value!r} is not DATE=KIND with a date YYYY-MM-DD and a kind of "
                                     f"{', '.join(CANDIDATE_FAULTS)}", param_hint="--fault")
        out[ds] = kind
    return out


@app.command()
def run(
    days: Annotated[int, typer.Option("--days", "-n", min=1, help="How many consecutive dates to run.")] = 3,
    start: Annotated[Optional[str], typer.Option(help="First logical date YYYY-MM-DD (default: airflow.start_date).")] = None,
    fault: Annotated[
        list[str], typer.Option("--fault", help="DATE=reinit: inject a re-initialised candidate on DATE (gate drill).")
    ] = [],
    fresh: Annotated[bool, typer.Option(help="Delete the workspace (and a DVC remote created for it alone) first; refused "
                                             "when it holds promotions or runs a stack, unless it is a demo workspace.")] = False,
    demo: Annotated[bool, typer.Option(help="Mark a workspace this command creates as a demo (`make run`): a later "
                                            "--fresh stops its stack and recreates it.")] = False,
    force_wipe: ForceWipeOpt = False,
    inline: Annotated[bool, typer.Option(help="Debugging: run each date with dag.test() in this process, no stack.")] = False,
    down_after: Annotated[bool, typer.Option("--down", help="Stop the stack after the last day.")] = False,
    keep_serving: Annotated[bool, typer.Option(help="--inline only: leave Ray Serve running after the last day.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Also write the rows and each task's timings as JSON here.")] = None,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Runs N days through the deployed stack's scheduler (brought up if needed) and prints a table."""
    faults = _faults(fault)
    purpose = "demo" if demo else "workspace"
    if inline:
        return _run_inline(days, start, faults, fresh, keep_serving, report, workspace, params, purpose, force_wipe)
    p, ws = _setup(workspace, params)
    _prepare(p, ws, own="demo", purpose=purpose, fresh=fresh, force=force_wipe)
    first = date.fromisoformat(start or p.airflow.start_date)
    dates = [(first + timedelta(days=i)).isoformat() for i in range(days)]
    stack = _stack_up(p, ws)
    client = _client(stack)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t_start: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task_of = {ds: progress.add_task(f"{ds} waiting", total=len(tasks.STAGES), start=False) for ds in dates}

        def on_progress(day: "driver.DayProgress") -> None:
            if day.ds not in t_start and (day.running or day.done):
                t_start[day.ds] = time.perf_counter()
                progress.start_task(task_of[day.ds])
            if day.state in driver.FINISHED and day.ds not in seconds:
                seconds[day.ds] = time.perf_counter() - t_start.get(day.ds, time.perf_counter())
            _progress_line(progress, task_of, day, f"{stack.airflow_url}/required_actions")

        consumers = ("sum_downstream",) if p.downstream.retrain_on_promotion else ()
        results = driver.drive(client, dates, faults, p.airflow.dag_poll_seconds, on_progress, consumers=consumers)
    rows = [day_row(r) | {"seconds": seconds.get(r.ds, 0.0)} for r in results]
    if report:
        write_json(report, {"mode": "scheduler", "rows": rows,
                            "task_instances": {r.ds: r.task_instances for r in results}})
    console.print(days_table(rows, p.model.num_embeddings))
    for r in results:
        _print_failures(stack, r)
    console.print(f"UI: {stack.airflow_url}/dags/{airflow_env.DAG_ID}  SOAP: http://{p.serving.host}:{p.serving.port}"
                  f"  (`sumctl down` stops the stack)")
    if down_after:
        Stack(p, ws).down()
    if any(r["state"] != "success" for r in rows):
        raise typer.Exit(code=1)


def _run_inline(days, start, faults, fresh, keep_serving, report, workspace, params, purpose, force) -> None:
    """``sumctl run --inline``: each date through ``dag.test()`` in this process (a debugging aid)."""
    rows, task_instances = [], {}
    with _driving_the_dag(workspace, params, fresh, keep_serving, own="demo", purpose=purpose, force=force) as (p, ws):
        first = date.fromisoformat(start or p.airflow.start_date)
        for i in range(days):
            ds = (first + timedelta(days=i)).isoformat()
            t0 = time.perf_counter()
            conf = {"candidate_fault": faults[ds]} if ds in faults else {}
            result = airflow_env.run_date(ds, conf)
            task_instances[ds] = result.task_instances
            row = day_row(result) | {"seconds": time.perf_counter() - t0}
            rows.append(row)
            console.print(f"[bold]{ds}[/]: {result.state} in {row['seconds']:.1f}s; verdict {row['verdict']}; "
                          f"served {row['served'] or '-'}" + (f"; failed: {row['failed_tasks']}" if row["failed_tasks"] else ""))
    if report:
        write_json(report, {"mode": "inline", "rows": rows, "task_instances": task_instances})
    console.print(days_table(rows, p.model.num_embeddings))
    if any(r["state"] != "success" for r in rows):
        raise typer.Exit(code=1)


def days_table(rows: list[dict[str, Any]], k: int) -> Table:
    """The per-day summary table of ``sumctl run``."""
    table = Table(title="SUM daily runs")
    for col in ("date", "rows", "validation", "NE click", "NE conv"):
        table.add_column(col, justify="right")
    for i in range(k):
        table.add_column(f"cos e{i}", justify="right")
        table.add_column(f"ΔL2 e{i}", justify="right")
    for col in ("verdict", "served snapshot", "s"):
        table.add_column(col, justify="right")
    for r in rows:
        shift = r["shift"] or [{}] * k
        cells = [r["ds"], str(r["rows"] or "-"), r["validation"], _fmt(r["ne"].get("click")), _fmt(r["ne"].get("conversion"))]
        for m in shift[:k]:
            cells += [_fmt(m.get("mean_cosine")), _fmt(m.get("relative_l2_change"))]
        cells += [r["verdict"], r["served"] or "-", f"{r['seconds']:.0f}"]
        table.add_row(*cells)
    return table


@app.command()
def snapshots(
    as_json: Annotated[bool, typer.Option("--json", help="Print the full lineage records as JSON.")] = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Lists every snapshot with its lineage: stage, parent, data version, params, NE, shift, verdict."""
    _, ws = _setup(workspace, params)
    records = Registry(ws.registry_db).list()
    if as_json:
        console.print_json(data=[r.to_dict() for r in records])
        return
    table = Table(title=f"Snapshots in {ws.root}")
    for col in ("snapshot", "stage", "parent", "data", "params", "NE click", "NE conv", "min cos", "max ΔL2",
                "verdict", "promoted at", "by", "tag"):
        table.add_column(col)
    for rec in records:
        r = rec.record
        verdict = r.get("verdict") or {}
        shift = verdict.get("shift") or []
        ne = (r.get("evaluation") or {}).get("ne") or {}
        events = next((v for k, v in (r.get("data_version") or {}).items() if "events" in k), "")
        table.add_row(
            rec.snapshot_id, rec.stage, rec.parent_id or "-", events[:8] or "-", (r.get("params_digest") or "-")[:8],
            _fmt(ne.get("click")), _fmt(ne.get("conversion")),
            _fmt(min((m["mean_cosine"] for m in shift), default=None)),
            _fmt(max((m["relative_l2_change"] for m in shift), default=None)),
            verdict.get("verdict", "-"), rec.promoted_at or "-", rec.promoted_by or "-", r.get("tag", "-"),
        )
    console.print(table)


@app.command()
def promote(
    snapshot_id: Annotated[str, typer.Argument(help="Snapshot to make production, e.g. sum-2026-01-03.")],
    force: Annotated[bool, typer.Option(help="Override the gate (a held snapshot).")] = False,
    reason: Annotated[str, typer.Option(help="Why; recorded in the registry's audit log.")] = "",
    actor: Annotated[str, typer.Option(help="Who; defaults to $USER.")] = "",
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Promotes a snapshot by hand (the gate's verdict stands unless --force with --reason)."""
    if force and not reason:
        raise typer.BadParameter("--force needs --reason")
    p, ws = _setup(workspace, params)
    out = promote_snapshot(Context(p, ws), snapshot_id, actor=_actor(actor), reason=reason or "manual promotion",
                           force=force)
    console.print(out)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(tasks.STAGES)}.")],
    ds: Annotated[str, typer.Option("--ds", help="Logical date YYYY-MM-DD.")],
    summary: Annotated[Optional[Path], typer.Option(help="Also write the step's JSON summary here.")] = None,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Runs one pipeline step for a date outside Airflow (what ``dvc repro`` calls)."""
    if name not in tasks.STAGES:
        raise typer.BadParameter(f"unknown stage {name!r}; one of {', '.join(tasks.STAGES)}")
    _setup(workspace, params)
    result = getattr(tasks, name)(ds)
    if summary:
        write_json(summary, result)
    console.print_json(data=result)


@app.command()
def doctor(
    serving: Annotated[bool, typer.Option(help="Also ask the running SOAP app what it serves.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON.")] = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Checks that the registry, GTO's tags, the DVC remote, the online store and serving agree; lists each
    disagreement with the command that repairs it (exit code 1 if there is one). Changes nothing."""
    p, ws = _setup(workspace, params)
    with console.status("checking registry, tags, remote, online store, serving ..."):
        result = diagnose(Context(p, ws), serving=serving)
    if as_json:
        console.print_json(data=result.to_dict())
    else:
        for component, counts in result.checked.items():
            console.print(f"[bold]{component}[/bold]: {counts}")
        if result.healthy:
            console.print("[green]everything agrees[/green]")
        else:
            table = Table(title=f"{len(result.findings)} disagreement(s) in {ws.root}")
            for col in ("component", "problem", "repair"):
                table.add_column(col, overflow="fold")
            for f in result.findings:
                table.add_row(f.component, f.problem, f.repair)
            console.print(table)
    if not result.healthy:
        raise typer.Exit(code=1)


@app.command("migrate-embeddings")
def migrate_embeddings(
    retire: Annotated[Optional[list[str]], typer.Option("--retire", help="Also take this snapshot's versions out of "
                                                        "every row (one never promoted, as doctor names it); "
                                                        "repeatable.")] = None,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Brings every ``sum_embeddings`` row to the current layout: applies the feature repo (the per-slot snapshot id
    fields), then gives each row written before them (schema v1) its slots' snapshot ids; no served or batch value
    changes, and a second run changes nothing. What ``sumctl doctor`` prescribes for rows in the v1 layout."""
    p, _ = _setup(workspace, params)
    store = apply_definitions(p)
    out: dict[str, Any] = migrate_rows(store)
    for snapshot_id in retire or []:
        out[f"retired {snapshot_id}"] = retire_snapshot(store, snapshot_id)["retired"]
    console.print_json(data=out)


@app.command("rebuild-online")
def rebuild_online(workspace: WorkspaceOpt = None, params: ParamsOpt = None,
                   only_missing: bool = typer.Option(False, "--only-missing", help="Write only the rows users lack "
                                                     "(what doctor prescribes for lost rows); other rows stay as they are.")) -> None:
    """Rebuilds the online store from the offline store beside the old one, then swaps it in: Feast materialises the
    users' features and their latest served embedding rows over every day of the workspace into a staging store
    (SQLite: a new file; Redis: an empty database of the server). If that fails the old store is left serving,
    untouched. Running serving replicas reopen a swapped SQLite file on their next health check."""
    p, ws = _setup(workspace, params)
    with console.status("materialising user features and embeddings from the offline store ..."):
        try:
            out = rebuild_online_store(Context(p, ws), only_missing=only_missing)
        except (RebuildError, FileNotFoundError) as exc:
            console.print(f"[red]rebuild-online failed:[/red] {exc}")
            raise typer.Exit(code=1) from exc
    console.print_json(data=out)


@app.command()
def restore(
    git: Annotated[Optional[str], typer.Option("--git", help="The workspace's git history (URL or path; default: its "
                                               "backup in the DVC remote, <remote>/workspaces/<identity>.git).")] = None,
    identity: Annotated[Optional[str], typer.Option(help="Which workspace, when the remote backs up several.")] = None,
    online: Annotated[bool, typer.Option(help="Rebuild the online store and the last daily batch.")] = True,
    remote: Annotated[Optional[str], typer.Option(help="The DVC remote to restore from (a folder or URL; default: the "
                                                  "workspace's, as for every command).")] = None,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Rebuilds a lost workspace (into an absent or empty folder) from its git history and the DVC remote: clone,
    dvc pull, the registry, day records and quarantine from the audit trail, the online store. Then run
    `sumctl doctor`."""
    if remote:
        os.environ["SUM_DVC_REMOTE"] = remote if "://" in remote else str(Path(remote).resolve())
    p, ws = _setup(workspace, params)
    try:
        with console.status(f"restoring {ws.root} from {git or p.dvc_remote} ..."):
            out = restore_workspace(Context(p, ws), source=git, identity=identity, online=online)
    except (RestoreError, VersioningError) as exc:
        console.print(f"[red]restore failed, {ws.root} left as it was:[/red] {exc}", highlight=False)
        raise typer.Exit(code=1) from exc
    console.print_json(data=out)


@app.command()
def ui(workspace: WorkspaceOpt = None, params: ParamsOpt = None) -> None:
    """Brings the stack up if needed and prints where the Airflow UI is and how to log in."""
    p, ws = _setup(workspace, params)
    stack = _stack_up(p, ws)
    _print_status(stack)
    console.print(f"open {stack.airflow_url}/dags/{airflow_env.DAG_ID} (`sumctl down` stops the stack)")


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why; recorded in the registry's audit log.")],
    to: Annotated[Optional[str], typer.Option(help="Snapshot to return to (default: the previous production).")] = None,
    actor: Annotated[str, typer.Option(help="Who; defaults to $USER.")] = "",
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Makes the previous production snapshot current again and re-rolls a running serving app."""
    _setup(workspace, params)
    out = rollback_production(_actor(actor), reason, to=to)
    console.print_json(data=out)


quarantine_app = typer.Typer(help="Partitions the data gate moved aside: list them, release a false alarm.",
                              no_args_is_help=True)
app.add_typer(quarantine_app, name="quarantine")


@quarantine_app.command("list")
def quarantine_list(
    ds: Annotated[Optional[str], typer.Option("--ds", help="Only this logical date (YYYY-MM-DD).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full reason records as JSON.")] = False,
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Lists quarantined partitions, oldest first: date, status, the failed checks and the folder."""
    _, ws = _setup(workspace, params)
    records = quarantined(ws, ds)
    if as_json:
        console.print_json(data=records)
        return
    table = Table(title=f"Quarantine in {ws.root / 'quarantine'}")
    for col in ("ds", "status", "at", "failed checks", "folder"):
        table.add_column(col, overflow="fold")
    for r in records:
        reason = r.get("reason") or {}
        failed = [f"{kind}: {check}" for kind, checks in (reason.get("failed_checks") or {}).items() for check in checks]
        table.add_row(str(r.get("ds", "-")), str(r.get("status", "-")), str(r.get("quarantined_at", "-"))[:19],
                      "\n".join(failed) or str(reason.get("summary", "-")), r["folder"])
    console.print(table)
    if not records:
        console.print("nothing quarantined")


@quarantine_app.command("release")
def quarantine_release(
    ds: Annotated[str, typer.Argument(help="Logical date whose quarantined partitions go back in place.")],
    reason: Annotated[str, typer.Option(help="Why the data is good after all; recorded with the release.")],
    folder: Annotated[Optional[Path], typer.Option(help="Which quarantine of the date (default: the latest).")] = None,
    actor: Annotated[str, typer.Option(help="Who; defaults to $USER.")] = "",
    workspace: WorkspaceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Moves a quarantined day back into place; rerun the date afterwards (its checks run again)."""
    _, ws = _setup(workspace, params)
    try:
        released = release_partition(ws, ds, folder, actor=_actor(actor), reason=reason)
    except (LookupError, FileExistsError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"released {released}; rerun the date: sumctl run --start {ds} --days 1")


@app.command()
def serve(workspace: WorkspaceOpt = None, params: ParamsOpt = None) -> None:
    """(Re)deploys the production snapshot on the stack's Ray (``serving.ray_address``); with a local Ray
    it serves in this process until Ctrl-C."""
    p, ws = _setup(workspace, params)
    prod = Registry(ws.registry_db).production()
    if prod is None:
        raise typer.BadParameter(f"no production snapshot in {ws.root}: run `sumctl run` first")
    ensure_ray(p)
    # Frozen mode keeps the registry's first snapshot, whatever (re)started the app.
    serve_rollout(p, ws.snapshot_dir(prod.snapshot_id), prod.snapshot_id, frozen=frozen_snapshot(Context(p, ws)))
    if not started_local():
        shutdown(stop_serve=False)
        console.print(f"serving {prod.snapshot_id} on http://{p.serving.host}:{p.serving.port} from the stack's Ray")
        return
    console.print(f"serving {prod.snapshot_id} on http://{p.serving.host}:{p.serving.port} (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown(stop_serve=True)


def _serving_port_free(p) -> None:
    """The soak deploys its own SOAP app on ``serving.port``: a stack serving there (`make run`'s) is said first."""
    host, port = p.serving.host, p.serving.port
    try:
        socket.create_connection((host if host not in ("", "0.0.0.0") else "127.0.0.1", port), timeout=1).close()
    except OSError:
        return
    console.print(f"[red]the soak deploys its own SOAP app on serving.port {port}, which something already listens "
                  f"on (a stack's: `sumctl status`). Stop it (`sumctl down`) or run the soak with a params file "
                  f"(--params) giving another serving.port.[/red]", highlight=False)
    raise typer.Exit(2)


@app.command()
def soak(
    days: Annotated[int, typer.Option("--days", "-n", min=3, help="How many consecutive dates.")] = 30,
    start: Annotated[Optional[str], typer.Option(help="First date (default: simulator.start_date).")] = None,
    fault_every: Annotated[int, typer.Option(help="A shifted candidate every N days.")] = 5,
    corrupt_every: Annotated[int, typer.Option(help="A corrupted partition every N days.")] = 7,
    report: Annotated[Optional[Path], typer.Option(help="Write the JSON report here.")] = None,
    fresh: Annotated[bool, typer.Option(help="Start from an empty workspace (and a DVC remote created for it alone).")] = False,
    force_wipe: ForceWipeOpt = False,
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w", help="Default: a soak workspace beside the configured one (<workspace>-soak).")] = None,
    params: ParamsOpt = None,
) -> None:
    """Runs a long simulated period with shifted candidates and corrupted partitions; scores the gate.

    It runs only in a workspace of its own (marker purpose ``soak``, recreated by ``--fresh``) or one that holds
    no promotion and runs no stack, never in the one ``sumctl run`` deploys.
    """
    if workspace is None:
        if params:
            os.environ["SUM_PARAMS"] = str(params.resolve())
        base = load_params().workspace
        workspace = base.parent / f"{base.name}-soak"
    with _driving_the_dag(workspace, params, fresh, own="soak", purpose="soak", force=force_wipe, drill=True,
                          ready=_serving_port_free) as (p, ws):
        schedule = plan(days, start or p.simulator.start_date, CANDIDATE_FAULTS, tuple(failing_kinds()),
                        fault_every=fault_every, corrupt_every=corrupt_every)
        result = run_soak(schedule, on_day=lambda d: console.print(
            f"{d.ds} {d.kind:8} {d.detail:22} {d.state:8} verdict={d.verdict:8} promoted={d.promoted}"
            + (f" caught={d.caught} rerun={d.rerun_state}" if d.kind == "corrupt" else "")
            + "".join(f" {f}={o}" for f, o in d.families.items()) + f" ({d.seconds:.0f}s)"))
    summary = result.summary()
    console.print_json(data=summary)
    console.print(_family_table(summary))
    if report:
        write_json(report, result.to_dict())
    if not result.passed():
        raise typer.Exit(code=1)


def _family_table(summary: dict) -> Table:
    """The soak's check families side by side: shifted candidates each passed, normal candidates each held."""
    table = Table(title=f"Check families over {summary['days']} soak days (enforced by gate.mode or only reported)")
    for col in ("family", "shifted judged", "false promotions", "normal judged", "false holds"):
        table.add_column(col, justify="left" if col == "family" else "right")
    for family, s in summary["families"].items():
        table.add_row(family, str(s["shifted_judged"]), str(s["false_promotions"]), str(s["normal_judged"]),
                      str(s["false_holds"]))
    return table


@app.command()
def calibrate(
    days: Annotated[Optional[int], typer.Option("--days", "-n", min=2, help="How many dates (default: all the source has; the simulator: 31).")] = None,
    start: Annotated[Optional[str], typer.Option(help="First date (default: the source's first).")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="Also write every day's statistics to this CSV file.")] = None,
    gate: Annotated[bool, typer.Option("--gate", help="Calibrate the snapshot gate instead: train day by day as the "
                                       "DAG does and judge each candidate (default days: 30).")] = False,
    params: ParamsOpt = None,
) -> None:
    """Measures what the data gate's relative checks see on the source's days, next to the thresholds in force.

    Run it on normal days of a new source (``source`` in params.yaml), then set the ``validation`` thresholds
    above the observed extremes with a margin. With ``--gate``: the snapshot gate's checks (``gate`` thresholds),
    each candidate trained and judged as the daily loop does.
    """
    from rich.progress import Progress

    p, _ = _setup(None, params)
    if gate:
        _calibrate_gate(p, days or 30, csv)
        return
    dates = source_dates(p)
    begin = start or first_date(p)
    if dates is None:
        first = date.fromisoformat(begin)
        dates = [(first + timedelta(days=i)).isoformat() for i in range(days or 31)]
    else:
        dates = [d for d in dates if d >= begin][:days] if days else [d for d in dates if d >= begin]
    spec = spec_from_fields(user_feature_fields(p), p)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"{p.source.kind} days", total=len(dates))
        result = run_calibration(p, dates, spec, progress=lambda ds: progress.advance(bar))
    table = Table(title=f"{p.source.kind}: {len(result.days)} days measured against their trailing days")
    for column in ("threshold (validation.*)", "observed extreme", "in force"):
        table.add_column(column)
    for key, row in result.summary(p).items():
        table.add_row(key, f"{row['observed']:.4g}", f"{row['threshold']:g}")
    console.print(table)
    for ds, why in result.skipped.items():
        console.print(f"skipped {ds}: {why}")
    if csv:
        result.frame().to_csv(csv, index=False)


def _calibrate_gate(p, days: int, csv: Optional[Path]) -> None:
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"{p.source.kind}: training and judging", total=days)
        result = calibrate_gate(p, days, progress=lambda ds: progress.advance(bar))
    blessed = sum(d["blessed"] for d in result.days)
    table = Table(title=f"{p.source.kind}: the snapshot gate on {len(result.days)} days ({blessed} blessed)")
    for column in ("check (gate.*)", "days", "observed min", "observed max", "threshold in force", "margin",
                   "days outside"):
        table.add_column(column)
    for row in result.summary():
        table.add_row(row["check"], str(row["days"]), f"{row['min']:.4g}", f"{row['max']:.4g}",
                      f"{row['op']} {row['threshold']:g}", f"{row['margin']:+.4g}", str(row["outside"]))
    console.print(table)
    for d in result.days:
        if not d["blessed"]:
            console.print(f"held {d['ds']}: " + "; ".join(d["reasons"]))
    if csv:
        result.frame().to_csv(csv, index=False)


class Dataset(str, Enum):
    simulated = "simulated"
    movielens = "movielens"


#: The params profile each study dataset runs under: the simulator's study world (per-user propensities, sticky
#: and intra-day features: the `study` profile) and MovieLens-100K.
DATASET_PROFILES = {Dataset.simulated: "study", Dataset.movielens: "movielens"}


@app.command()
def study(
    dataset: Annotated[Dataset, typer.Option(help="The data to study: the simulator or MovieLens-100K.")] = Dataset.simulated,
    days: Annotated[Optional[int], typer.Option("--days", "-n", min=4, help="Days of the window (default: study.days).")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds (default: study.seeds).")] = None,
    eval_days: Annotated[Optional[int], typer.Option(min=1, help="The last days, where downstream models are evaluated (default: study.eval_days).")] = None,
    warmup_days: Annotated[Optional[int], typer.Option(min=0, help="Upstream-only days before the window (default: study.warmup_days).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes the seeds run in (default: study.workers).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: study.report_dir/<dataset>).")] = None,
    params: ParamsOpt = None,
) -> None:
    """Measures what SUM's embeddings are worth downstream: the paper's Tables 1-4, as a report with plots.

    Per seed (its own simulated world), in worker processes: trains the upstream model daily after a warm-up,
    replays each serving mode's requests in memory through the row's pooling rule under both pool units, trains
    the downstream models with and without each arm's embeddings, and writes ``report.md`` with the PNGs and the
    study's benchmark line.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if params:
        os.environ["SUM_PARAMS"] = str(params.resolve())
    p = load_profile(DATASET_PROFILES[dataset])
    overrides = {k: v for k, v in (("eval_days", eval_days), ("warmup_days", warmup_days)) if v is not None}
    if overrides:
        p = p.model_copy(update={"study": p.study.model_copy(update=overrides)})
    n_days = days or p.study.days
    if n_days < p.study.eval_days + 3:
        raise typer.BadParameter(f"needs at least eval days + 3 = {p.study.eval_days + 3} days (two train days and "
                                 f"the upstream's first), got {n_days}", param_hint="--days")
    folder = out or p.resolve(p.study.report_dir) / dataset.value
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    folder.mkdir(parents=True, exist_ok=True)
    # Feast's and ibis' warnings and logs go to a file: the terminal shows the progress and the verdicts.
    log_file = folder / "study.log"
    handler = logging.FileHandler(log_file, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    for h in [h for h in root.handlers if h is not handler]:
        root.removeHandler(h)
    logging.captureWarnings(True)
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"study {dataset.value}", total=None)

        def on_step(what: str, done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total, description=f"{dataset.value}: {what}")

        results = run_study(p, dataset.value, folder, days=days, seeds=seeds, progress=on_step, workers=workers)
    table = Table(title=f"{dataset.value}: does the paper's direction hold?")
    for column in ("claim", "verdict", "numbers"):
        table.add_column(column)
    for d in results["directions"]:
        said = d.get("verdict") or {True: "yes", False: "no"}.get(d["holds"], "n/a")
        unit = f" [{d['pool_unit']} pooling]" if d.get("pool_unit") else ""
        table.add_row(d["claim"] + unit, said, d["evidence"])
    console.print(table)
    console.print(results["benchmark"])
    console.print(f"report: {folder / 'report.md'} ({results['wall_seconds']:.0f} s; log: {log_file})")


def main() -> None:  # pragma: no cover - console entry
    # The terminal gets the tables and warnings; the stack commands send the full log to a file.
    logging.basicConfig(level=logging.WARNING)
    app()
