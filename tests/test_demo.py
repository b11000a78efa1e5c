"""The README's quick start, run as written on reduced settings: `make demo`, a curl answer, a job from a fresh shell, `down`."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
import yaml

from mlplatform.emotion.labels import EMOTIONS
from mlplatform.mlops.registry import ModelRegistry
from mlplatform.mlops.tracking import job_runs
from mlplatform.services import free_port
from mlplatform.stack import StackConfig, StackState

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = {  # the default pipeline, cut to a couple of minutes; the services and models are the defaults
    "apex": {"total_steps": 2000, "learning_starts": 500, "eval_every": 1500, "stop_at_return": None},
    "tune": {"epochs": 2, "corpus": str(REPO / "tests/emotion/data/forty-writers"), "teacher": "none", "cpus_per_worker": 1},
    "tune_samples": 2, "tune_grace_period": 1,
    "federated": {"rounds": 2, "corpus": str(REPO / "tests/emotion/data/forty-writers")},
}
PORTS = ("ray_port", "dashboard_port", "client_port", "metrics_port", "mlflow_port", "prometheus_port", "serve_port")
"""Each on a free port, not the default: the test must not take, or meet, a user's stack or another test's Ray."""


def on_ports(block: str, ports: dict[str, int]) -> str:
    """A README block with the default dashboard and Serve addresses moved to this run's ports."""
    return block.replace("127.0.0.1:8265", f"127.0.0.1:{ports['dashboard_port']}").replace(
        "127.0.0.1:8000", f"127.0.0.1:{ports['serve_port']}")


def quick_start_blocks() -> list[str]:
    """The bash blocks of the README's quick-start section, in order."""
    section = re.search(r"^## Quick start\n(.*?)^## ", (REPO / "README.md").read_text(), re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    return re.findall(r"```bash\n(.*?)```", section.group(1), re.S)


def fresh_shell(script: str, home: Path) -> subprocess.CompletedProcess:
    """A new login's shell: nothing exported but HOME and the system PATH, in the repository root."""
    return subprocess.run(["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", "bash", "-e", "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def prometheus_query(url: str, promql: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as response:
        return json.loads(response.read())["data"]["result"]


def prometheus_models(url: str) -> set[tuple[str, str]]:
    """(model, deployment) of every deployment that counted requests."""
    found = prometheus_query(url, "sum by (model, deployment) (model_requests_total)")
    return {(r["metric"]["model"], r["metric"]["deployment"]) for r in found if float(r["value"][1]) > 0}


@pytest.fixture
def user_home(tmp_path):
    """A user with no Ray token yet and an MLflow store of their own; whatever the test leaves up is stopped."""
    home = tmp_path / "home"
    home.mkdir()
    yield home
    subprocess.run([str(BIN / "mlplatform"), "down"], cwd=REPO, capture_output=True, timeout=300)


def test_the_readme_quick_start_gets_from_make_demo_to_answers(user_home, tmp_path, monkeypatch):
    ports = {name: free_port() for name in PORTS}
    demo, curl, submit, stop = (on_ports(block, ports) for block in quick_start_blocks())
    assert demo.strip() == "make demo" and stop.strip() == ".venv/bin/mlplatform down"
    assert f"127.0.0.1:{ports['serve_port']}" in curl and f"127.0.0.1:{ports['dashboard_port']}" in submit
    quick = tmp_path / "quick.yaml"
    quick.write_text(yaml.safe_dump(QUICK | ports))
    store = f"sqlite:///{tmp_path}/mlruns.db"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env |= {"HOME": str(user_home), "MLFLOW_TRACKING_URI": store, "HF_HUB_OFFLINE": "1"}

    made = subprocess.run(["make", "demo", f"DEMO_CONFIG={quick}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert (user_home / ".ray" / "auth_token").is_file()  # token authentication is on, with a token Ray generated
    state = StackState.load(REPO / StackConfig().home)
    assert {p.name for p in state.processes} == {"prometheus", "mlflow", "ray"}
    assert all(url.startswith("http://127.0.0.1:") for url in state.urls.values())

    # every job the demo ran SUCCEEDED, and each registered its model with @champion
    listed = fresh_shell("export RAY_AUTH_MODE=token; .venv/bin/ray list jobs --format json --address "
                         f"http://127.0.0.1:{ports['dashboard_port']}",
                         user_home)
    assert listed.returncode == 0, listed.stderr[-2000:]
    jobs = json.loads(listed.stdout)
    assert len(jobs) >= 4 and {job["status"] for job in jobs} == {"SUCCEEDED"}
    registry = ModelRegistry(store)
    for name in ("cartpole", "emotion", "emotion-dp"):
        champion = registry.get_model_version(name, "champion")
        assert champion.run_id in job_runs(state.jobs[name]["submission_id"], store)
    # the base model read public writers only, and the DP model states its guarantee for the private ones
    public = json.loads((REPO / "tests/emotion/data/forty-writers/writer_groups.json").read_text())["public"]
    assert registry.get_model_version("emotion", "champion").tags["provenance.writers"] == ",".join(sorted(public))
    private_model = registry.get_model_version("emotion-dp", "champion").tags
    assert private_model["dp.guarantee"].endswith("-DP for each private writer") and "dp.not_covered" in private_model
    audited = re.search(r"emotion-dp: privacy audit .*: ε ≥ ([\d.]+) measured .*, ([\d.]+) accounted", made.stdout)
    assert audited and float(audited.group(1)) <= float(audited.group(2)), made.stdout[-3000:]
    assert re.search(r"emotion-dp +v1 @champion +test/macro_f1 [\d.]+, test/start_macro_f1 [\d.]+, test_private/macro_f1", made.stdout)

    # the README's curl answers from the DP fine-tuned model, and every endpoint answers
    answered = fresh_shell(curl, user_home)
    assert answered.returncode == 0, answered.stderr
    answer = json.loads(answered.stdout)
    assert answer["model"] == "emotion-dp" and len(answer["predictions"][0]["scores"]) == 8
    # MLflow's own loader answers the same from the registered version, through the stack's tracking server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", state.env["MLFLOW_TRACKING_URI"])
    text = json.loads(re.search(r"-d '(\{.*?\})'", curl).group(1))["text"]
    loaded = mlflow.pyfunc.load_model("models:/emotion-dp@champion").predict(pd.DataFrame({"text": [text]})).iloc[0]
    assert loaded["label"] == answer["predictions"][0]["label"]
    assert {e: loaded[e] for e in EMOTIONS} == pytest.approx(answer["predictions"][0]["scores"], abs=1e-5)
    for path, body, model in [("/v1/emotion/emotion", {"text": ["嬉しい", "怖い"]}, "emotion"),
                              ("/v1/emotion", {"text": "嬉しい"}, "emotion-dp"),
                              ("/v1/policy/cartpole", {"observation": [0.0, 0.1, 0.0, -0.1]}, "cartpole")]:
        request = urllib.request.Request(f"http://127.0.0.1:{ports['serve_port']}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["model"] == model
    deadline = time.time() + 90  # Prometheus scrapes the head every 5 s; Ray exports every few seconds
    wanted = {("cartpole", "Policy-cartpole"), ("emotion", "Emotion-emotion"), ("emotion-dp", "Emotion-emotion-dp")}
    while (seen := prometheus_models(state.urls["prometheus"])) != wanted:  # labelled by the deployments' own names
        assert time.time() < deadline, f"Prometheus saw requests for {seen} only"
        time.sleep(3)
    assert prometheus_query(state.urls["prometheus"], "model_requests") == []  # each counter once, not also as a gauge
    # the Ray dashboard draws its time-series from the stack's Prometheus (the head has RAY_PROMETHEUS_HOST)
    token = (user_home / ".ray" / "auth_token").read_text().strip()
    health = urllib.request.Request(f"{state.urls['dashboard']}/api/prometheus_health",
                                    headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(health, timeout=30) as response:
        assert json.loads(response.read())["msg"] == "prometheus running"

    # a job from a fresh shell, as the README says, runs on the stack and logs to its store
    submitted = fresh_shell(submit, user_home)
    assert submitted.returncode == 0 and "succeeded" in submitted.stdout, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    submission_id = re.search(r"raysubmit_\w+", submitted.stdout).group(0)
    assert len(job_runs(submission_id, store)) == 1

    again = subprocess.run([str(BIN / "mlplatform"), "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already up" in again.stderr and "Traceback" not in again.stderr

    stopped = fresh_shell(stop, user_home)
    assert stopped.returncode == 0 and "stopped ray, mlflow, prometheus" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not any(p.alive() for p in state.processes) and StackState.load(REPO / StackConfig().home) is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports['serve_port']}/healthz", timeout=5)
