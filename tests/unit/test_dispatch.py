"""Fire-and-forget dispatch of the ingress (``serving.dispatch``): pure asyncio, no Ray."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from serving.dispatch import ComputeCoalescer, ComputeLauncher


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
        await asyncio.sleep(0.05)  # the window elapses
        assert sent == [[1, 2, 3], [4]] and launcher.inflight == 4
        gate.set()
        await asyncio.sleep(0.01)
        assert launcher.inflight == 0
        assert launcher.stats["scheduled"] == 5 and launcher.stats["dropped"] == 1 and launcher.stats["written"] == 4

    asyncio.run(scenario())
