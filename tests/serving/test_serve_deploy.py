"""`serve deploy serve/config.yaml` on a real `ray start --head` with token auth; real HTTP calls get answers."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from conftest import free_port

from mlplatform.mlops.registry import ModelRegistry
from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.rl.agent import DQNAgent, DQNConfig

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_shipped_serve_config_deploys_and_answers(ray_head, tmp_path):
    store = f"sqlite:///{tmp_path}/m.db"
    agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(16, 16)))
    with ExperimentTracker("serving", tracking_uri=store) as tracker:
        tracker.log_checkpoint(agent.save(tmp_path / "cartpole.pt"))
    registry = ModelRegistry(store)
    registry.set_alias("cartpole", "champion", registry.register_model("cartpole", run_id=tracker.run_id).version)

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] = store
    app["args"].pop("emotion_model")  # the emotion deployment is covered in test_serving; keep this one light
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "EmotionModel"]
    deploy_file = tmp_path / "serve.yaml"
    deploy_file.write_text(yaml.safe_dump(config))

    deployed = subprocess.run([str(BIN / "serve"), "deploy", str(deploy_file), "--address", ray_head["RAY_API_SERVER_ADDRESS"]],
                              env=ray_head, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/policy/cartpole", method="POST",
                                     data=json.dumps({"observation": [0.0, 0.1, 0.0, -0.1]}).encode(),
                                     headers={"Content-Type": "application/json"})
    deadline, answer = time.time() + 120, None
    while answer is None:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            assert time.time() < deadline, "the Serve app did not come up"
            time.sleep(2)
    assert answer["model"] == "cartpole" and answer["version"] == "1" and answer["action"] in (0, 1)
    shutdown = subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", ray_head["RAY_API_SERVER_ADDRESS"]],
                              env=ray_head, capture_output=True, text=True, timeout=120)
    assert shutdown.returncode == 0, shutdown.stderr[-2000:]
