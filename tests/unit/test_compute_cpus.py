"""CPU priority and pinning of the SOAP compute threads (``serving.cpu``; no Ray)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving import cpu


@pytest.fixture
def four_cpus(monkeypatch):
    """A process allowed on CPUs 0-3 (the answer of ``sched_getaffinity`` for this process)."""
    real = os.sched_getaffinity
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3} if pid == 0 else real(pid))


def test_no_spec_means_no_pinning(four_cpus):
    assert cpu.compute_cpu_set(None) == set() and cpu.compute_cpu_set([]) == set()


def test_last_is_the_highest_numbered_allowed_cpu(four_cpus):
    assert cpu.compute_cpu_set("last") == {3}


def test_last_on_a_single_cpu_does_not_pin(monkeypatch):
    """With one CPU, pinning the compute there would put it on the read path's core anyway."""
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {5})
    assert cpu.compute_cpu_set("last") == set()


def test_a_list_keeps_only_allowed_cpus_and_warns(four_cpus, caplog):
    cpu.log.addHandler(caplog.handler)  # Ray may stop "ray.serve" from propagating to the root logger
    assert cpu.compute_cpu_set([1, "2"]) == {1, 2}
    assert not caplog.records
    assert cpu.compute_cpu_set([2, 10_000]) == {2}
    assert "10000" in caplog.text
    cpu.log.removeHandler(caplog.handler)


def test_worker_thread_lowers_its_own_priority_and_reports_it():
    """The initializer lowers the worker thread (SCHED_IDLE, a higher nice level, pinned), not the caller."""
    before = cpu.thread_priority(threading.get_native_id())
    nice = min(19, max(7, os.getpriority(os.PRIO_PROCESS, 0) + 1))
    allowed = sorted(os.sched_getaffinity(0))
    state = {"niceness": nice, "sched_idle": True, "cpus": [allowed[-1]], "threads": {}}
    with ThreadPoolExecutor(max_workers=1, initializer=cpu.background_thread, initargs=(state, "compute")) as pool:
        tid = pool.submit(threading.get_native_id).result()
        worker = cpu.thread_priority(tid)
    assert state["threads"] == {"compute": tid}
    assert worker["policy"] == "idle" and worker["niceness"] == nice and worker["cpus"] == [allowed[-1]], worker
    after = cpu.thread_priority(threading.get_native_id())
    assert after == before  # the caller (the replica's event loop) keeps its priority
