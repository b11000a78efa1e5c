"""`mlplatform train federated` and its job entrypoint, run as real subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(args, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_job_entrypoint_runs_its_config_and_logs_to_mlflow(tmp_path):
    result = run([sys.executable, str(REPO / "jobs/train_federated.py"), "--config", str(REPO / "jobs/configs/federated_tiny.yaml"),
                  "--rounds", "3", "--set", f"output_dir={tmp_path}/model", "--no-progress"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 rounds in" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout
    summary = json.loads((tmp_path / "model" / "federated.json").read_text())
    assert summary["rounds"] == 3 and summary["config"]["partition"] == "dirichlet"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "dp=true"], "error: config: dp needs noise_multiplier or target_epsilon"),
        (["--set", "partition=random"], "error: partition: Input should be 'iid', 'dirichlet' or 'writer'"),
        (["--set", "num_clients=5000"], "error: partition: 3794 examples cannot fill 5000 client slots"),
        (["--set", "strategy=fedprox", "--set", "proximal_mu=1"], "error: config: fedprox with sgd diverges"),
        (["--set", "task=emotion", "--set", "tokenizer=/no/such/tokenizer"], "error: no tokenizer at '/no/such/tokenizer'"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message, tmp_path):
    result = run([sys.executable, "-m", "mlplatform.cli", "train", "federated", "--no-track", *args], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(message), result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
