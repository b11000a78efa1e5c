"""Ape-X as users run it locally: a driver stopped and resumed (`ray job submit` to a cluster is in tests/cluster)."""

import os
import re
import signal
import subprocess
import sys
import time

import torch
from mlflow.tracking import MlflowClient

TOTAL_STEPS = 3000


def start_driver(tmp_path, *extra):
    env = {**os.environ, "RAY_ADDRESS": "local", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    return subprocess.Popen(
        [sys.executable, "-m", "mlplatform.cli", "train", "apex", "--no-progress",
         "--set", f"checkpoint_dir={tmp_path / 'ckpt'}", "--set", "checkpoint_every=100",
         "--set", "stop_at_return=null", "--set", "eval_every=1000000", "--set", f"total_steps={TOTAL_STEPS}", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_stopped_driver_resumes_with_its_counters(tmp_path):
    checkpoint = tmp_path / "ckpt" / "latest.pt"
    first = start_driver(tmp_path)
    deadline = time.monotonic() + 300
    saved = None
    while saved is None or saved["updates"] < 100:
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
    assert resumed == saved["updates"] >= 100
    final = torch.load(checkpoint, weights_only=True)
    assert final["updates"] > resumed and final["env_steps"] >= TOTAL_STEPS
    assert final["extra"]["mlflow_run_id"] == saved["extra"]["mlflow_run_id"]  # the same MLflow run goes on
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    assert client.get_run(final["extra"]["mlflow_run_id"]).info.status == "FINISHED"
