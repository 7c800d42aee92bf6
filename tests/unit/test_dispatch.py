"""Fire-and-forget dispatch of the ingress (``serving.dispatch``): pure asyncio, no Ray."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Callable

from serving.dispatch import ComputeCoalescer, ComputeLauncher
from serving.metrics import DeferredMetrics

DEADLINE_S = 10.0  # a bound for a loaded machine, not a speed target: the tests wait for states, not for time


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yields to the loop until ``condition()`` holds; fails naming ``what`` after :data:`DEADLINE_S`."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S:.0f} s: {what}"
        await asyncio.sleep(0.005)


def test_dispatch_imports_no_ray():
    """The ingress's dispatch is testable (and importable) without Ray."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, serving.dispatch; print('ray' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"


def test_compute_launcher_bounds_inflight_calls_and_counts_drops():
    outcomes: list[str] = []

    async def scenario():
        launcher = ComputeLauncher(max_inflight=3, on_outcome=lambda outcome, n: outcomes.extend([outcome] * n))
        gates = [asyncio.get_running_loop().create_future() for _ in range(5)]
        fired = [launcher.fire(lambda g=g: g) for g in gates]
        assert [t is not None for t in fired] == [True, True, True, False, False]
        assert launcher.inflight == 3 and launcher.stats["dropped"] == 2
        gates[0].set_result({"status": "written"})
        gates[1].set_result({"status": "no_features"})
        gates[2].set_exception(RuntimeError("compute down"))
        await asyncio.gather(*[t for t in fired if t is not None])
        assert launcher.inflight == 0
        assert launcher.stats == {"scheduled": 3, "dropped": 2, "written": 1, "computed": 0, "skipped": 1, "failed": 1}
        last = launcher.fire(lambda: asyncio.sleep(0, {"status": "written"}))
        assert last is not None and (await last) == {"status": "written"}

    asyncio.run(scenario())
    assert sorted(outcomes) == ["failed", "skipped", "written", "written"]


def test_coalescer_sends_one_call_per_window_within_the_bound():
    sent: list[list[int]] = []

    async def scenario():
        gate = asyncio.Event()

        async def send(ids):
            sent.append(ids)
            await gate.wait()  # the compute answers when the test says so
            return [{"user_id": u, "status": "written"} for u in ids]

        launcher = ComputeLauncher(max_inflight=4)
        coalescer = ComputeCoalescer(launcher, send, window_s=0.01, max_users=3)
        fates = [coalescer.add(u) for u in (1, 2, 1, 3)]  # 3 distinct users fill the window: sent at once
        assert fates == ["scheduled"] * 4 and sent == [] and launcher.inflight == 3
        await asyncio.sleep(0)
        assert sent == [[1, 2, 3]]
        fates = [coalescer.add(u) for u in (4, 5)]  # one room left: 5 is dropped
        assert fates == ["scheduled", "dropped"]
        await until(lambda: len(sent) == 2, "the window elapsed and its call sent")
        assert sent == [[1, 2, 3], [4]] and launcher.inflight == 4
        gate.set()
        await until(lambda: launcher.inflight == 0, "every call answered")
        assert launcher.stats["scheduled"] == 5 and launcher.stats["dropped"] == 1 and launcher.stats["written"] == 4

    asyncio.run(scenario())


def test_deferred_metrics_record_off_the_response_path_and_lose_nothing():
    """Records queued from several threads are replayed on the loop, in order, once each."""
    class Metric:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def inc(self, *args, **kwargs) -> None:
            self.calls.append(("inc", args, tuple(sorted(kwargs.items()))))

        def observe(self, *args, **kwargs) -> None:
            self.calls.append(("observe", args, tuple(sorted(kwargs.items()))))

    class Metrics:
        requests, read_latency = Metric(), Metric()

    metrics = Metrics()
    deferred = DeferredMetrics(metrics, interval_s=0.02)

    async def main() -> None:
        deferred.start(asyncio.get_running_loop())
        deferred.requests.inc(tags={"code": "200"})
        deferred.read_latency.observe(0.001)
        assert metrics.requests.calls == [] and metrics.read_latency.calls == []  # nothing on the request path
        threads = [threading.Thread(target=lambda: [deferred.requests.inc(1) for _ in range(500)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await until(lambda: not deferred._queue, "the queue replayed on the loop")

    asyncio.run(main())
    assert metrics.requests.calls[0] == ("inc", (), (("tags", {"code": "200"}),))
    assert len(metrics.requests.calls) == 1 + 2000
    assert metrics.read_latency.calls == [("observe", (0.001,), ())]


def test_coalescer_takes_reads_from_other_threads_and_sends_each_user_once():
    """An in-process client reads on the caller's threads: adds from 4 threads (some users repeated) become calls
    on the loop holding every scheduled user exactly once, and the in-flight count returns to zero."""
    sent: list[list[int]] = []

    async def main() -> None:
        launcher = ComputeLauncher(max_inflight=10_000)

        async def send(ids: list[int]) -> list[dict]:
            sent.append(ids)
            return [{"user_id": u, "status": "written"} for u in ids]

        coalescer = ComputeCoalescer(launcher, send, window_s=0.01, max_users=64)
        coalescer.loop = asyncio.get_running_loop()
        fates: list[str] = []

        def reader(k: int) -> None:
            fates.extend(coalescer.add(u) for u in range(k * 100, k * 100 + 300))  # overlaps the next thread's

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await until(lambda: launcher.inflight == 0, "every scheduled user's call answered")  # reserved until then
        assert fates == ["scheduled"] * 1200 and launcher.stats["written"] == sum(len(ids) for ids in sent)

    asyncio.run(main())
    users = [u for ids in sent for u in ids]
    assert sorted(set(users)) == list(range(600))
    # A user repeated within one window is sent once; the same user may be sent again by a later window.
    assert all(len(ids) == len(set(ids)) and len(ids) <= 64 for ids in sent)
