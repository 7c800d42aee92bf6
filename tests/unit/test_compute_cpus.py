"""Which CPUs the SOAP compute threads are pinned to (``serving.compute_cpus``)."""


def test_compute_cpu_set_spec():
    """serving.compute_cpus: null/[] no pinning, "last" the highest allowed CPU, a list filtered to allowed."""
    import os

    from serving.app import _compute_cpu_set

    allowed = os.sched_getaffinity(0)
    assert _compute_cpu_set(None) == set() and _compute_cpu_set([]) == set()
    assert _compute_cpu_set("last") == ({max(allowed)} if len(allowed) >= 2 else set())
    assert _compute_cpu_set([min(allowed), 10_000]) == {min(allowed)}
