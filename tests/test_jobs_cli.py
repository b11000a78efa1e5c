"""`mlplatform jobs submit|status|logs` against a real `ray start --head` with token authentication."""

import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mlplatform.cli", "jobs"]


def test_submit_waits_for_a_job_that_logs_to_this_sides_store(ray_head, tmp_path):
    db = f"sqlite:///{tmp_path}/mlruns.db"
    env = {**ray_head, "MLFLOW_TRACKING_URI": db, "MLPLATFORM_GIT_COMMIT": "jobs-cli-test"}
    submitted = subprocess.run(
        [*CLI, "submit", "jobs/train_dqn.py", "--wait", "--", "--config", "jobs/configs/dqn_cartpole.yaml",
         "--set", "total_steps=1500", "--set", "learning_starts=200", "--set", "eval_every=500", "--set", "eval_episodes=2",
         "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = re.search(r"submitted (\S+):", submitted.stdout)[1]
    assert submitted.stdout.rstrip().endswith(f"{job_id}: SUCCEEDED")
    status = subprocess.run([*CLI, "status", job_id], env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = subprocess.run([*CLI, "logs", job_id], env=env, capture_output=True, text=True, timeout=120)
    assert "CartPole-v1:" in logs.stdout and "mlflow ui --backend-store-uri" in logs.stdout
    runs = MlflowClient(db).search_runs([MlflowClient(db).get_experiment_by_name("dqn").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["mlflow.source.git.commit"] == "jobs-cli-test"


def test_bad_job_requests_are_one_line_errors(ray_head):
    missing = subprocess.run([*CLI, "submit", "jobs/nope.py"], cwd=REPO, env=ray_head, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == "error: no job entrypoint at 'jobs/nope.py'"
    unknown = subprocess.run([*CLI, "status", "raysubmit_nosuchjob"], env=ray_head, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: job 'raysubmit_nosuchjob'")
    assert "Traceback" not in unknown.stderr
