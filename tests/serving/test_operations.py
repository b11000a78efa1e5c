"""Serving in operation: Prometheus scrapes every replica's metrics, a promotion under load drops nothing, a killed replica returns."""

import json
import math
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray
from ray import serve

from mlplatform.mlops.registry import ModelRegistry
from mlplatform.serving.app import Ingress
from mlplatform.serving.deployments import EmotionModel
from mlplatform.services import ServiceState, free_port, start_prometheus
from test_serving import call, promote_broken_version, register_emotion, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray whose metrics port is known, serving two replicas of the emotion model."""
    tmp = tmp_path_factory.mktemp("operations")
    store = f"sqlite:///{tmp}/m.db"
    register_emotion(store, tmp / "e1" / "best", seed=1, alias="champion")
    register_emotion(store, tmp / "e2" / "best", seed=2)
    metrics_port, http_port = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    emotion = EmotionModel.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5},
                                   user_config={"poll_interval_s": 0.5}).bind("emotion", "champion", store)
    serve.run(Ingress.bind({"emotion": emotion}, {}), name="mlplatform", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{http_port}", "store": store, "metrics_port": metrics_port, "tmp": tmp}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    """Debian's Prometheus on loopback as the stack starts it (shipped scrape config and alert rules), aimed at this Ray."""
    state = ServiceState(home=str(tmp_path_factory.mktemp("prometheus")))
    try:
        yield start_prometheus(state, port=free_port(), targets=[f"127.0.0.1:{cluster['metrics_port']}"], timeout_s=60,
                               scrape_interval_s=1)
    finally:
        state.stop_all()


def query(prometheus_url: str, promql: str) -> list[dict]:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]
    except OSError:
        return []


def test_prometheus_sees_every_metric_from_every_replica(cluster, prometheus):
    for _ in range(20):
        assert call(f"{cluster['url']}/v1/emotion", {"text": ["嬉しい", "悲しい"]})[0] == 200
    assert call(f"{cluster['url']}/v1/emotion", {"text": ""})[0] == 422  # stopped by the ingress's schema
    handle = serve.get_deployment_handle("EmotionModel", app_name="mlplatform")
    # bad items that do reach the replicas (twenty calls miss one of two replicas with chance 2e-6)
    assert all("error" in r.result() for r in [handle.predict.remote([""]) for _ in range(20)])

    def latency_counted() -> bool:
        found = query(prometheus, 'sum(model_prediction_latency_seconds_count{model="emotion"})')
        return bool(found) and float(found[0]["value"][1]) > 0

    assert wait_for(latency_counted, timeout_s=90)
    for name in ("model_prediction_latency_seconds_count", "model_prediction_errors_total", "model_requests_total", "model_batch_size_count",
                 "model_queue_wait_seconds_count", "model_served_version"):
        def from_both_replicas() -> bool:  # each replica exports on its own few-second cycle
            return len({s["metric"]["WorkerId"] for s in query(prometheus, f'{name}{{deployment="EmotionModel"}}')}) == 2

        assert wait_for(from_both_replicas, timeout_s=60), name


def dashboard_queries() -> list[str]:
    """Every PromQL query of the shipped Grafana dashboard, its variables as Grafana fills them in (all models)."""
    dashboard = json.loads((REPO / "cluster" / "grafana" / "mlplatform.json").read_text())
    return [target["expr"].replace('"$model"', '".*"').replace("$__rate_interval", "5m")
            for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_dashboard_query_returns_data(cluster, prometheus):
    for _ in range(10):
        assert call(f"{cluster['url']}/v1/emotion", {"text": ["嬉しい", "悲しい"]})[0] == 200
    handle = serve.get_deployment_handle("EmotionModel", app_name="mlplatform")
    assert all("error" in r.result() for r in [handle.predict.remote([""]) for _ in range(10)])
    queries = dashboard_queries()
    assert len(queries) == 10 and all("$" not in q for q in queries)

    def answered(promql: str) -> bool:
        return any(math.isfinite(float(s["value"][1])) for s in query(prometheus, promql))

    for promql in queries:
        assert wait_for(lambda: answered(promql), timeout_s=60), promql
    # the dashboard's model picker lists the served model
    picker = urllib.parse.urlencode({"match[]": "model_requests_total"})
    with urllib.request.urlopen(f"{prometheus}/api/v1/label/model/values?{picker}", timeout=5) as response:
        assert json.loads(response.read())["data"] == ["emotion"]
    # the alert rules are loaded and evaluate without error on the live series
    def rules() -> list[dict]:
        with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=5) as response:
            return [r for group in json.loads(response.read())["data"]["groups"] for r in group["rules"]]

    assert {r["name"] for r in rules()} == {"ModelErrorRateHigh", "ModelLatencyP99High", "ModelReplicaMetricsMissing",
                                            "RayNodeMetricsDown"}
    assert wait_for(lambda: all(r["health"] == "ok" for r in rules()), timeout_s=30), rules()


def test_promotion_under_load_fails_no_request(cluster):
    failures, versions, stop = [], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = call(f"{cluster['url']}/v1/emotion", {"text": "明日が楽しみ"})
            (versions.append(body["version"]) if status == 200 else failures.append((status, body)))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    registry = ModelRegistry(cluster["store"])
    try:
        time.sleep(2)
        registry.set_alias("emotion", "champion", "2")
        assert wait_for(lambda: versions[-20:].count("2") == 20, timeout_s=60)
        # then a broken version: it is refused on every replica while version 2 keeps answering
        promote_broken_version(cluster["store"], cluster["tmp"])
        assert wait_for(lambda: call(f"{cluster['url']}/v1/models")[1]["models"][0]["last_rollout_error"] is not None)
        served_after_broken = len(versions)
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == [] and versions[0] == "1" and versions[-1] == "2"
    assert len(versions) > served_after_broken and set(versions[served_after_broken:]) == {"2"}


def test_a_killed_replica_comes_back(cluster):
    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "EmotionModel" in a["name"]}

    before = replicas()
    assert len(before) == 2
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"))
    assert wait_for(lambda: len(replicas()) == 2 and victim not in replicas(), timeout_s=120)
    assert wait_for(lambda: call(f"{cluster['url']}/v1/emotion", {"text": "嬉しい"})[0] == 200, timeout_s=60)
    assert all(call(f"{cluster['url']}/v1/emotion", {"text": "嬉しい"})[0] == 200 for _ in range(10))


def test_one_bad_item_fails_only_its_own_request_in_a_batch(cluster):
    handle = serve.get_deployment_handle("EmotionModel", app_name="mlplatform")
    requests = [["嬉しい", "悲しい"], ["怖い", ""], ["腹が立つ"]] * 4
    results = [response.result() for response in [handle.predict.remote(texts) for texts in requests]]
    for texts, result in zip(requests, results):
        if all(texts):
            assert len(result["predictions"]) == len(texts) and "error" not in result
        else:
            assert result == {"error": "text 1 is empty", "status": 422}

