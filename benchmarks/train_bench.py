"""Training and inference benchmark of the SUM model presets (not a test; numbers depend on the machine).

Prints, for each preset: training examples/s, the achieved model FLOP/s (3 x the forward FLOPs counted by
``torch.utils.flop_counter`` per example, i.e. forward + backward), a fp32 matmul peak measured in the
same run with the same thread count, their ratio (model-FLOP utilisation, MFU), and the inference
throughput of the exported user tower (``user_tower.pt2``) called one user at a time vs in batches.

Run (one documented command; ``make bench`` does the same)::

    .venv/bin/python -m benchmarks.train_bench                 # compact + large, 1 thread
    .venv/bin/python -m benchmarks.train_bench --presets compact,large,paper --threads 2 --json reports/train_bench.json
    .venv/bin/python -m benchmarks.train_bench --smoke          # a few steps: runs to its end, measures nothing

The training data is one simulated day (the daily DAG's input), encoded once; batches are drawn from it
in a fixed order, so every preset trains on the same examples. With one thread every rate is measured in
the thread's CPU time (``time.thread_time``), matmul peak included, so a busy shared machine slows the
run down but does not distort the numbers; with several threads, wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.ne_days import day_split, with_users
from sum_models.spec import FeatureSpec
from sum_platform.config import load_params
from sum_platform.feature_store import spec_from_fields, user_feature_fields


def clock(threads: int):
    """The benchmark's clock: the calling thread's CPU time with one thread (robust to other tenants of a
    shared machine: time spent descheduled is not counted), wall time with several."""
    return time.thread_time if threads == 1 else time.perf_counter


def matmul_peak(threads: int, seconds: float = 2.0, sizes: tuple[int, ...] = (512, 1024, 2048)) -> dict[str, float]:
    """Best fp32 ``torch.mm`` FLOP/s over a few square sizes (the denominator of MFU), same clock."""
    import torch

    now = clock(threads)
    best: dict[str, float] = {"flops_per_second": 0.0, "size": 0}
    with _threads(threads):
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            for _ in range(2):
                torch.mm(a, b)
            reps, t0 = 0, now()
            while now() - t0 < seconds / 3:
                torch.mm(a, b)
                reps += 1
            rate = 2 * n**3 * reps / (now() - t0)
            if rate > best["flops_per_second"]:
                best = {"flops_per_second": rate, "size": n}
    return best


class _threads:
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


def _day(params):
    """One simulated day joined with its users (as the DAG's point-in-time join returns it) + its spec."""
    train, _, users = day_split(params.simulator.start_date, params)
    return train, users, spec_from_fields(user_feature_fields(params), params)


def bench_training(preset: str, params, train_df, spec, batch_size: int, steps: int, threads: int) -> dict[str, Any]:
    """Times ``steps`` optimizer steps (Adam, eq. 8 loss) after a warm-up; returns throughput and FLOPs."""
    import torch

    from sum_models.data import encode_examples
    from sum_models.flops import model_flops, parameter_counts
    from sum_models.loss import MultiTaskBCELoss
    from sum_models.model import build_model
    from sum_models.train import make_optimizer

    model = build_model(spec, {**params.model.model_dump(), "preset": preset}, seed=0)
    flops = model_flops(model, spec)
    users, ad_sparse, ad_dense, labels = encode_examples(train_df, spec)
    loss_fn = MultiTaskBCELoss(spec.labels, params.train.task_weights)
    optimizer = make_optimizer(model, params.train)
    n = len(users)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batches = []
    for b in range(min(math.ceil(n / batch_size), 16)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        if len(idx) == batch_size:
            batches.append((users.select(idx), ad_sparse[idx], ad_dense[idx], labels[idx]))
    model.train()

    def step(batch) -> None:
        u, s, d, y = batch
        loss = loss_fn(model(u.dense, u.sparse_ids, u.sparse_offsets, s, d), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    now = clock(threads)
    with _threads(threads):
        for i in range(3):
            step(batches[i % len(batches)])
        times, wall = [], []
        for i in range(steps):
            t0, w0 = now(), time.perf_counter()
            step(batches[i % len(batches)])
            times.append(now() - t0)
            wall.append(time.perf_counter() - w0)
    # The median step is robust to the other tenants of a shared machine.
    step_s = statistics.median(times)
    examples_per_second = batch_size / step_s
    train_flops_per_example = 3 * flops["model"]  # forward + backward (2x forward)
    return {
        "preset": preset,
        "batch_size": batch_size,
        "steps": steps,
        "median_step_ms": round(1000 * step_s, 2),
        "examples_per_second": round(examples_per_second),
        "wall_examples_per_second": round(batch_size / statistics.median(wall)),
        "user_tower_flops_per_user": flops["user_tower"],
        "model_flops_per_example": flops["model"],
        "achieved_flops_per_second": examples_per_second * train_flops_per_example,
        "parameters": {"user_tower": parameter_counts(model.user_tower), "model": parameter_counts(model)},
        "_model": model,
    }


def bench_inference(model, users_df, spec, threads: int, batch_size: int = 256, users: int = 1024) -> dict[str, Any]:
    """Users/s of the exported tower: one user per call vs ``batch_size`` users per call."""
    import torch

    from sum_models.data import encode_users
    from sum_models.inference import load_program
    from sum_models.snapshot import export_program

    with tempfile.TemporaryDirectory() as tmp:
        path = export_program(model.user_tower, Path(tmp) / "user_tower.pt2")
        program = load_program(path).module()
    frame = users_df.head(users).reset_index(drop=True)
    encoded = encode_users(frame, spec)
    singles = [encoded.select(torch.tensor([i])) for i in range(min(len(frame), 256))]
    batches = [encoded.select(torch.arange(lo, min(lo + batch_size, len(frame)))) for lo in range(0, len(frame), batch_size)]

    now = clock(threads)

    def run(chunks) -> float:
        with torch.inference_mode():
            for c in chunks[:2]:
                program(c.dense, c.sparse_ids, c.sparse_offsets)
            t0 = now()
            count = 0
            for c in chunks:
                out = program(c.dense, c.sparse_ids, c.sparse_offsets)
                count += out.shape[0]
            return count / (now() - t0)

    with _threads(threads):
        unbatched = run(singles)
        batched = run(batches)
    return {
        "unbatched_users_per_second": round(unbatched),
        "batched_users_per_second": round(batched),
        "batch_size": batch_size,
        "speedup": round(batched / unbatched, 1),
    }


def paper_scale_flops(preset: str = "paper", n_sparse: int = 600, n_dense: int = 1000, dense_tokens: int = 32) -> dict[str, Any]:
    """Inference FLOPs per user of a preset at the paper's feature counts (§6.1.3: ~600 sparse and ~1,000
    dense user features; 390M FLOPs for the production tower). Embedding tables are tiny (lookups cost no
    FLOPs); the dense features are projected to ``dense_tokens`` tokens, as ~1,000 tokens per layer would
    be unreasonable."""
    from sum_models.flops import parameter_counts, user_tower_flops
    from sum_models.user_tower import UserTower

    spec = FeatureSpec(user_dense=tuple(f"d{i}" for i in range(n_dense)), user_sparse={f"s{i}": 4 for i in range(n_sparse)})
    tower = UserTower(spec, {"preset": preset, "dense_tokens": dense_tokens})
    return {
        "preset": preset,
        "sparse_features": n_sparse,
        "dense_features": n_dense,
        "dense_tokens": dense_tokens,
        "flops_per_user": user_tower_flops(tower, batch_size=2),
        "dense_parameters": parameter_counts(tower)["dense"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="compact,large", help="comma-separated presets (sum_models.presets, or params.yaml model.presets)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the daily run uses 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.train.batch_size")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per preset")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-paper-scale", action="store_true", help="skip the FLOPs of the paper preset at 600+1000 features")
    parser.add_argument("--smoke", action="store_true",
                        help="a day of 150 users, compact only, 3 steps of 64 examples, a short matmul peak, 64 users inferred, the paper "
                             "preset at 6 + 10 features: proves the benchmark runs to its end (tests/integration/test_benchmarks_smoke.py), measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.steps, args.batch_size = "compact", 3, 64
    params = with_users(load_params(), 150) if args.smoke else load_params()
    batch_size = args.batch_size or params.train.batch_size
    train_df, users_df, spec = _day(params)
    peak = matmul_peak(args.threads, seconds=0.3, sizes=(256,)) if args.smoke else matmul_peak(args.threads)
    kind = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"fp32 matmul peak ({args.threads} thread(s), {peak['size']}^3, {kind}): {peak['flops_per_second'] / 1e9:.1f} GFLOP/s")
    results: dict[str, Any] = {"threads": args.threads, "matmul_peak_flops_per_second": peak["flops_per_second"], "presets": {}}
    header = (f"{'preset':<8} {'FLOPs/user':>11} {'params (dense)':>15} {'ex/s':>8} {'(wall)':>8} {'GFLOP/s':>8} {'MFU':>6}"
              f"   {'infer 1/call':>12} {'infer batch':>11} {'x':>6}")
    print(header)
    for preset in [p for p in args.presets.split(",") if p]:
        r = bench_training(preset, params, train_df, spec, batch_size, args.steps, args.threads)
        model = r.pop("_model")
        r["mfu"] = r["achieved_flops_per_second"] / peak["flops_per_second"]
        r["inference"] = (bench_inference(model, users_df, spec, args.threads, batch_size=16, users=64) if args.smoke
                          else bench_inference(model, users_df, spec, args.threads))
        results["presets"][preset] = r
        inf = r["inference"]
        print(
            f"{preset:<8} {r['user_tower_flops_per_user'] / 1e6:>10.2f}M {r['parameters']['user_tower']['dense'] / 1e6:>14.2f}M"
            f" {r['examples_per_second']:>8} {r['wall_examples_per_second']:>8} {r['achieved_flops_per_second'] / 1e9:>8.1f}"
            f" {100 * r['mfu']:>5.1f}%"
            f"   {inf['unbatched_users_per_second']:>10}/s {inf['batched_users_per_second']:>9}/s {inf['speedup']:>5.1f}x",
            flush=True,
        )
    if not args.no_paper_scale:
        scale = paper_scale_flops(n_sparse=6, n_dense=10) if args.smoke else paper_scale_flops()
        results["paper_scale"] = scale
        print(
            f"paper preset at the paper's scale ({scale['sparse_features']} sparse + {scale['dense_features']} dense features,"
            f" dense -> {scale['dense_tokens']} tokens): {scale['flops_per_user'] / 1e6:.0f}M FLOPs/user"
            f" ({scale['dense_parameters'] / 1e6:.0f}M dense parameters; paper: 390M FLOPs)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
