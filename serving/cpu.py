"""CPU priority and pinning of the compute replica's worker threads (``serving.compute_*``).

The read path must never wait for the model on a shared CPU (paper §4). Linux priorities and affinities
are per thread, so each worker thread of :class:`serving.compute.ComputeCenter` lowers and pins itself
(:func:`background_thread`, a ``ThreadPoolExecutor`` initializer); the replica's event loop thread keeps
the replica's priority. Standard library only: importable and testable without Ray.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["background_thread", "compute_cpu_set", "thread_priority"]

log = logging.getLogger("ray.serve")


def background_thread(cpu: dict, role: str) -> None:
    """``ThreadPoolExecutor`` initializer of the compute replica's worker threads: lowers the calling
    thread's CPU priority (``cpu["niceness"]``, and ``SCHED_IDLE`` when ``cpu["sched_idle"]``: the thread
    runs only on CPU time no normal thread wants) and records its native id under ``role``."""
    tid = threading.get_native_id()
    cpu["threads"][role] = tid
    cpus = compute_cpu_set(cpu.get("cpus"))
    if cpus:  # keeps the tower's working set off the other cores' caches (who=0: this thread)
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            log.warning("could not pin the %s thread to CPUs %s: %s", role, sorted(cpus), exc)
    try:
        if cpu["niceness"] > os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, cpu["niceness"])  # who=0: this thread on Linux
        if cpu["sched_idle"] and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a platform without per-thread priorities: compute still runs, just not lower
        log.warning("could not lower the %s thread's CPU priority: %s", role, exc)


def compute_cpu_set(spec: Any) -> set[int]:
    """The CPUs ``serving.compute_cpus`` names, among those this process may use: ``None`` or ``[]``: no
    pinning; ``"last"``: the highest-numbered allowed CPU (when there are at least two); a list of ids."""
    if not spec or not hasattr(os, "sched_getaffinity"):
        return set()
    allowed = os.sched_getaffinity(0)
    if spec == "last":
        return {max(allowed)} if len(allowed) >= 2 else set()
    wanted = {int(c) for c in spec}
    if not wanted <= allowed:
        log.warning("serving.compute_cpus %s not all allowed (allowed: %s); using the allowed ones",
                    sorted(wanted), sorted(allowed))
    return wanted & allowed


def thread_priority(tid: int) -> dict:
    """A thread's scheduling policy and nice level, as the kernel reports them."""
    names = {getattr(os, n): n.removeprefix("SCHED_").lower() for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE")
             if hasattr(os, n)}
    try:
        policy = names.get(os.sched_getscheduler(tid), "other")
        nice = int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except (OSError, ValueError, IndexError):
        return {"tid": tid}
    cpus = sorted(os.sched_getaffinity(tid)) if hasattr(os, "sched_getaffinity") else None
    return {"tid": tid, "policy": policy, "niceness": nice, "cpus": cpus}
