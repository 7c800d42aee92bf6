"""SOAP serving benchmark (paper §4 / §6.4): the read path costs about what a bare HTTP server costs and stays flat
while the model grows; the write path keeps up.

Run (about 5-8 minutes on 2 cores; everything on 127.0.0.1)::

    make bench-serving                      # = .venv/bin/python -m benchmarks.serving_bench
    .venv/bin/python -m benchmarks.serving_bench --requests 200 --json reports/serving_bench.json
    .venv/bin/python -m benchmarks.serving_bench --smoke    # 1x/10x, c=1/8, few requests: runs to its end

It starts its own local Ray + Serve with a temporary workspace (simulated user features for ``--users`` users, one
daily-batch row each). SOAP's ingress replica listens on ``--port`` (default 8799) itself; for the baselines, a bare
uvicorn + Starlette JSON no-op (the floor: the same server stack with nothing behind it, in its own process) runs on
``--port + 1`` and Ray Serve's HTTP proxy with a no-op deployment on ``--port + 2``. It prints:

1. HTTP latency p50/p99 and throughput at concurrency 1, 8 and 32 (interleaved rounds, the same client) of
   * ``floor``: the bare uvicorn no-op, ``noop``: the Ray Serve no-op behind Serve's proxy,
   * ``offline`` (the daily batch value: the read path's own cost), ``async`` (the stored value, recompute
     scheduled) and ``realtime`` (budget ``--realtime-budget-ms``, default 1000 ms so its latency shows the
     model's cost),
   each with user towers of about 1x, 10x and 100x the FLOPs of the configured model (``params.yaml`` ``model``:
   its ``hidden_dim`` scaled until ``torch.utils.flop_counter`` measures the ratio);
   per async cell, the **freshness** of the write path: the share of reads whose user was written back within 5 s
   (from the embeddings' offline log, every write-back's time) and the age of the embeddings answered;
2. the ratios against the targets (async/floor p50 <= 2 at c=1 and 8; >= 1,000 async reads/s at c=8; realtime
   p50 <= async p50 + 5 ms at c=1, 1x; async p99 100x/1x <= 1.1);
3. the async freshness at c=8 with the compute given its own CPU (``compute_sched_idle: false``, ``compute_cpus:
   null``) vs the default (compute under SCHED_IDLE on the CPU the read path uses);
4. the in-process client (:class:`serving.client.SoapClient`, what a Python downstream model holds): one user's
   async read p50/p99 (target p99 <= 0.2 ms), and the direct store read vs Feast's ``get_online_features``;
5. compute write-back throughput (users/s) with batches of 32 users vs 1, and in-process ``write_embeddings``.

Latencies are client-side (a minimal keep-alive HTTP/1.1 client on raw sockets, one thread and connection per
concurrent client, in this process, which shares the machine's two cores with the servers); every HTTP path pays
the same client, so the ratios isolate the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.client import SoapClient
from serving.ray_cluster import connect_ray, ensure_ray, shutdown
from serving.rollout import base_url, compute_info, reconfigure, rollout
from serving.store_io import EmbeddingReader, served_fields, write_embeddings
from sum_platform.config import load_params
from sum_platform.feature_store import EMBEDDINGS_VIEW, apply_definitions, feature_spec, user_features_view
from sum_platform.simulate import simulate_day
from sum_platform.offline_log import partition_root
from sum_platform.workspace import Workspace

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SIZES = (1, 10, 100)
CONCURRENCY = (1, 8, 32)
#: Requests per cell relative to ``--requests`` at each concurrency.
LOAD = {1: 1, 8: 2, 32: 3}
PATHS = ("floor", "noop", "offline", "async", "realtime")
#: A read counts as refreshed when its user was written back within this many seconds.
FRESH_WITHIN_S = 5.0


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


def _towers(env: dict, sizes: tuple[int, ...] = SIZES) -> dict[int, dict[str, Any]]:
    """Snapshots with ~1x, 10x, 100x (``sizes``) the configured tower's FLOPs (hidden_dim scaled, FLOPs measured)."""
    base_hidden = int(env["params"].model.hidden_dim)
    base_dir, base_flops = _export(env, base_hidden, "bench-1x")
    towers = {1: {"dir": base_dir, "id": "bench-1x", "flops": base_flops, "hidden_dim": base_hidden}}
    for factor in sizes[1:]:
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


def _start_serve_with_proxy(port: int) -> None:
    """Serve with its HTTP proxy on ``port``, for the no-op baseline (SOAP itself runs no proxy: its ingress
    replica listens on its own port; :func:`serving.ray_cluster.ensure_ray` then reuses this Serve)."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")


def _start_floor(port: int, log_dir: Path) -> subprocess.Popen:
    """The bare uvicorn + Starlette no-op in its own process (like the ingress replica), logs to a file."""
    import httpx

    log = open(log_dir / "floor.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "benchmarks.floor_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--http", "httptools", "--no-access-log", "--log-level", "warning"],
        cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the floor server did not start on 127.0.0.1:{port} (see {log_dir / 'floor.log'})")


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
class _Connection:
    """A minimal HTTP/1.1 keep-alive client on one socket (GET, Content-Length or chunked bodies).

    httpx costs ~0.3 ms of client CPU a request: on two cores shared with the servers it capped even the bare
    uvicorn floor at ~700 requests/s at c=8, measuring the client. This costs a few microseconds, so the
    servers are what is measured.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buf = sock, b""
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _fill(self, sock: socket.socket) -> None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self._buf += data

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a keep-alive connection the server closed is opened again once
            sock = self._sock or self._connect()
            try:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
                return self._response(sock)
            except (ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _response(self, sock: socket.socket) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self._buf:
            self._fill(sock)
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                while b"\r\n" not in self._buf:
                    self._fill(sock)
                size_line, _, self._buf = self._buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self._buf) < size + 2:
                    self._fill(sock)
                body, self._buf = body + self._buf[:size], self._buf[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get(b"content-length", b"0"))
            while len(self._buf) < length:
                self._fill(sock)
            body, self._buf = self._buf[:length], self._buf[length:]
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body


def _load(urls: Callable[[int], str], concurrency: int, requests: int, warmup: int = 20) -> dict[str, Any]:
    """``requests`` GETs from ``concurrency`` threads (one keep-alive connection each); client-side latencies."""
    from urllib.parse import urlsplit

    lat: list[float] = []
    codes: dict[int, int] = {}
    bodies: list[bytes] = []
    sent: list[tuple[int, float]] = []
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)

    def target(url: str) -> str:
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    first = urlsplit(urls(0))
    host, port = first.hostname or "127.0.0.1", int(first.port or 80)

    def worker(k: int) -> None:
        local, local_codes, local_bodies, local_sent = [], {}, [], []
        conn = _Connection(host, port)
        try:
            for i in range(warmup // concurrency + 1):
                conn.get(target(urls(k * 7919 + i)))
            for i in range(per_thread):
                path = target(urls(k * per_thread + i))
                local_sent.append((k * per_thread + i, time.time()))
                t0 = time.perf_counter()
                status, body = conn.get(path)
                local.append(time.perf_counter() - t0)
                local_codes[status] = local_codes.get(status, 0) + 1
                local_bodies.append(body)  # parsed after the run: the client's CPU is shared
        finally:
            conn.close()
        with lock:
            lat.extend(local)
            bodies.extend(local_bodies)
            sent.extend(local_sent)
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
    ages: list[float] = []
    for body in bodies:
        if body.startswith(b"{"):
            answer = json.loads(body)
            fate = answer.get("compute")
            if fate:
                fates[fate] = fates.get(fate, 0) + 1
            if answer.get("age_seconds") is not None:
                ages.append(float(answer["age_seconds"]))
    return {"lat_ms": [x * 1000 for x in lat], "wall": wall, "codes": codes, "compute": fates, "ages": ages,
            "sent": sent}


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell from interleaved rounds: percentiles over every latency, summed counters."""
    arr = np.asarray([x for r in runs for x in r["lat_ms"]])
    ages = np.asarray([x for r in runs for x in r.get("ages", [])])
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
        "age_p50_s": float(np.percentile(ages, 50)) if ages.size else None,
        "age_p99_s": float(np.percentile(ages, 99)) if ages.size else None,
    }


def _written_back(store) -> "Any":
    """Every write-back in the embeddings' offline log: a frame of ``user_id``, ``t`` (Unix seconds)."""
    import pandas as pd

    root = partition_root(store.get_feature_view(EMBEDDINGS_VIEW).batch_source.path)
    files = sorted(root.rglob("*.parquet")) if root.exists() else []
    if not files:
        return pd.DataFrame({"user_id": [], "t": []})
    frame = pd.concat([pd.read_parquet(f, columns=["user_id", "written_at_ms"]) for f in files], ignore_index=True)
    return pd.DataFrame({"user_id": frame["user_id"].astype("int64"), "t": frame["written_at_ms"] / 1000.0})


def _freshness(store, reads: list[tuple[int, float]], within_s: float = FRESH_WITHIN_S) -> float | None:
    """Share of reads ``(user_id, sent at)`` whose user was written back within ``within_s`` after the read."""
    if not reads:
        return None
    log = _written_back(store)
    times: dict[int, np.ndarray] = {int(u): np.sort(g["t"].to_numpy()) for u, g in log.groupby("user_id")}
    hit = 0
    for user, t in reads:
        ts = times.get(int(user))
        if ts is not None:
            j = np.searchsorted(ts, t)
            hit += bool(j < ts.size and ts[j] <= t + within_s)
    return hit / len(reads)


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
def _in_process(env: dict, n: int) -> dict[str, Any]:
    """The in-process client (what a Python downstream model holds): one user's async / offline read latency."""
    client = SoapClient.connect(env["params"], metrics=False)
    ids = [int(u) for u in env["ids"]]
    out: dict[str, Any] = {}
    try:
        for mode in ("async", "offline"):
            for i in range(200):
                client.get([ids[i % len(ids)]], mode=mode)
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                client.get([ids[i % len(ids)]], mode=mode)
                lat.append((time.perf_counter() - t0) * 1000)
            out[mode] = {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "n": n}
        out["compute"] = client.health()
    finally:
        client.close()
    return out


def _cell_runs(urls: dict[str, Callable[[int], str]], conc: int, n: int, n_rt: int, rounds: int, base: str,
               paths: tuple[str, ...] = PATHS) -> dict[str, list]:
    """Interleaved rounds of the paths (machine-load drift hits all alike); compute drained between them."""
    runs: dict[str, list] = {p: [] for p in paths}
    for _ in range(rounds):
        for path in paths:
            count = max(8, n_rt // rounds) if path == "realtime" else n // rounds
            runs[path].append(_load(urls[path], conc, count))
            if path in ("async", "realtime"):
                _drain(base)
    return runs


def _own_cpu(params):
    """The params with the compute on a CPU of its own: normal scheduling, no pinning."""
    serving = params.serving.model_copy(update={"compute_sched_idle": False, "compute_cpus": None})
    return params.model_copy(update={"serving": serving})


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="soap-bench-"))
    report: dict[str, Any] = {"config": vars(args).copy(), "cells": [], "loadavg_start": os.getloadavg()}
    floor = None
    try:
        sizes, concurrency = tuple(args.sizes), tuple(args.concurrency)
        env = _setup(root, args.port, args.users, args.realtime_budget_ms)
        towers = _towers(env, sizes)
        report["towers"] = {
            f"{f}x": {"flops": t["flops"], "hidden_dim": t["hidden_dim"], "ratio": t["flops"] / towers[1]["flops"]}
            for f, t in towers.items()
        }
        print(f"user towers (forward FLOPs per user): {json.dumps(report['towers'])}", flush=True)
        print("in-process store read (one user, same row) ...", flush=True)
        report["store_read"] = _store_reads(env, args.store_reads)

        floor = _start_floor(args.port + 1, root)
        params, params_file = env["params"], env["params_file"]
        connect_ray(params)
        _start_serve_with_proxy(args.port + 2)
        ensure_ray(params)
        noop_url = _deploy_noop(args.port + 2)
        base = base_url(params)
        ids = env["ids"]

        def user_url(mode: str) -> Callable[[int], str]:
            return lambda i: f"{base}/users/{int(ids[i % len(ids)])}/embeddings?mode={mode}"

        urls = {"floor": lambda i: f"http://127.0.0.1:{args.port + 1}/", "noop": lambda i: noop_url,
                **{m: user_url(m) for m in ("offline", "async", "realtime")}}

        def record(size: str, conc: int, runs: dict[str, list], label: str = "") -> None:
            for path, r in runs.items():
                cell = _merge(r)
                if path == "async":
                    reads = [(int(ids[i % len(ids)]), t) for one in r for i, t in one["sent"]]
                    time.sleep(args.fresh_within_s)  # every read's window has closed
                    cell["fresh_share"] = _freshness(env["store"], reads, args.fresh_within_s)
                report["cells"].append({"size": size, "concurrency": conc, "path": path + label, **cell})
                fresh = (f", fresh<={args.fresh_within_s:g}s {cell['fresh_share']:.0%}"
                         if cell.get("fresh_share") is not None else "")
                age = f", age p50 {cell['age_p50_s']:.1f}s" if cell.get("age_p50_s") is not None else ""
                print(
                    f"{size:>4}  c={conc:<2}  {path + label:<14} p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms"
                    f"  ({cell['n']} req, {cell['rps']:.0f}/s, codes {cell['codes']}"
                    + (f", compute {cell['compute']}" if cell["compute"] else "") + fresh + age + ")",
                    flush=True,
                )

        for factor in sizes:
            t = towers[factor]
            rollout(params, t["dir"], t["id"], params_file=params_file, timeout_s=300)
            _drain(base)
            for conc in concurrency:
                n = args.requests * LOAD[conc]
                n_rt = max(40, n // (4 if factor == 100 else 2))
                record(f"{factor}x", conc, _cell_runs(urls, conc, n, n_rt, args.rounds, base))

        # Freshness with the compute on a CPU of its own (no SCHED_IDLE, no pinning): replaces the replicas.
        print("async freshness at c=8, compute on its own CPU ...", flush=True)
        own = _own_cpu(params)
        rollout(own, towers[1]["dir"], towers[1]["id"], params_file=params_file, timeout_s=300)
        _drain(base)
        record("1x", 8, _cell_runs(urls, 8, args.requests * LOAD[8], 0, args.rounds, base, paths=("async",)),
               label="/own-cpu")
        rollout(params, towers[1]["dir"], towers[1]["id"], params_file=params_file, timeout_s=300)
        _drain(base)
        print("in-process client ...", flush=True)
        report["in_process"] = _in_process(env, args.store_reads)
        _drain(base)
        print("write-back throughput ...", flush=True)
        report["write_back"] = _write_throughput(env, towers, args.write_users)
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait(timeout=10)
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
    print(f"size  conc  path            p50 ms   p99 ms    req/s  fresh<={report['config']['fresh_within_s']:g}s")
    for c in report["cells"]:
        fresh = f"{c['fresh_share']:.0%}" if c.get("fresh_share") is not None else ""
        print(f"{c['size']:>4}  {c['concurrency']:>4}  {c['path']:<14} {c['p50_ms']:7.2f}  {c['p99_ms']:7.2f}  "
              f"{c['rps']:7.0f}  {fresh}")
    ratios: dict[str, Any] = {}
    sizes = [f"{f}x" for f in report["config"]["sizes"]]  # what was measured (--smoke: fewer)
    for conc in report["config"]["concurrency"]:
        for size in sizes:
            a, f, n = (_cell(report, size, conc, p) for p in ("async", "floor", "noop"))
            ratios[f"async/floor p50 {size} c={conc}"] = a["p50_ms"] / f["p50_ms"]
            ratios[f"async/serve-noop p50 {size} c={conc}"] = a["p50_ms"] / n["p50_ms"]
        ratios[f"async p99 {sizes[-1]}/1x c={conc}"] = (
            _cell(report, sizes[-1], conc, "async")["p99_ms"] / _cell(report, "1x", conc, "async")["p99_ms"]
        )
    ratios["async reads/s 1x c=8"] = _cell(report, "1x", 8, "async")["rps"]
    ratios["realtime p50 - async p50, 1x c=1 (ms)"] = (
        _cell(report, "1x", 1, "realtime")["p50_ms"] - _cell(report, "1x", 1, "async")["p50_ms"]
    )
    ratios["fresh share 1x c=8 shared CPU"] = _cell(report, "1x", 8, "async").get("fresh_share")
    ratios["fresh share 1x c=8 own CPU"] = _cell(report, "1x", 8, "async/own-cpu").get("fresh_share")
    ip = report["in_process"]
    ratios["in-process async read p99 (ms)"] = ip["async"]["p99_ms"]
    report["ratios"] = ratios
    print("\ntargets: async/floor p50 <= 2 (c=1, 8); >= 1,000 async reads/s at c=8; realtime - async p50 <= 5 ms "
          "(c=1, 1x); async p99 100x/1x <= 1.1; fresh >= 95% at c=8 with compute on its own CPU; in-process p99 <= 0.2 ms")
    for k, v in ratios.items():
        print(f"  {k:<40} " + ("-" if v is None else f"{v:8.2f}"))
    s = report["store_read"]
    print(
        f"\nstore read, one user: direct p50 {s['direct']['p50_ms']:.3f} ms p99 {s['direct']['p99_ms']:.3f} ms | "
        f"Feast get_online_features p50 {s['feast']['p50_ms']:.3f} ms p99 {s['feast']['p99_ms']:.3f} ms"
    )
    print(f"in-process client, one user: async p50 {ip['async']['p50_ms']:.3f} ms p99 {ip['async']['p99_ms']:.3f} ms | "
          f"offline p50 {ip['offline']['p50_ms']:.3f} ms p99 {ip['offline']['p99_ms']:.3f} ms")
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
    parser.add_argument("--port", type=int, default=8799,
                        help="SOAP's port on 127.0.0.1 (default 8799); the floor uses +1, Serve's proxy +2")
    parser.add_argument("--users", type=int, default=256, help="users with features and a stored row")
    parser.add_argument("--requests", type=int, default=300,
                        help="requests per cell at concurrency 1 (x2 at 8, x3 at 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell (noop/async/realtime)")
    parser.add_argument("--realtime-budget-ms", type=float, default=1000.0)
    parser.add_argument("--store-reads", type=int, default=3000,
                        help="reads per in-process read variant (store, client)")
    parser.add_argument("--write-users", type=int, default=256, help="users per write-back throughput run")
    parser.add_argument("--fresh-within-s", type=float, default=FRESH_WITHIN_S,
                        help="an async read is fresh if its user was written back within this many seconds after it")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="towers 1x and 10x, concurrency 1 and 8, a few requests, users and reads: proves the "
                             "benchmark runs to its end (tests/integration/test_benchmarks_smoke.py), measures nothing")
    args = parser.parse_args(argv)
    args.sizes, args.concurrency = (1, 10) if args.smoke else SIZES, (1, 8) if args.smoke else CONCURRENCY
    if args.smoke:
        args.users, args.requests, args.rounds, args.store_reads, args.write_users = 32, 10, 1, 50, 32
        args.fresh_within_s = 1.0  # each async cell waits out its reads' window: 5 cells x 5 s of sleep otherwise
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("SUM_RAY_LOG_TO_DRIVER", "0")
    report = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
