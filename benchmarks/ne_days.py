"""NE of the SUM model over consecutive days of the configured source vs a logistic-regression baseline (not a test).

Each day the model warm-starts from the previous day's weights (``tasks.warm_start``), trains on the
day's impressions (minus the hash-based holdout, as the daily DAG does) and is scored with NE (eq. 9) on
the day's holdout and on the next day's holdout; the embedding shift against the previous day's model is
measured on a fixed probe set of users (mean cosine and relative L2 change, as the gate does). The logistic regression sees the
same raw features and is warm-started the same way.

The point-in-time join is done in pandas (the day's user snapshot, as Feast's join returns for the
simulator and MovieLens, whose users partitions hold every user known that day), so no workspace is needed.
The source is the params' (``source.kind``; ``profile: movielens`` for MovieLens); its days are its first ones.

Run::

    .venv/bin/python -m benchmarks.ne_days --days 5 --presets compact
    .venv/bin/python -m benchmarks.ne_days --smoke      # a small day pair, one epoch: runs to its end, measures nothing
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import pandas as pd

from sum_models.shift import shift_metrics
from sum_pipeline.tasks import holdout_mask, warm_start
from sum_platform.config import load_params
from sum_platform.feature_store import spec_from_fields, user_feature_fields
from sum_platform.sources import day_frames, joined_day, source_dates


def with_users(params, users: int):
    """``params`` with a simulator of ``users`` initial users (the smoke runs' small days)."""
    simulator = params.simulator.model_copy(update={"initial_users": users, "new_users_per_day": max(users // 15, 1)})
    return params.model_copy(update={"simulator": simulator})


def day_split(ds: str, params) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A day of the params' source joined as the DAG joins it: ``(train, holdout, users)`` (the hash holdout)."""
    events, users = day_frames(ds, params)
    joined = joined_day(events, users, params).sort_values("impression_id").reset_index(drop=True)
    holdout = holdout_mask(joined, params.events.holdout_fraction)
    return joined[~holdout].reset_index(drop=True), joined[holdout].reset_index(drop=True), users


def run(days: int, presets: list[str], with_lr: bool = True, train_overrides: dict | None = None,
        users: int | None = None) -> list[dict[str, Any]]:
    """Runs the daily loop for every preset (and the LR baseline); returns one row per (model, day).

    ``users``: the simulator's initial users (default: the params'; the smoke run's few make small days).
    """
    import torch

    from sum_models.baselines import LogisticRegression
    from sum_models.model import build_model
    from sum_models.snapshot import embed_users
    from sum_models.train import ne_accumulator, train_model

    def evaluate_ne(model, frame, spec) -> dict[str, float]:  # tasks without both classes left out
        return ne_accumulator(model, frame, spec).compute_defined()[0]

    params = load_params()
    if users is not None:
        params = with_users(params, users)
    spec = spec_from_fields(user_feature_fields(params), params)
    start = pd.Timestamp(params.simulator.start_date)
    dates = source_dates(params) or [(start + pd.Timedelta(days=i)).date().isoformat() for i in range(days + 1)]
    dates = [ds for ds in dates if len(day_frames(ds, params)[0]) >= params.validation.min_event_rows][:days + 1]
    data = {ds: day_split(ds, params) for ds in dates}
    probe = data[dates[0]][2].sort_values("user_id").head(params.gate.probe_users)
    train_cfg = {**params.train.model_dump(), **(train_overrides or {})}
    rows: list[dict[str, Any]] = []
    names = list(presets) + (["logistic_regression"] if with_lr else [])
    for name in names:
        prev_state, prev_emb = None, None
        for i, ds in enumerate(dates[:-1]):
            train, holdout, _ = data[ds]
            if name == "logistic_regression":
                model = LogisticRegression(spec)
                cfg = {**train_cfg, "learning_rate": 0.01}  # its best of {0.002, 0.01, 0.02, 0.05}
            else:
                model = build_model(spec, {**params.model.model_dump(), "preset": name}, seed=params.seed)
                cfg = train_cfg
            if prev_state is not None:
                warm_start(model, prev_state)
            t0 = time.perf_counter()
            stats = train_model(model, train, spec, cfg, seed=params.seed, progress=False)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "model": name,
                "ds": ds,
                "train_rows": len(train),
                "train_seconds": round(seconds, 2),
                "examples_per_second": round(stats.examples_per_second),
                "holdout_ne": {k: round(v, 4) for k, v in evaluate_ne(model, holdout, spec).items()},
                "next_day_ne": {k: round(v, 4) for k, v in evaluate_ne(model, data[dates[i + 1]][1], spec).items()},
            }
            if name != "logistic_regression":
                with torch.no_grad():
                    emb = embed_users(model.user_tower, probe, spec)
                if prev_emb is not None:
                    shift = shift_metrics(emb, prev_emb)
                    row["shift_mean_cosine"] = [round(m["mean_cosine"], 3) for m in shift]
                    row["shift_relative_l2"] = [round(m["relative_l2_change"], 3) for m in shift]
                prev_emb = emb
            prev_state = model.state_dict()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _summary(rows: list[dict[str, Any]]) -> None:
    print("\nmodel                 day         click NE (holdout / next day)   conversion NE   train s   shift cos")
    for r in rows:
        cos = r.get("shift_mean_cosine", "")
        print(
            f"{r['model']:<21} {r['ds']}  {r['holdout_ne'].get('click', np.nan):.4f} / {r['next_day_ne'].get('click', np.nan):.4f}"
            f"              {r['holdout_ne'].get('conversion', np.nan):.4f}          {r['train_seconds']:>6.1f}   {cos}"
        )
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        print(f"{name:<21} mean next-day click NE {np.nanmean([r['next_day_ne'].get('click', np.nan) for r in mine]):.4f}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--presets", default="compact", help="comma-separated model presets")
    parser.add_argument("--no-lr", action="store_true", help="skip the logistic-regression baseline")
    parser.add_argument("--train", default="{}", help="JSON overrides of params.train")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="one day pair of a 150-user simulator, compact, one epoch: proves the benchmark runs to "
                             "its end (tests/integration/test_benchmarks_smoke.py), measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.days, args.presets, args.train = 1, "compact", json.dumps({**json.loads(args.train), "epochs": 1})
    rows = run(args.days, [p for p in args.presets.split(",") if p], not args.no_lr, json.loads(args.train),
               users=150 if args.smoke else None)
    _summary(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
