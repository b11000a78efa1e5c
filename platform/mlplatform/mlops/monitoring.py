"""Serving metrics through Ray's metrics (Prometheus): latency, errors, requests, batch size, queue wait, model version.

Ray exports each metric on every node's metrics port under a ``ray_`` prefix (so
``model_prediction_latency_seconds`` is scraped as ``ray_model_prediction_latency_seconds``);
``cluster/prometheus.yml`` strips that prefix for the ``model_`` family, so dashboards and
queries use the names below. Counters end in ``_total`` in Prometheus, as counters must.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

from ray.util import metrics

__all__ = ["LATENCY_BOUNDARIES_S", "ModelMonitoring"]

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
"""Histogram buckets in seconds, from a cached answer (1 ms) to a cold model load (5 s)."""
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]

_TAGS = ("model", "deployment")
VERSION_REFRESH_S = 1.0
"""Ray (2.60) stops exporting a gauge some 20-30 s after its last ``set`` (measured with 1-s and 10-s export
intervals), so the served version, which dashboards and alerts must see while the replica lives, is set again this
often."""


class ModelMonitoring:
    """The metrics of one deployment replica serving one model; create it inside the replica.

    Args:
        model: registered model name, e.g. ``emotion``.
        deployment: the Serve deployment's name as deployed (e.g. ``Emotion-emotion``), which Serve's own metrics carry too.
    """

    def __init__(self, model: str, deployment: str) -> None:
        self.tags = {"model": model, "deployment": deployment}
        self.latency = metrics.Histogram(
            "model_prediction_latency_seconds", description="Time to answer one prediction request, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=_TAGS)
        self.errors = metrics.Counter(
            "model_prediction_errors", description="Prediction requests that failed, by reason.", tag_keys=(*_TAGS, "reason"))
        self.requests = metrics.Counter(
            "model_requests", description="Prediction requests received.", tag_keys=_TAGS)
        self.batch_size = metrics.Histogram(
            "model_batch_size", description="Items per model call (after @serve.batch).",
            boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=_TAGS)
        self.queue_wait = metrics.Histogram(
            "model_queue_wait_seconds", description="Time an item waited for its batch to start, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=_TAGS)
        self.version = metrics.Gauge(
            "model_served_version", description="Registered version this replica is serving.", tag_keys=_TAGS)
        for metric in (self.latency, self.errors, self.requests, self.batch_size, self.queue_wait, self.version):
            metric.set_default_tags(self.tags)
        self._served_version: float | None = None
        self._refresher: threading.Thread | None = None

    @contextlib.contextmanager
    def track_request(self) -> Iterator[None]:
        """Count a request and time it; an exception escaping the block is counted as an error, then re-raised."""
        self.requests.inc()
        started = time.perf_counter()
        try:
            yield
        except Exception as e:
            self.errors.inc(tags={"reason": type(e).__name__})
            raise
        finally:
            self.latency.observe(time.perf_counter() - started)

    def record_error(self, reason: str) -> None:
        """Count a failed request that did not raise (e.g. one bad item answered with a 4xx)."""
        self.errors.inc(tags={"reason": reason})

    def record_batch(self, queue_waits_s: Sequence[float]) -> None:
        """One model call: its size and how long each item waited for it."""
        self.batch_size.observe(len(queue_waits_s))
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)

    def set_version(self, version: str | int) -> None:
        """The registered version now answering requests; exported until the replica ends (see ``VERSION_REFRESH_S``)."""
        self._served_version = float(version)
        self.version.set(self._served_version)
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._keep_version_exported, name="served-version-gauge", daemon=True)
            self._refresher.start()

    def _keep_version_exported(self) -> None:
        while True:
            time.sleep(VERSION_REFRESH_S)
            self.version.set(self._served_version)
