"""Fire-and-forget dispatch of compute calls from the ingress (paper §4: reads never wait for inference).

:class:`ComputeLauncher` bounds and counts the users in flight; :class:`ComputeCoalescer` turns the
async-mode reads of a short window into one ``compute_many`` call. Pure asyncio: no Ray import, so both
are unit-tested in-process (``tests/unit/test_dispatch.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from typing import Any, Awaitable, Callable

__all__ = ["ComputeCoalescer", "ComputeLauncher"]

log = logging.getLogger("ray.serve")


class ComputeLauncher:
    """Fire-and-forget compute calls, at most ``max_inflight`` users in flight; over the bound a call is
    dropped (and counted).

    Each call runs in a task with a fresh context, detached from the HTTP request that fired it: Ray
    Serve cancels the child calls of a request whose client goes away, and the write path must not
    depend on the reader. Outcomes are counted per user (``stats``), failures logged (rate-limited).

    Args:
        max_inflight: Bound on users in flight (reserved, or in a call not yet answered).
        on_outcome: Called with ``(outcome, users)`` for each finished call (``written``, ``skipped``,
            ``computed`` or ``failed``).
    """

    def __init__(self, max_inflight: int, on_outcome: Callable[[str, int], None] | None = None) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = int(max_inflight)
        self._inflight = 0
        #: Guards the counters: reads reserve from any thread (an in-process client), calls finish on the loop.
        self.lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._on_outcome = on_outcome
        self.stats = {"scheduled": 0, "dropped": 0, "written": 0, "computed": 0, "skipped": 0, "failed": 0}

    @property
    def inflight(self) -> int:
        """Users reserved or in calls not answered yet."""
        return self._inflight

    def try_reserve(self, users: int = 1) -> bool:
        """Reserves room for ``users``; False (and counted as dropped) when over the bound. Any thread."""
        with self.lock:
            return self.reserve_locked(users)

    def reserve_locked(self, users: int) -> bool:
        """:meth:`try_reserve` for a caller that holds :attr:`lock`."""
        if self._inflight + users > self.max_inflight:
            self.stats["dropped"] += users
            return False
        self._inflight += users
        self.stats["scheduled"] += users
        return True

    def start(self, make_call: Callable[[], Awaitable[Any]], reserved: int) -> "asyncio.Task":
        """Starts ``make_call()`` (call from the event loop) for ``reserved`` users reserved before."""
        task = asyncio.get_running_loop().create_task(self._run(make_call, reserved), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_all(self) -> set["asyncio.Task"]:
        """Cancels the calls in flight (call from the event loop); returns their tasks."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    def fire(self, make_call: Callable[[], Awaitable[Any]], users: int = 1) -> "asyncio.Task | None":
        """Reserves and starts a call without awaiting it.

        Returns:
            The task (realtime and frozen reads await it with a budget), or None if dropped.
        """
        return self.start(make_call, users) if self.try_reserve(users) else None

    async def _run(self, make_call: Callable[[], Awaitable[Any]], reserved: int) -> Any:
        try:
            result = await make_call()
        except Exception as exc:
            self._count("failed", reserved)
            n = self.stats["failed"]
            if n <= 10 or n % 1000 == 0:
                log.warning("async compute call failed (%d so far): %s: %s", n, type(exc).__name__, exc)
            return None
        finally:
            with self.lock:
                self._inflight -= reserved
        for item in result if isinstance(result, list) else [result]:
            status = item.get("status") if isinstance(item, dict) else None
            self._count(status if status in ("written", "computed") else "skipped", 1)
        return result

    def _count(self, outcome: str, users: int) -> None:
        with self.lock:
            self.stats[outcome] += users
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome, users)
            except Exception:  # metrics must never break the write path
                pass


class ComputeCoalescer:
    """Async-mode compute calls: the users read within ``window_s`` go to the compute deployment as one
    ``compute_many`` call (a repeated user once), so the ingress makes one handle call per window
    instead of one per read, after the responses have gone out.

    Args:
        launcher: Bounds and counts users in flight (a coalesced repeat counts as scheduled, no room).
        send: ``send(user_ids)`` -> awaitable per-user results.
        window_s: How long the first user of a window waits (0: the next event-loop iteration).
        max_users: A window holding this many users is sent at once (``serving.compute_coalesce_max_users``).
    """

    def __init__(
        self,
        launcher: ComputeLauncher,
        send: Callable[[list[int]], Awaitable[Any]],
        window_s: float,
        max_users: int,
    ) -> None:
        self._launcher, self._send = launcher, send
        self.window_s, self.max_users = float(window_s), int(max_users)
        self._pending: dict[int, None] = {}
        self._armed = False
        self._timer: asyncio.Handle | None = None
        #: The loop calls are sent from (set by the owner; default: the loop of the first ``add``).
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, user_id: int) -> str:
        """Schedules a user's recompute; ``scheduled`` or ``dropped`` (the in-flight bound). Any thread: off the
        loop, the window's timer is armed through ``call_soon_threadsafe``."""
        launcher = self._launcher
        with launcher.lock:
            if user_id in self._pending:
                launcher.stats["scheduled"] += 1
                return "scheduled"
            if not launcher.reserve_locked(1):
                return "dropped"
            self._pending[user_id] = None
            full = ids = None
            if len(self._pending) >= self.max_users:  # sent at once, however many threads keep adding
                full, ids = True, list(self._pending)
                self._pending.clear()
                self._armed = False
            arm = not full and not self._armed
            if arm:
                self._armed = True
        if full:
            self._on_loop(lambda: self._start(ids))
        elif arm:
            self._on_loop(self._arm)
        return "scheduled"

    def _on_loop(self, fn: Callable[[], None]) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self.loop is None:
            if running is None:
                raise RuntimeError("ComputeCoalescer.add off the event loop needs ComputeCoalescer.loop")
            self.loop = running
        if running is self.loop:
            fn()
        else:
            self.loop.call_soon_threadsafe(fn)

    def _arm(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.window_s, self.flush) if self.window_s > 0 else loop.call_soon(self.flush)

    def flush(self) -> None:
        """Sends the window's users now (on the loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._launcher.lock:
            ids = list(self._pending)
            self._pending.clear()
            self._armed = False
        self._start(ids)

    def _start(self, ids: list[int]) -> None:
        if ids:
            self._launcher.start(lambda: self._send(ids), reserved=len(ids))
