"""``sumctl study``: what the SUM embeddings are worth downstream, measured as the paper's Tables 1-4 (§6).

One run, per seed (each seed its own simulated world: ``sum_pipeline/study_data.py``; MovieLens is fixed data),
in ``study.workers`` processes:

1. **Upstream** (``study_upstream.py``). The SUM model trains day by day (warm start, as the daily DAG does) on
   ``study.warmup_days`` days before the window, then on the window's days ``0 .. D-2``; ``S_t`` is the
   snapshot of window day ``t``. Frozen serves the last warm-up snapshot for the whole window.
2. **Serving replay** (``study_replay.py``), in memory through the row owner's pooling rule
   (:mod:`sum_platform.embedding_row`), under both pool units (``snapshot``, ``write``): day ``t``'s requests,
   ``study.replay_batch`` at a time in time order, served by ``S_{t-1}`` in async and realtime mode; offline
   reads the daily batch ``study.offline_staleness_days`` old (pooled, and raw: no AP); frozen computes the
   frozen snapshot on the request's features (no store). A request is embedded on the user features in force at
   its time (several user rows a day when features change within the day).
3. **Downstream** (``study_downstream.py``). Each downstream model (:data:`sum_models.downstream.PRESETS`) is
   trained day by day on days ``1 .. D-1`` (warm-started daily), without the embeddings and with each arm's,
   and scored on each day before it trains on it (progressive NE), over every impression (``all``), the
   impressions every arm serves an embedding (``covered``) and returning users' (``returning``: impressions on
   an earlier day), in the last ``study.eval_days`` days (``eval``) and the days before (``early``).

``results["measurements"]`` holds one NE per (seed, model, arm, pool unit, window, subset);
``sum_pipeline/study_stats.py`` turns them into Tables 1-4 with paired per-seed contrasts.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import numpy as np
import pandas as pd

from sum_models.shift import POOL_DEPTH, shift_by_pooling_depth, shift_metrics
from sum_pipeline.study_data import Day, load_days, world_params
from sum_pipeline.study_downstream import describe, encode_days, run_arm, window_ne
from sum_pipeline.study_replay import replay
from sum_pipeline.study_report import write_report
from sum_pipeline.study_upstream import Upstream, train_upstream
from sum_platform.config import Params
from sum_platform.embedding_row import POOL_UNITS
from sum_platform.feature_store import spec_from_fields, user_feature_fields

from sum_pipeline import study_stats
from sum_platform import downstream_inputs

log = logging.getLogger(__name__)

#: Arms that do not depend on the pool unit; async and realtime are measured under each unit.
UNIT_FREE_ARMS = ("none", "frozen", "offline", "offline_raw")
ONLINE_ARMS = ("async", "realtime")
#: Table 2's modes, and the arm Table 1 reports (production serves async).
TABLE2_MODES = ("frozen", "offline", "realtime", "async")
TABLE1_ARM = "async"
#: Async served only by the snapshots the consumer check passes (``study.consumer_gated_arm``).
GATED_ARM = "async_gated"
SUBSETS = ("all", "covered", "returning")

Progress = Callable[[str, int, int], None]  # (what, steps done, steps in all) -> None


def default_unit(params: Params) -> str:
    """Serving's pool unit (``serving.pool_unit``)."""
    return str(params.serving.pool_unit)


def arm_keys() -> list[tuple[str, str | None]]:
    """Every measured (arm, pool unit)."""
    return [(a, None) for a in UNIT_FREE_ARMS] + [(a, u) for a in ONLINE_ARMS for u in POOL_UNITS]


def arm_label(arm: str, unit: str | None, params: Params) -> str:
    """The arm's name in the daily rows and the fallback tables: serving's own unit unmarked."""
    return arm if unit is None or unit == default_unit(params) else f"{arm}@{unit}"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def downstream_specs_for(params: Params, spec) -> dict:
    """The downstream models' specs: each model's own user features (``downstream.user_features``)."""
    return downstream_inputs.downstream_specs_for(params)


# ------------------------------------------------------------------------------------------------ one seed

_DAYS_CACHE: dict[Any, list[Day]] = {}


def _days_of(params: Params, index: int, n: int) -> tuple[list[Day], dict]:
    """A seed's days (its own world); fixed data is loaded once per process."""
    wparams, world = world_params(params, index)
    key = (world.get("world_seed"), n, params.source.kind)
    if key not in _DAYS_CACHE:
        _DAYS_CACHE.clear()
        _DAYS_CACHE[key] = load_days(wparams, n)
    return _DAYS_CACHE[key], world


def run_seed(params: Params, seed: int, index: int, n_days: int, report: Callable[[str, int], None] | None = None
             ) -> dict[str, Any]:
    """Everything the study measures for one seed (a worker's job: picklable in and out)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per seed: the same numbers serially and in a worker
    try:
        return _run_seed(params, seed, index, n_days, report or (lambda what, n: None))
    finally:
        torch.set_num_threads(threads)


def _run_seed(params: Params, seed: int, index: int, n_days: int, report: Callable[[str, int], None]) -> dict:
    cfg, ev = params.study, params.events
    # wall and CPU seconds per stage (CPU: what the stage costs a free core, whatever else the machine runs)
    seconds = {"load": 0.0, "upstream": 0.0, "replay": 0.0, "downstream": 0.0}
    cpu = dict(seconds)
    clock = [time.perf_counter(), time.process_time()]

    def lap(stage: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        seconds[stage] += now[0] - clock[0]
        cpu[stage] += now[1] - clock[1]
        clock[:] = now

    loaded, world = _days_of(params, index, cfg.warmup_days + n_days)
    warm, days = loaded[:cfg.warmup_days], loaded[cfg.warmup_days:]
    lap("load")
    spec = spec_from_fields(user_feature_fields(params), params)
    specs = downstream_specs_for(params, spec)
    staleness = cfg.offline_staleness_days
    up = train_upstream(params, spec, warm, days, seed, lambda what, n: report(what, n),
                        lead=POOL_DEPTH + staleness - 1)
    gated_up = (train_upstream(params, spec, warm, days, seed, lambda what, n: report(what, n),
                               lead=POOL_DEPTH + staleness - 1, consumer_gate=True)
                if cfg.consumer_gated_arm else None)
    lap("upstream")

    replayed = warm[len(warm) - up.lead:] + days if up.lead else days
    arms: dict[tuple[str, str | None], list[np.ndarray] | None] = {("none", None): None,
                                                                    ("frozen", None): frozen_arm(days, up)}
    stats: dict[tuple[str, str | None], dict] = {("frozen", None): {"coverage": _coverage(arms["frozen", None])}}
    offline = {}
    for unit in POOL_UNITS:
        offline[unit], offline_stats = replay("offline", params, replayed, up, seed, unit, staleness)
    arms["offline", None], arms["offline_raw", None] = offline["snapshot"]["served"], offline["snapshot"]["raw"]
    stats["offline", None] = stats["offline_raw", None] = offline_stats
    offline_same = all(np.array_equal(a, b, equal_nan=True) for src in ("served", "raw")
                       for a, b in zip(offline["snapshot"][src], offline["write"][src]))
    for arm in ONLINE_ARMS:
        for unit in POOL_UNITS:
            served, st = replay(arm, params, replayed, up, seed, unit)
            arms[arm, unit], stats[arm, unit] = served["served"], st
    if gated_up is not None:  # async as production serves it (serving's pool unit), from the consumer-gated chain
        unit = default_unit(params)
        served, st = replay("async", params, replayed, gated_up, seed, unit)
        arms[GATED_ARM, unit], stats[GATED_ARM, unit] = served["served"], st
    report(f"replay seed {seed}", 1)
    lap("replay")

    down_days = [d.ds for d in days[1:]]
    eval_days, early_days = down_days[-cfg.eval_days:], down_days[:-cfg.eval_days]
    # The subsets are the main arms' (the gated arm serves the same users, from other snapshots).
    masks = _subsets(days, loaded, [a for key, a in arms.items() if a is not None and key[0] != GATED_ARM],
                     ev.user_id)
    out: dict[str, Any] = {"seed": seed, "world": world, "measurements": [], "fi_rank": [], "daily": [],
                           "importance": [], "eval_ne": {}, "train_ne": {}}
    for name, dspec in specs.items():
        encoded = encode_days(dspec, days)  # once per model: the arms differ only in the embeddings
        for (arm, unit), emb in arms.items():
            label = arm_label(arm, unit, params)
            scored, table = run_arm(dspec.with_embeddings(emb is not None), days, emb, params, seed,
                                    importance=arm == TABLE1_ARM and unit == default_unit(params), encoded=encoded)
            for ds in down_days:
                out["daily"].append({"mode": label, "model": name, "seed": seed, "ds": ds,
                                     "ne": window_ne(scored, [ds])[0]})
            for window, which in (("eval", eval_days), ("early", early_days)):
                for subset in SUBSETS:
                    ne, n = window_ne(scored, which, None if subset == "all" else masks[subset])
                    out["measurements"].append({
                        "seed": seed, "model": name, "arm": arm, "pool_unit": unit, "window": window,
                        "subset": subset, "ne": ne, "n": n,
                        "coverage": None if emb is None else stats[arm, unit]["coverage"]})
            out["eval_ne"][label, name] = window_ne(scored, eval_days)[0]
            out["train_ne"][label, name] = window_ne(scored, early_days)[0]
            if table is not None:
                from sum_models.importance import sum_embedding_rank

                out["fi_rank"].append({"seed": seed, "model": name, "rank": sum_embedding_rank(table),
                                       "n_features": len(table)})
                out["importance"] += [{**r, "model": name, "seed": seed} for r in table.to_dict("records")]
            report(f"downstream {name} seed {seed}", 1)
    lap("downstream")
    frozen_ds = up.frozen_id
    out.update({
        "shift": _shift_records(days, up, seed),
        "norms": [{"seed": seed, **r} for r in up.norms],
        "gate": [{"seed": seed, **r} for r in up.gate],
        "consumer_gate": [{"seed": seed, **r} for r in (gated_up.gate if gated_up is not None else [])],
        "mode_stats": {arm_label(a, u, params): s for (a, u), s in stats.items()},
        "upstream_ne": [ne.get(ev.labels[0], math.nan) for ne in up.holdout_ne],
        "offline_same_under_both_units": bool(offline_same),
        "frozen_snapshot": frozen_ds,
        "window_days": [d.ds for d in days],
        "frozen_staleness_days": _staleness(frozen_ds, days[1].ds, days[-1].ds),
        "seconds": seconds,
        "cpu_seconds": cpu,
    })
    return out


def _staleness(snapshot_id: str | None, first: str, last: str) -> list[int] | None:
    """Days from the frozen snapshot's training day to the window's first and last downstream day."""
    if not snapshot_id:
        return None
    trained = pd.Timestamp(snapshot_id.removeprefix("sum-"))
    return [(pd.Timestamp(first) - trained).days, (pd.Timestamp(last) - trained).days]


def _coverage(arm: list[np.ndarray]) -> float:
    n = sum(len(a) for a in arm)
    return float(sum(np.isfinite(a[:, 0, 0]).sum() for a in arm) / max(n, 1))


def frozen_arm(days: list[Day], up: Upstream) -> list[np.ndarray]:
    """Frozen mode: the frozen snapshot on the request's current features (no pooling, no store)."""
    out = []
    for t in range(1, len(days)):
        rows = np.asarray(days[t].rows)
        emb = np.full((len(rows), *up.frozen[t - 1].shape[1:]), np.nan, dtype=np.float16)
        emb[rows >= 0] = up.frozen[t - 1][rows[rows >= 0]]
        out.append(emb)
    return out


def _subsets(days: list[Day], loaded: list[Day], arms: list[list[np.ndarray]], user_id: str
             ) -> dict[str, dict[str, np.ndarray]]:
    """Per downstream day, the rows of ``covered`` (every arm served an embedding) and ``returning`` (the user has
    impressions on an earlier loaded day, warm-up included)."""
    covered, returning = {}, {}
    seen: set = set()
    for day in loaded:
        if day.ds == days[1].ds:
            break
        seen |= set(day.frame[user_id].to_numpy().tolist())
    for t, day in enumerate(days[1:]):
        users = day.frame[user_id].to_numpy()
        covered[day.ds] = np.logical_and.reduce([np.isfinite(a[t][:, 0, 0]) for a in arms]) if arms \
            else np.ones(len(users), bool)
        returning[day.ds] = np.isin(users, np.fromiter(seen, np.int64, len(seen)))
        seen |= set(users.tolist())
    return {"covered": covered, "returning": returning}


def _shift_records(days: list[Day], up: Upstream, seed: int) -> list[dict]:
    """Table 3 per seed: the daily batch versions' shift per pooling depth (``part: total``), and at depth 1 its
    split into the snapshot part (same features, ``S_{t-1} -> S_t``) and the feature part (same snapshot,
    ``f_{t-1} -> f_t``), on the users the two compared values share."""
    batch = up.batch[up.lead:]
    ids = [d.users["user_id"].to_numpy()[d.latest] for d in days[:-1]]
    common = set(ids[0].tolist())
    for x in ids[1:]:
        common &= set(x.tolist())
    probe = np.asarray(sorted(common), dtype=np.int64)
    versions = [b[pd.Index(x).get_indexer(probe)].astype(np.float32) for b, x in zip(batch, ids)]
    out = [{**r, "seed": seed, "part": "total"}
           for r in shift_by_pooling_depth(versions, range(1, min(5, len(versions) - 1) + 1))]
    parts: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for t in range(1, len(days) - 1):
        day = days[t]
        latest_ids = ids[t]
        fresh_latest = up.fresh[t - 1][day.latest]           # S_{t-1} on f_t
        prev = pd.Index(ids[t - 1]).get_indexer(latest_ids)
        has_prev = prev >= 0
        pairs = {"snapshot": (batch[t], fresh_latest),                                   # S_t vs S_{t-1}, on f_t
                 "features": (fresh_latest[has_prev], batch[t - 1][prev[has_prev]])}    # f_t vs f_{t-1}, S_{t-1}
        for part, (new, old) in pairs.items():
            if not len(new):
                continue
            for r in shift_metrics(new.astype(np.float32), old.astype(np.float32)):
                parts.setdefault((part, r["embedding"]), []).append((r["mean_cosine"], r["relative_l2_change"]))
    for (part, k), vals in parts.items():
        out.append({"seed": seed, "part": part, "embedding": k, "pooling": 1,
                    "cosine": float(np.mean([c for c, _ in vals])), "l2_change": float(np.mean([l for _, l in vals])),
                    "days": len(vals)})
    return out


# ------------------------------------------------------------------------------------------------ the study

def run_study(params: Params, dataset: str, out_dir, days: int | None = None, seeds: int | None = None,
              progress: Progress | None = None, workers: int | None = None) -> dict[str, Any]:
    """Runs the study on the params' source and writes its report to ``out_dir``.

    Args:
        params: Params with the source to study (``sumctl study --dataset`` picks the profile).
        dataset: The name the report carries (``simulated`` | ``movielens``).
        out_dir: The report folder.
        days: Days of the window (default ``study.days``); ``study.warmup_days`` more are loaded before it.
        seeds: Seeds (default ``study.seeds``).
        progress: ``(what, steps done, steps in all)`` after each step.
        workers: Processes the seeds run in (default ``study.workers``; 1: in this process).

    Returns:
        The results (the report's ``results.json``).
    """
    started = time.perf_counter()
    cfg = params.study
    n_days, n_seeds = days or cfg.days, seeds or cfg.seeds
    if n_days < cfg.eval_days + 3:
        raise ValueError(f"the study needs at least eval_days + 3 = {cfg.eval_days + 3} days, got {n_days}")
    n_workers = max(1, min(workers or cfg.workers, n_seeds))
    seed_list = [params.seed + i for i in range(n_seeds)]
    spec = spec_from_fields(user_feature_fields(params), params)
    specs = downstream_specs_for(params, spec)
    n_arms = len(arm_keys()) + int(cfg.consumer_gated_arm)
    chains = 1 + int(cfg.consumer_gated_arm)  # the consumer-gated arm trains an upstream chain of its own
    per_seed_steps = chains * (cfg.warmup_days + n_days - 1) + 1 + len(specs) * n_arms
    total, done = n_seeds * per_seed_steps, [0]

    def on_step(what: str, n: int) -> None:
        done[0] += n
        if progress:
            progress(what, done[0], total)

    per_seed = _run_seeds(params, seed_list, n_days, n_workers, on_step)
    results = assemble(params, dataset, per_seed, seed_list, specs, n_days, n_workers)
    results["user_signal"] = baseline_signal(params, results["eval_days"][-1], len(seed_list))
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    stage = results["stage_seconds"]
    results["benchmark"] = (f"study {dataset}: {results['wall_seconds']:.0f} s wall for {n_seeds} seeds on "
                            f"{n_workers} worker(s), {n_days} window days + {cfg.warmup_days} warm-up; summed over "
                            "seeds (wall / CPU): " + ", ".join(f"{k} {v:.0f} / {results['stage_cpu_seconds'][k]:.0f} s"
                                                               for k, v in stage.items()))
    log.info("%s", results["benchmark"])
    write_report(results, out_dir)
    return results


#: Worlds the user-signal yardstick averages over (each a ridge fit on one day's users: seconds, not minutes).
SIGNAL_WORLDS = 3


def baseline_signal(params: Params, ds: str, n_seeds: int) -> list[dict[str, Any]]:
    """How much of the simulated user each downstream baseline already sees, beside what SUM's user model reads:
    per feature set, the out-of-sample R^2 of a linear read of the hidden interests and propensities
    (:func:`sum_platform.downstream_inputs.user_signal_share`) on day ``ds``, in the first ``SIGNAL_WORLDS`` seeds'
    worlds. The three downstream models see different amounts of the user, so their gains against this yardstick
    are the study's dose-response. Empty for sources without a known hidden state (MovieLens, parquet).
    """
    if params.source.kind != "simulator":
        return []
    spec = spec_from_fields(user_feature_fields(params), params)
    sets = {name: f.model_dump() for name, f in params.downstream.user_features.items()
            if name in params.downstream.models}
    sets["SUM user model"] = {"dense": len(spec.user_dense), "lists": list(spec.user_sparse)}
    out = []
    for index in range(min(SIGNAL_WORLDS, n_seeds)):
        world, _ = world_params(params, index)
        for name, features in sets.items():
            out.append({"model": name, "world": index, **downstream_inputs.user_signal_share(ds, world, features)})
    return out


def _run_seeds(params: Params, seed_list: list[int], n_days: int, n_workers: int,
               on_step: Callable[[str, int], None]) -> list[dict]:
    if n_workers == 1:
        return [run_seed(params, seed, i, n_days, on_step) for i, seed in enumerate(seed_list)]
    # spawn: a fresh interpreter per worker (torch and forked threads do not mix); progress through a queue
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_worker, params, seed, i, n_days, queue): seed for i, seed in enumerate(seed_list)}
            pending = set(futures)
            while pending:
                _drain(queue, on_step)
                finished = [f for f in pending if f.done()]
                for f in finished:
                    pending.discard(f)
                if pending:
                    time.sleep(0.2)
            _drain(queue, on_step)
            by_seed = {futures[f]: f.result() for f in futures}
    return [by_seed[s] for s in seed_list]


def _drain(queue, on_step) -> None:
    while not queue.empty():
        what, n = queue.get()
        on_step(what, n)


def _worker(params: Params, seed: int, index: int, n_days: int, queue) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_seed(params, seed, index, n_days, lambda what, n: queue.put((what, n)))


def assemble(params: Params, dataset: str, per_seed: list[dict], seed_list: list[int], specs: dict, n_days: int,
             n_workers: int) -> dict[str, Any]:
    """The results from every seed's measurements: the records ``study_stats`` reads, the choices, and the
    tables (``study_stats.tables``)."""
    cfg = params.study
    first = per_seed[0]
    dates = first["window_days"]
    eval_ne = {(label, model, s["seed"]): v for s in per_seed for (label, model), v in s["eval_ne"].items()}
    train_ne = {(label, model, s["seed"]): v for s in per_seed for (label, model), v in s["train_ne"].items()}
    stage = {k: round(sum(s["seconds"][k] for s in per_seed), 1) for k in first["seconds"]}
    stage_cpu = {k: round(sum(s["cpu_seconds"][k] for s in per_seed), 1) for k in first["cpu_seconds"]}
    fallback = cfg.realtime_fallback_rate
    staleness = [s["frozen_staleness_days"] for s in per_seed if s["frozen_staleness_days"]]
    frozen_text = (f"{staleness[0][0]} to {staleness[0][1]} days (the last warm-up snapshot, {first['frozen_snapshot']})"
                   if cfg.warmup_days and staleness else
                   f"1 to {len(dates)} days (the window's first snapshot: no warm-up)")
    gated = any(r.get("gated") for s in per_seed for r in s["gate"])
    choices = {
        "frozen": frozen_text,
        "frozen_staleness_days": staleness[0] if staleness else None,
        "warmup_days": cfg.warmup_days,
        "warmup": f"the upstream trains {cfg.warmup_days} days before the window, {cfg.warmup_epochs} epoch(s) a day "
                  f"(window days: {params.train.epochs})",
        "offline_staleness_days": cfg.offline_staleness_days,
        "staleness": {"frozen": frozen_text, "offline": f"{cfg.offline_staleness_days}-day"},
        "realtime_fallback_rate": fallback,
        "realtime_fallback": f"an assumed {fallback:.0%} of realtime requests miss the latency budget and read the "
                             "cache (not measured)",
        "pool_units": list(POOL_UNITS),
        "serving_pool_unit": default_unit(params),
        "offline_same_under_both_units": all(s["offline_same_under_both_units"] for s in per_seed),
        "downstream_features": {name: describe(sp) for name, sp in specs.items()},
        "downstream_training": f"{params.downstream.epochs} epochs a day at batch {cfg.downstream_batch_size}, "
                               f"learning rate {params.downstream.learning_rate}, warm-started daily",
        "seeds": seed_list,
        "workers": n_workers,
        "world": {s["seed"]: s["world"]["world"] for s in per_seed},
        "gate": ("snapshots served only once sum_pipeline/study_gate.py blesses them" if gated else
                 "every snapshot served (no study gate)"),
        "replay": "in memory through sum_platform.embedding_row (bit-identical to the store replay: "
                  "tests/integration/test_study_replay.py)",
    }
    results: dict[str, Any] = {
        "dataset": dataset,
        "source": params.source.kind,
        "days": first["window_days"],
        "train_days": None, "eval_days": None,
        "seeds": seed_list,
        "upstream": {"preset": params.model.preset, "num_embeddings": params.model.num_embeddings,
                     "embedding_dim": params.model.embedding_dim,
                     "holdout_ne_mean": _mean([v for s in per_seed for v in s["upstream_ne"]])},
        "measurements": [r for s in per_seed for r in s["measurements"]],
        "fi_rank": [r for s in per_seed for r in s["fi_rank"]],
        "shift": [r for s in per_seed for r in s["shift"]],
        "norms": [r for s in per_seed for r in s["norms"]],
        "gate": [r for s in per_seed for r in s["gate"]],
        "consumer_gate": [r for s in per_seed for r in s.get("consumer_gate", [])],
        "choices": choices,
        "daily": [r for s in per_seed for r in s["daily"]],
        "importance": [r for s in per_seed for r in s["importance"]],
        "stage_seconds": stage,
        "stage_cpu_seconds": stage_cpu,
    }
    down_days = results["days"][1:]
    results["eval_days"], results["train_days"] = down_days[-cfg.eval_days:], down_days[:-cfg.eval_days]
    mode_stats: dict[str, list[dict]] = {}
    for s in per_seed:
        for label, st in s["mode_stats"].items():
            mode_stats.setdefault(label, []).append(st)
    fi = {(r["model"], r["seed"]): (r["rank"], r["n_features"]) for r in results["fi_rank"]}
    results.update(study_stats.tables(results))
    return results
