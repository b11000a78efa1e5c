"""`serve deploy serve/config.yaml` on a real `ray start --head` with token auth: answers, and user_config changes in place."""

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_serving import register_emotion

from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.mlops.registry import ModelRegistry
from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.rl.agent import DQNAgent, DQNConfig
from mlplatform.rl.policy import Policy
from mlplatform.serving.pyfunc import register_servable
from mlplatform.services import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_shipped_serve_config_deploys_and_answers(ray_head, tmp_path):
    store = f"sqlite:///{tmp_path}/m.db"
    registry = ModelRegistry(store)
    for seed in (1, 2):
        agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(16, 16), seed=seed))
        with ExperimentTracker("serving", tracking_uri=store) as tracker:
            tracker.log_checkpoint(agent.save(tmp_path / f"{seed}" / "cartpole.pt"))
        registry.set_alias("cartpole", "champion", register_servable(registry, "cartpole", run_id=tracker.run_id).version)
    register_emotion(store, tmp_path / "emotion" / "best", seed=1, alias="champion")

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] = store
    emotion = next(d for d in app["deployments"] if d["name"] == "Emotion-emotion")
    emotion["autoscaling_config"]["max_replicas"] = 1  # two CPUs on this head
    deploy_file = tmp_path / "serve.yaml"

    def deploy() -> None:
        deploy_file.write_text(yaml.safe_dump(config))
        deployed = subprocess.run([str(BIN / "serve"), "deploy", str(deploy_file), "--address", ray_head["RAY_API_SERVER_ADDRESS"]],
                                  env=ray_head, capture_output=True, text=True, timeout=120)
        assert deployed.returncode == 0, deployed.stderr[-2000:]

    def replicas() -> set[str]:
        listed = subprocess.run([str(BIN / "ray"), "list", "actors", "--format", "json", "--address", ray_head["RAY_API_SERVER_ADDRESS"],
                                 "--filter", "state=ALIVE"], env=ray_head, capture_output=True, text=True, timeout=120)
        return {a["actor_id"] for a in json.loads(listed.stdout) if "Policy-cartpole" in (a.get("class_name") or "")}

    def answer() -> dict | None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/policy/cartpole", method="POST",
                                         data=json.dumps({"observation": [0.0, 0.1, 0.0, -0.1]}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except OSError:  # refused, reset or timed out while the app is still coming up
            return None

    def wait_for_version(version: str) -> dict:
        deadline = time.time() + 120
        while (found := answer()) is None or found["version"] != version:
            assert time.time() < deadline, f"version {version} never answered (last: {found})"
            time.sleep(1)
        return found

    deploy()
    first = wait_for_version("2")
    q_values = Policy(tmp_path / "2" / "cartpole.pt").q_values([0.0, 0.1, 0.0, -0.1])
    assert first["model"] == "cartpole" and first["q_values"] == pytest.approx(q_values.tolist(), abs=1e-6)
    texts = ["明日の発表が不安で仕方ない", "久しぶりに家族と会えて嬉しかった"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/emotion", method="POST", data=json.dumps({"text": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        emotions = json.loads(response.read())
    local = EmotionPredictor(tmp_path / "emotion" / "best").predict(texts)
    assert emotions["version"] == "1" and [p["label"] for p in emotions["predictions"]] == [p.label for p in local]
    assert emotions["predictions"][0]["scores"] == pytest.approx(local[0].scores, abs=1e-5)
    serving = replicas()
    # pin version 1 through user_config: the running replica reconfigures in place, no restart
    policy = next(d for d in app["deployments"] if d["name"] == "Policy-cartpole")
    policy["user_config"] = {"ref": "1", "poll_interval_s": 1.0}
    deploy()
    wait_for_version("1")
    assert replicas() == serving and len(serving) == 1
    shutdown = subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", ray_head["RAY_API_SERVER_ADDRESS"]],
                              env=ray_head, capture_output=True, text=True, timeout=120)
    assert shutdown.returncode == 0, shutdown.stderr[-2000:]
