"""Prometheus metrics of SOAP, defined with Ray Serve's metrics API (``ray.serve.metrics``).

Ray Serve 2.60 documents custom application metrics through ``ray.serve.metrics.Counter`` / ``Gauge`` /
``Histogram``: each replica records them and Ray's per-node metrics agent exports them in Prometheus
format (names prefixed ``ray_``, tagged with ``application``, ``deployment`` and ``replica``), next to
Ray Serve's own ``ray_serve_*`` metrics. Export is periodic (every few seconds), so a scrape lags the
events a little.

Where to scrape: every node's Ray metrics endpoint (``ray.nodes()[i]["MetricsExportPort"]``; Ray's
Prometheus service discovery file lists them), or ``GET /metrics`` on the SOAP HTTP address, which
returns this node's ``ray_soap_*`` families (one URL on the serving port for a single-node setup).

================================================  =========  ===========================================
metric (as exported)                              type       meaning
================================================  =========  ===========================================
``ray_soap_read_latency_seconds``                 histogram  server-side latency of a read (tags
                                                             ``mode``, ``endpoint``: ``user``/``batch``)
``ray_soap_requests_total``                       counter    reads by ``mode``, ``endpoint``, ``code``
``ray_soap_embedding_age_seconds``                histogram  age of the embeddings answered (tag ``mode``)
``ray_soap_compute_calls_total``                  counter    compute calls fired by the ingress, by
                                                             ``outcome``: written/skipped/computed/failed
``ray_soap_compute_dropped_total``                counter    compute calls dropped at the in-flight bound
``ray_soap_realtime_fallbacks_total``             counter    realtime reads answered from the store, by
                                                             ``reason``: timeout/dropped/failed/skipped
``ray_soap_compute_latency_seconds``              histogram  compute batch latency (features, tower, pool,
                                                             write), tag ``tower``: production/frozen
``ray_soap_compute_batch_size``                   histogram  users per compute batch
``ray_soap_write_backs_total``                    counter    embeddings written back by compute
``ray_soap_snapshot_loaded``                      gauge      1 for the snapshot each compute replica runs
                                                             (tags ``role``, ``snapshot_id``)
================================================  =========  ===========================================
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Iterable

__all__ = ["ComputeMetrics", "DeferredMetrics", "IngressMetrics", "PREFIX", "filter_families", "parse_samples"]

#: Prefix of every SOAP metric family in Ray's Prometheus export.
PREFIX = "ray_soap_"

LATENCY_BOUNDS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
AGE_BOUNDS = [1, 10, 60, 300, 900, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400, 365 * 86400]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    """Metrics of the SOAP client (read path). Create inside a replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.read_latency = Histogram(
            "soap_read_latency_seconds",
            description="Server-side latency of SOAP reads.",
            boundaries=LATENCY_BOUNDS,
            tag_keys=("mode", "endpoint"),
        )
        self.requests = Counter(
            "soap_requests", description="SOAP reads by mode, endpoint and HTTP code.", tag_keys=("mode", "endpoint", "code")
        )
        self.age = Histogram(
            "soap_embedding_age_seconds",
            description="Age of the embeddings answered (now - written_at).",
            boundaries=AGE_BOUNDS,
            tag_keys=("mode",),
        )
        self.compute_calls = Counter(
            "soap_compute_calls", description="Compute calls fired by the ingress, by outcome.", tag_keys=("outcome",)
        )
        self.dropped = Counter(
            "soap_compute_dropped",
            description="Compute calls dropped because serving.max_inflight_compute calls were in flight.",
            tag_keys=("mode",),
        )
        self.fallbacks = Counter(
            "soap_realtime_fallbacks",
            description="Realtime reads answered from the store instead of the fresh compute.",
            tag_keys=("reason",),
        )


class DeferredMetrics:
    """Records of a metrics object (``inc`` / ``observe`` of its metrics) queued and replayed every ``interval_s``
    on an event loop: off the response path of a read (a Ray metric record is ~10 us of the loop's time, three a
    read). Export is periodic anyway (every few seconds), so scrapes see the same values a second later at most.
    Queuing is a list append, safe from any thread.

    Args:
        metrics: E.g. :class:`IngressMetrics`.
        interval_s: How often the queue is replayed.
    """

    def __init__(self, metrics: Any, interval_s: float = 1.0) -> None:
        self._metrics, self.interval_s = metrics, float(interval_s)
        self._queue: deque[tuple[Any, str, tuple, dict]] = deque()  # append / popleft: atomic across threads
        self._loop: Any = None

    def __getattr__(self, name: str) -> "_QueuedMetric":
        return _QueuedMetric(self._queue, getattr(self._metrics, name))

    def start(self, loop: Any) -> None:
        """Replays the queue every ``interval_s`` on ``loop`` (call once, from any thread)."""
        self._loop = loop
        loop.call_soon_threadsafe(loop.call_later, self.interval_s, self._tick)

    def _tick(self) -> None:
        try:
            self.flush()
        finally:
            self._loop.call_later(self.interval_s, self._tick)

    def flush(self) -> None:
        """Records what is queued now."""
        for _ in range(len(self._queue)):
            metric, method, args, kwargs = self._queue.popleft()
            try:
                getattr(metric, method)(*args, **kwargs)
            except Exception:  # metrics must never break serving
                pass


class _QueuedMetric:
    def __init__(self, queue: "deque", metric: Any) -> None:
        self._queue, self._metric = queue, metric

    def inc(self, *args: Any, **kwargs: Any) -> None:
        self._queue.append((self._metric, "inc", args, kwargs))

    def observe(self, *args: Any, **kwargs: Any) -> None:
        self._queue.append((self._metric, "observe", args, kwargs))


class ComputeMetrics:
    """Metrics of the compute deployment (write path). Create inside a replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.latency = Histogram(
            "soap_compute_latency_seconds",
            description="Latency of a compute batch: feature read, tower, pooling, write-back.",
            boundaries=LATENCY_BOUNDS,
            tag_keys=("tower",),
        )
        self.batch_size = Histogram(
            "soap_compute_batch_size", description="Users per compute batch.", boundaries=BATCH_BOUNDS, tag_keys=("tower",)
        )
        self.write_backs = Counter("soap_write_backs", description="Embeddings written back to the online store.")
        self.skipped = Counter(
            "soap_compute_skipped_users",
            description="Users a compute batch skipped (no_features, nonfinite_features, nonfinite_embedding); the "
                        "other users of the batch are computed.",
            tag_keys=("tower", "reason"),
        )
        self.loaded = Gauge(
            "soap_snapshot_loaded", description="1 for the snapshot a compute replica runs.", tag_keys=("role", "snapshot_id")
        )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def filter_families(text: str, prefix: str = PREFIX) -> str:
    """The lines of a Prometheus exposition that belong to families starting with ``prefix``."""
    keep = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split(" ", 3)[2]
        elif line.startswith("#") or not line.strip():
            continue
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith(prefix):
            keep.append(line)
    return "\n".join(keep) + ("\n" if keep else "")


def parse_samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every sample line of a Prometheus exposition."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        yield m.group(1), labels, value


def total(text: str, name: str, **match: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``match`` (0.0 if none)."""
    return sum(v for n, labels, v in parse_samples(text) if n == name and all(labels.get(k) == x for k, x in match.items()))
