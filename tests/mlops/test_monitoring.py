"""ModelMonitoring's metrics reach Ray's Prometheus endpoint with the documented names, types and labels."""

import socket
import time
import urllib.request

import pytest
import ray

from mlplatform.mlops.monitoring import ModelMonitoring


@ray.remote
class Replica:
    """Stands in for a Serve replica: metrics are recorded in a Ray worker, as they are in production."""

    def __init__(self) -> None:
        self.monitoring = ModelMonitoring("emotion", "EmotionModel")
        self.monitoring.set_version(3)

    def serve(self, fail: bool) -> None:
        try:
            with self.monitoring.track_request():
                self.monitoring.record_batch([0.001, 0.002, 0.004])
                if fail:
                    raise ValueError("bad item")
        except ValueError:
            pass


@pytest.fixture(scope="module")
def metrics_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    yield port
    ray.shutdown()


def scrape(port: int, wanted: str, timeout_s: float = 60.0) -> str:
    deadline = time.time() + timeout_s
    while True:  # Ray exports on an interval of a few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        if wanted in text or time.time() > deadline:
            return text
        time.sleep(1)


def test_every_metric_is_exported_with_its_labels(metrics_port):
    replica = Replica.remote()
    ray.get([replica.serve.remote(fail=False), replica.serve.remote(fail=True)])
    text = scrape(metrics_port, 'reason="ValueError"')
    samples = {line.split("{")[0]: line for line in text.splitlines() if line.startswith("ray_model_")}
    assert "# TYPE ray_model_prediction_latency_seconds histogram" in text
    assert "# TYPE ray_model_prediction_errors_total counter" in text  # a real counter, not a gauge
    for name in ("ray_model_prediction_latency_seconds_count", "ray_model_prediction_errors_total", "ray_model_requests_total",
                 "ray_model_batch_size_count", "ray_model_queue_wait_seconds_count", "ray_model_served_version"):
        assert name in samples, name
        assert 'model="emotion"' in samples[name] and 'deployment="EmotionModel"' in samples[name]
    assert samples["ray_model_requests_total"].endswith(" 2.0")
    assert samples["ray_model_prediction_latency_seconds_count"].endswith(" 2.0")
    assert samples["ray_model_served_version"].endswith(" 3.0")
    assert 'reason="ValueError"' in samples["ray_model_prediction_errors_total"]


def test_the_served_version_stays_exported_while_the_replica_lives(metrics_port):
    replica = Replica.remote()
    ray.get(replica.serve.remote(fail=False))
    first = scrape(metrics_port, "ray_model_served_version{")
    assert "ray_model_served_version{" in first
    # Ray stops exporting a gauge some 20-30 s after its last set; the replica keeps setting it
    for _ in range(8):
        time.sleep(5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "ray_model_served_version{" in text
