"""SOAP serving benchmark (paper §4 / §6.4): the async read path stays flat while the model grows.

Run (about 3-5 minutes on 2 cores; everything on 127.0.0.1)::

    make bench-serving                      # = .venv/bin/python -m benchmarks.serving_bench
    .venv/bin/python -m benchmarks.serving_bench --requests 200 --json reports/serving_bench.json

It starts its own local Ray + Serve on ``--port`` (default 8799) with a temporary workspace (simulated user
features for ``--users`` users, one daily-batch row each) and prints:

1. HTTP latency p50/p99 at concurrency 1 and 8 of
   * a bare no-op Ray Serve FastAPI endpoint (the baseline, interleaved with the others in the same run),
   * the async read path (``GET /users/{id}/embeddings?mode=async``), and the same store read without
     any compute (``?mode=offline``: the read path's own cost, with no write path sharing the CPU),
   * the realtime path (``?mode=realtime``, budget ``--realtime-budget-ms``, default 1000 ms so its latency
     shows the model's cost; its fallbacks are counted),
   each with user towers of about 1x, 10x and 100x the FLOPs of the configured model (``params.yaml``
   ``model``: the ``compact`` preset; its ``hidden_dim``, the width of the extractor MLPs the preset leaves
   unset, is scaled until ``torch.utils.flop_counter`` measures the ratio);
2. the ratios async/no-op (target <= 1.2) and async p99 at 100x / 1x (target <= 1.1), and realtime's growth;
3. an in-process read of one user's embeddings: the direct read of Feast's SQLite online table
   (:class:`serving.store_io.EmbeddingReader`) vs Feast's ``get_online_features`` for the same row
   (target p99 <= 0.5x);
4. compute write-back throughput (users/s) through the compute deployment with batches of 32 users vs 1
   (and what ``@serve.batch`` forms from concurrent single-user calls), and in-process
   ``write_embeddings`` of 256 users in one call vs one call per user.

Latencies are client-side (a Python HTTP client in this process, which shares the machine's cores with
Ray); the no-op baseline pays the same client, proxy and FastAPI costs, so the ratio isolates SOAP's read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.ray_cluster import ensure_ray, shutdown
from serving.rollout import base_url, compute_info, reconfigure, rollout
from serving.store_io import EmbeddingReader, served_fields, write_embeddings
from sum_platform.config import load_params
from sum_platform.feature_store import EMBEDDINGS_VIEW, apply_definitions, feature_spec, user_features_view
from sum_platform.simulate import simulate_day
from sum_platform.workspace import Workspace

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SIZES = (1, 10, 100)


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def _setup(root: Path, port: int, users: int, realtime_budget_ms: float) -> dict[str, Any]:
    import pandas as pd
    import yaml

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["paths"]["workspace"] = str(root / "workspace")
    raw["serving"].update(
        {
            "host": "127.0.0.1",
            "port": port,
            "ray_address": "local",
            "app_name": "soap-bench",
            "realtime_budget_ms": realtime_budget_ms,
            "max_inflight_compute": 64,
        }
    )
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    os.environ["SUM_PARAMS"] = str(params_file)
    os.environ["SUM_WORKSPACE"] = str(root / "workspace")
    os.environ.pop("RAY_ADDRESS", None)


    params = load_params(params_file)
    store = apply_definitions(params)
    spec = feature_spec(params, store)
    _, frame = simulate_day(params.simulator.start_date, params)
    frame = frame.sort_values("user_id").head(users).reset_index(drop=True)
    frame["event_ts"] = pd.Timestamp.now(tz="UTC")
    store.write_to_online_store(user_features_view(params), frame)
    ids = frame["user_id"].to_numpy()
    k, d = params.model.num_embeddings, params.model.embedding_dim
    emb = np.random.default_rng(0).standard_normal((len(ids), k, d)).astype(np.float16)
    write_embeddings(store, ids, emb, "batch-0", pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=6), batch=True)
    return {"params": params, "params_file": params_file, "store": store, "spec": spec, "users": frame, "ids": ids}


def _tower_flops(snapshot_dir: Path, users) -> int:
    """Forward FLOPs of the snapshot's user tower for one user (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sum_models.data import encode_users
    from sum_models.snapshot import load_user_tower

    tower, _ = load_user_tower(snapshot_dir)
    inputs = encode_users(users.head(1), tower.spec)
    with FlopCounterMode(display=False) as counter:
        tower(inputs.dense, inputs.sparse_ids, inputs.sparse_offsets)
    return int(counter.get_total_flops())


def _model(env: dict, hidden_dim: int):
    from sum_models.model import build_model

    cfg = env["params"].model.model_copy(update={"hidden_dim": int(hidden_dim)})
    return build_model(env["spec"], cfg, seed=1), cfg


def _model_flops(env: dict, hidden_dim: int) -> int:
    """User-tower forward FLOPs for one user of a model built in memory (no export)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sum_models.data import encode_users

    model, _ = _model(env, hidden_dim)
    tower = model.user_tower.eval()
    inputs = encode_users(env["users"].head(1), tower.spec)
    with FlopCounterMode(display=False) as counter:
        tower(inputs.dense, inputs.sparse_ids, inputs.sparse_offsets)
    return int(counter.get_total_flops())


def _export(env: dict, hidden_dim: int, name: str) -> tuple[Path, int]:
    from sum_models.snapshot import export_snapshot

    model, cfg = _model(env, hidden_dim)
    out = export_snapshot(model, env["spec"], cfg, Workspace(env["params"].workspace).snapshot_dir(name), name)
    return out, _tower_flops(out, env["users"])


def _towers(env: dict) -> dict[int, dict[str, Any]]:
    """Snapshots with ~1x, 10x, 100x the configured tower's FLOPs (hidden_dim scaled, FLOPs measured)."""
    base_hidden = int(env["params"].model.hidden_dim)
    base_dir, base_flops = _export(env, base_hidden, "bench-1x")
    towers = {1: {"dir": base_dir, "id": "bench-1x", "flops": base_flops, "hidden_dim": base_hidden}}
    for factor in SIZES[1:]:
        target = factor * base_flops
        points = [(base_hidden, base_flops)]
        hidden = base_hidden * factor
        for _ in range(6):  # FLOPs are ~affine in hidden_dim (the preset's fixed layers): secant steps
            flops = _model_flops(env, hidden)
            points.append((hidden, flops))
            if abs(flops / target - 1) < 0.02:
                break
            (h0, f0), (h1, f1) = points[-2], points[-1]
            if f1 == f0:
                raise RuntimeError(f"the model's FLOPs do not depend on hidden_dim ({f1}); cannot scale the tower")
            hidden = max(1, int(round(h1 + (target - f1) * (h1 - h0) / (f1 - f0))))
        out, flops = _export(env, points[-1][0], f"bench-{factor}x")
        towers[factor] = {"dir": out, "id": f"bench-{factor}x", "flops": flops, "hidden_dim": points[-1][0]}
    return towers


def _deploy_noop(port: int) -> str:
    from fastapi import FastAPI
    from ray import serve
    from ray.serve.api import RunTarget

    noop_api = FastAPI()

    @serve.deployment(  # the same Serve options as the SOAP ingress (no per-request access log)
        name="NoOp",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=256,
        logging_config={"enable_access_log": False},
    )
    @serve.ingress(noop_api)
    class NoOp:
        @noop_api.get("/")
        async def root(self) -> dict:
            return {"ok": True}

    serve.run_many([RunTarget(target=NoOp.bind(), name="noop", route_prefix="/noop")], wait_for_applications_running=True)
    return f"http://127.0.0.1:{port}/noop/"


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def _load(urls: Callable[[int], str], concurrency: int, requests: int, warmup: int = 20) -> dict[str, Any]:
    """``requests`` GETs from ``concurrency`` threads (keep-alive clients); client-side latencies."""
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    bodies: list[bytes] = []
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)

    def worker(k: int) -> None:
        local, local_codes, local_bodies = [], {}, []
        with httpx.Client(timeout=30) as client:
            for i in range(warmup // concurrency + 1):
                client.get(urls(k * 7919 + i))
            for i in range(per_thread):
                url = urls(k * per_thread + i)
                t0 = time.perf_counter()
                resp = client.get(url)
                local.append(time.perf_counter() - t0)
                local_codes[resp.status_code] = local_codes.get(resp.status_code, 0) + 1
                local_bodies.append(resp.content)  # parsed after the run: the client's CPU is shared
        with lock:
            lat.extend(local)
            bodies.extend(local_bodies)
            for c, n in local_codes.items():
                codes[c] = codes.get(c, 0) + n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    fates: dict[str, int] = {}
    for body in bodies:
        if body.startswith(b"{"):
            fate = json.loads(body).get("compute")
            if fate:
                fates[fate] = fates.get(fate, 0) + 1
    return {"lat_ms": [x * 1000 for x in lat], "wall": wall, "codes": codes, "compute": fates}


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell from interleaved rounds: percentiles over every latency, summed counters."""
    arr = np.asarray([x for r in runs for x in r["lat_ms"]])
    codes: dict[int, int] = {}
    fates: dict[str, int] = {}
    for r in runs:
        for c, n in r["codes"].items():
            codes[c] = codes.get(c, 0) + n
        for f, n in r["compute"].items():
            fates[f] = fates.get(f, 0) + n
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "n": int(arr.size),
        "rps": float(arr.size / sum(r["wall"] for r in runs)),
        "codes": codes,
        "compute": fates,
    }


def _drain(base: str, timeout_s: float = 120.0) -> None:
    """Waits until the ingress has no compute call in flight (cells must not overlap)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/healthz", timeout=30).json().get("compute_inflight", 0) == 0:
            return
        time.sleep(0.2)


def _store_reads(env: dict, n: int) -> dict[str, Any]:
    """One user's served embeddings: the direct SQLite read vs Feast get_online_features (same row)."""

    store, uid = env["store"], int(env["ids"][0])
    reader = EmbeddingReader(store)
    features = [f"{EMBEDDINGS_VIEW}:{f}" for f in served_fields(reader.k)]
    direct = lambda: reader.embeddings([uid])  # noqa: E731
    feast = lambda: store.get_online_features(features=features, entity_rows=[{"user_id": uid}]).to_dict()  # noqa: E731
    a = np.asarray(direct()[uid]["embeddings"], np.float32)
    b = np.asarray([feast()[f"embedding_{j}"][0] for j in range(reader.k)], np.float32)
    assert np.array_equal(a, b), "direct and Feast reads disagree"
    # Interleaved blocks, so machine-load drift hits both alike.
    lat: dict[str, list[float]] = {"direct": [], "feast": []}
    for _ in range(50):
        direct(), feast()
    for _ in range(10):
        for name, fn in (("direct", direct), ("feast", feast)):
            for _ in range(max(1, n // 10)):
                t0 = time.perf_counter()
                fn()
                lat[name].append((time.perf_counter() - t0) * 1000)
    out: dict[str, Any] = {
        name: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))} for name, v in lat.items()
    }
    out["p99_ratio"] = out["direct"]["p99_ms"] / out["feast"]["p99_ms"]
    return out


def _write_throughput(env: dict, towers: dict, n_users: int) -> dict[str, Any]:
    """Users/s written back (pooled read-modify-write + Feast online write) by the compute deployment:

    * ``batched``: compute batches of 32 users (sequential ``compute_many`` calls of 32 ids);
    * ``unbatched``: one user per batch (sequential single-user calls);
    * ``serve_batch``: concurrent single-user calls grouped by ``@serve.batch`` (max 32) as they arrive
      (the batch sizes formed depend on the caller's speed; reported);
    * ``store_*``: in-process ``write_embeddings`` of all users in one call vs one call per user.
    """
    import asyncio

    from ray import serve

    params, params_file = env["params"], env["params_file"]
    ids = [int(u) for u in env["ids"][:n_users]]
    handle = serve.get_deployment_handle("ComputeCenter", app_name=params.serving.app_name)

    def timed(calls: list[list[int]], concurrent: bool) -> tuple[float, int]:
        async def go() -> list:
            if concurrent:
                return await asyncio.gather(*[handle.compute_many.remote(c) for c in calls])
            return [await handle.compute_many.remote(c) for c in calls]

        t0 = time.perf_counter()
        results = asyncio.run(go())
        wall = time.perf_counter() - t0
        return wall, sum(1 for r in results for item in r if item.get("status") == "written")

    out: dict[str, Any] = {}
    reconfigure(params, compute_options={"max_batch_size": 32}, params_file=params_file)
    timed([ids[i : i + 32] for i in range(0, len(ids), 32)], concurrent=False)  # warm: rows exist
    wall, written = timed([ids[i : i + 32] for i in range(0, len(ids), 32)], concurrent=False)
    out["batched"] = {"users_per_s": written / wall, "users_per_batch": 32}
    before = compute_info(params)["stats"]["batches"]
    wall, written = timed([[u] for u in ids], concurrent=True)
    batches = compute_info(params)["stats"]["batches"] - before
    out["serve_batch"] = {"users_per_s": written / wall, "users_per_batch": written / max(1, batches)}
    reconfigure(params, compute_options={"max_batch_size": 1}, params_file=params_file)
    few = ids[:64]
    wall, written = timed([[u] for u in few], concurrent=False)
    out["unbatched"] = {"users_per_s": written / wall, "users_per_batch": 1}
    reconfigure(params, compute_options={"max_batch_size": params.serving.compute_max_batch_size}, params_file=params_file)

    k, d = params.model.num_embeddings, params.model.embedding_dim
    emb = np.random.default_rng(1).standard_normal((len(ids), k, d)).astype(np.float16)
    t0 = time.perf_counter()
    write_embeddings(env["store"], ids, emb, "bench-w", None)
    out["store_one_call"] = {"users_per_s": len(ids) / (time.perf_counter() - t0)}
    t0 = time.perf_counter()
    for i, u in enumerate(few):
        write_embeddings(env["store"], [u], emb[i : i + 1], "bench-w", None)
    out["store_per_user"] = {"users_per_s": len(few) / (time.perf_counter() - t0)}
    return out


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:

    t_start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="soap-bench-"))
    report: dict[str, Any] = {"config": vars(args).copy(), "cells": [], "loadavg_start": os.getloadavg()}
    try:
        env = _setup(root, args.port, args.users, args.realtime_budget_ms)
        towers = _towers(env)
        report["towers"] = {
            f"{f}x": {"flops": t["flops"], "hidden_dim": t["hidden_dim"], "ratio": t["flops"] / towers[1]["flops"]}
            for f, t in towers.items()
        }
        print(f"user towers (forward FLOPs per user): {json.dumps(report['towers'])}", flush=True)
        print("in-process store read (one user, same row) ...", flush=True)
        report["store_read"] = _store_reads(env, args.store_reads)

        ensure_ray(env["params"])
        noop_url = _deploy_noop(args.port)
        params, params_file = env["params"], env["params_file"]
        base = base_url(params)
        ids = env["ids"]

        def user_url(mode: str) -> Callable[[int], str]:
            return lambda i: f"{base}/users/{int(ids[i % len(ids)])}/embeddings?mode={mode}"

        for factor in SIZES:
            t = towers[factor]
            rollout(params, t["dir"], t["id"], params_file=params_file, timeout_s=300)
            _drain(base)
            for conc in (1, 8):
                n = args.requests if conc == 1 else args.requests * 2
                n_rt = max(40, n // (4 if factor == 100 else 2))
                # Interleaved rounds (noop, async, realtime, noop, ...): machine-load drift hits all alike.
                runs: dict[str, list] = {"noop": [], "offline": [], "async": [], "realtime": []}
                for _ in range(args.rounds):
                    runs["noop"].append(_load(lambda i: noop_url, conc, n // args.rounds))
                    # offline = the same store read without any compute: the read path's own cost.
                    runs["offline"].append(_load(user_url("offline"), conc, n // args.rounds))
                    runs["async"].append(_load(user_url("async"), conc, n // args.rounds))
                    _drain(base)
                    runs["realtime"].append(_load(user_url("realtime"), conc, max(8, n_rt // args.rounds)))
                    _drain(base)
                cells = {path: _merge(r) for path, r in runs.items()}
                for path, cell in cells.items():
                    report["cells"].append({"size": f"{factor}x", "concurrency": conc, "path": path, **cell})
                    print(
                        f"{factor:>4}x  c={conc}  {path:<9} p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms"
                        f"  ({cell['n']} req, {cell['rps']:.0f}/s, codes {cell['codes']}"
                        + (f", compute {cell['compute']})" if cell["compute"] else ")"),
                        flush=True,
                    )
        rollout(params, towers[1]["dir"], towers[1]["id"], params_file=params_file, timeout_s=300)
        _drain(base)
        print("write-back throughput ...", flush=True)
        report["write_back"] = _write_throughput(env, towers, args.write_users)
    finally:
        try:
            shutdown(stop_serve=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    report["loadavg_end"] = os.getloadavg()
    _summarise(report)
    return report


def _cell(report: dict, size: str, conc: int, path: str) -> dict:
    return next(c for c in report["cells"] if c["size"] == size and c["concurrency"] == conc and c["path"] == path)


def _summarise(report: dict) -> None:
    print("\n=== SOAP serving benchmark ===")
    print("size  conc  path       p50 ms   p99 ms")
    for c in report["cells"]:
        print(f"{c['size']:>4}  {c['concurrency']:>4}  {c['path']:<9} {c['p50_ms']:7.2f}  {c['p99_ms']:7.2f}")
    ratios: dict[str, Any] = {}
    for conc in (1, 8):
        for size in ("1x", "10x", "100x"):
            a, n = _cell(report, size, conc, "async"), _cell(report, size, conc, "noop")
            o = _cell(report, size, conc, "offline")
            ratios[f"async/noop p50 {size} c={conc}"] = a["p50_ms"] / n["p50_ms"]
            ratios[f"async/noop p99 {size} c={conc}"] = a["p99_ms"] / n["p99_ms"]
            ratios[f"offline/noop p50 {size} c={conc}"] = o["p50_ms"] / n["p50_ms"]
        ratios[f"async p99 100x/1x c={conc}"] = (
            _cell(report, "100x", conc, "async")["p99_ms"] / _cell(report, "1x", conc, "async")["p99_ms"]
        )
        ratios[f"realtime p50 100x/1x c={conc}"] = (
            _cell(report, "100x", conc, "realtime")["p50_ms"] / _cell(report, "1x", conc, "realtime")["p50_ms"]
        )
        ratios[f"realtime p99 100x/1x c={conc}"] = (
            _cell(report, "100x", conc, "realtime")["p99_ms"] / _cell(report, "1x", conc, "realtime")["p99_ms"]
        )
    report["ratios"] = ratios
    print("\nratios (targets: async/noop <= 1.2; async p99 100x/1x <= 1.1; realtime grows)")
    for k, v in ratios.items():
        print(f"  {k:<32} {v:6.2f}")
    s = report["store_read"]
    print(
        f"\nstore read, one user: direct p50 {s['direct']['p50_ms']:.3f} ms p99 {s['direct']['p99_ms']:.3f} ms | "
        f"Feast get_online_features p50 {s['feast']['p50_ms']:.3f} ms p99 {s['feast']['p99_ms']:.3f} ms | "
        f"p99 ratio {s['p99_ratio']:.2f} (target <= 0.5)"
    )
    w = report["write_back"]
    print(
        "write-back throughput (users/s): compute deployment batches of 32 {:.0f} vs 1 user {:.0f} "
        "(ratio {:.1f}); @serve.batch over concurrent single-user calls {:.0f} ({:.1f} users/batch) | "
        "in-process store write, one call {:.0f} vs per user {:.0f}".format(
            w["batched"]["users_per_s"],
            w["unbatched"]["users_per_s"],
            w["batched"]["users_per_s"] / w["unbatched"]["users_per_s"],
            w["serve_batch"]["users_per_s"],
            w["serve_batch"]["users_per_batch"],
            w["store_one_call"]["users_per_s"],
            w["store_per_user"]["users_per_s"],
        )
    )
    print(
        f"total {report['seconds']} s; {os.cpu_count()} CPUs, load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in report['loadavg_start'])}, at end "
        f"{'/'.join(f'{x:.1f}' for x in report['loadavg_end'])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8799, help="HTTP port on 127.0.0.1 (default 8799)")
    parser.add_argument("--users", type=int, default=256, help="users with features and a stored row")
    parser.add_argument("--requests", type=int, default=300, help="requests per cell at concurrency 1 (x2 at 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell (noop/async/realtime)")
    parser.add_argument("--realtime-budget-ms", type=float, default=1000.0)
    parser.add_argument("--store-reads", type=int, default=3000, help="reads per in-process store read variant")
    parser.add_argument("--write-users", type=int, default=256, help="users per write-back throughput run")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("SUM_RAY_LOG_TO_DRIVER", "0")
    report = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
