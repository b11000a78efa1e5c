"""Ape-X as users run it: `ray job submit` to a real head, and a driver stopped and resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[3]
RAY = str(Path(sys.executable).parent / "ray")


def test_ray_job_submit_solves_cartpole_and_logs_to_mlflow(ray_head, tmp_path):
    db = tmp_path / "mlruns.db"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLPLATFORM_GIT_COMMIT": "test-commit"}}
    submission = f"apex-test-{int(time.time())}"
    submit = subprocess.run(
        [RAY, "job", "submit", "--working-dir", ".", "--submission-id", submission,
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/train_dqn.py", "--config", "jobs/configs/apex_cartpole.yaml",
         "--set", f"checkpoint_dir={tmp_path / 'ckpt'}", "--no-progress"],
        cwd=REPO, env=ray_head, capture_output=True, text=True, timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    ask = "import os, sys; from ray.job_submission import JobSubmissionClient as C; " \
          "print(C(os.environ['RAY_API_SERVER_ADDRESS']).get_job_status(sys.argv[1]).value)"
    status = subprocess.run([sys.executable, "-c", ask, submission], env=ray_head, capture_output=True, text=True)
    assert status.stdout.strip() == "SUCCEEDED", status.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("apex").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/mean_return"] >= 475
    assert run.data.tags["mlflow.source.git.commit"] == "test-commit"
    assert (tmp_path / "ckpt" / "latest.pt").is_file()


def test_ray_job_submit_refuses_a_wrong_token(ray_head):
    wrong = {**ray_head, "RAY_AUTH_TOKEN": "not-the-token"}
    result = subprocess.run([RAY, "job", "list"], env=wrong, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "token" in (result.stdout + result.stderr).lower()


def start_driver(tmp_path, *extra):
    env = {**os.environ, "RAY_ADDRESS": "local", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    return subprocess.Popen(
        [sys.executable, "-m", "mlplatform.cli", "train", "apex", "--no-progress",
         "--set", f"checkpoint_dir={tmp_path / 'ckpt'}", "--set", "checkpoint_every=500",
         "--set", "stop_at_return=null", "--set", "eval_every=1000000", "--set", "total_steps=12000", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_stopped_driver_resumes_with_its_counters(tmp_path):
    checkpoint = tmp_path / "ckpt" / "latest.pt"
    first = start_driver(tmp_path)
    deadline = time.monotonic() + 300
    saved = None
    while saved is None or saved["updates"] < 1000:
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else "timeout"
        time.sleep(0.5)
        if checkpoint.is_file():
            saved = torch.load(checkpoint, weights_only=True)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    saved = torch.load(checkpoint, weights_only=True)  # the last one written before the stop

    second = start_driver(tmp_path, "--resume")
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    resumed = int(re.search(r"resumed from (\d+)", output).group(1))
    assert resumed == saved["updates"] >= 1000
    final = torch.load(checkpoint, weights_only=True)
    assert final["updates"] > resumed and final["env_steps"] >= 12000
    assert final["extra"]["mlflow_run_id"] == saved["extra"]["mlflow_run_id"]  # the same MLflow run goes on
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    assert client.get_run(final["extra"]["mlflow_run_id"]).info.status == "FINISHED"
