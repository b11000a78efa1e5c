"""The `mlplatform` command line and the DQN job entrypoint, run as real subprocesses."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mlplatform.cli"]
TINY = ["--set", "learning_starts=200", "--set", "eval_every=400", "--set", "eval_episodes=2", "--no-progress"]


def run(args, env=None, cwd=REPO):
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "dqn", "--help"]])
def test_every_command_has_help(args):
    result = run([*CLI, *args])
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "learning_rat=0.1"], "error: unknown config key 'learning_rat' for DQNConfig (did you mean 'learning_rate'?)"),
        (["--env", "NoSuchEnv-v0"], "error: env_id: unknown gymnasium environment"),
        (["--set", "gamma=2"], "error: gamma: Input should be less than or equal to 1"),
        (["--config", "missing.yaml"], "error: config file 'missing.yaml' does not exist"),
        (["--env", "Pendulum-v1", "--no-track"], "error: DQN needs a discrete action space"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message, tmp_path):
    result = run([*CLI, "train", "dqn", *args], env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def assert_tracked_run(db: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("dqn")
    (run_info,) = client.search_runs([experiment.experiment_id])
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["env_id"] == "CartPole-v1"
    assert run_info.data.params["n_steps"] == "3"
    assert "eval/mean_return" in run_info.data.metrics
    assert len(client.get_metric_history(run_info.info.run_id, "charts/episodic_return")) > 5
    artifacts = {a.path for folder in ("plots", "checkpoints") for a in client.list_artifacts(run_info.info.run_id, folder)}
    assert {"plots/episodic_return.png", "plots/eval_return.png", "checkpoints/checkpoint.pt"} <= artifacts


def test_train_dqn_logs_a_complete_mlflow_run(tmp_path):
    db = tmp_path / "mlruns.db"
    result = run(
        [*CLI, "train", "dqn", "--env", "CartPole-v1", "--total-steps", "800", *TINY],
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "mlflow ui --backend-store-uri" in result.stdout
    assert_tracked_run(db)


def test_job_entrypoint_runs_from_its_config(tmp_path):
    db = tmp_path / "mlruns.db"
    result = run(
        [sys.executable, str(REPO / "jobs/train_dqn.py"), "--config", str(REPO / "jobs/configs/dqn_cartpole.yaml"),
         "--total-steps", "800", *TINY, "--output-dir", str(tmp_path / "runs")],
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "runs").glob("CartPole-v1__dqn__1__*/checkpoint.pt"))
    assert_tracked_run(db)


def test_a_killed_dqn_run_resumes_from_its_latest_checkpoint_with_its_counters(tmp_path):
    db, runs = tmp_path / "mlruns.db", tmp_path / "runs"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    args = [*CLI, "train", "dqn", "--env", "CartPole-v1", "--output-dir", str(runs), *TINY, "--set", "checkpoint_every=500",
            "--set", "stop_at_return=null"]
    first = subprocess.Popen([*args, "--total-steps", "200000"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(runs.glob("CartPole-v1__dqn__*/latest.pt")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() is not None else "slow"
            time.sleep(0.5)
        time.sleep(1)
    finally:
        first.kill()  # as a lost machine: no clean-up, the MLflow run left RUNNING
        first.wait()
    (folder,) = runs.glob("CartPole-v1__dqn__*")
    saved = torch.load(folder / "latest.pt", weights_only=True)
    assert saved["env_steps"] >= 500 and saved["updates"] > 0

    resumed = run([*args, "--total-steps", str(saved["env_steps"] + 1000), "--resume"], env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after {saved['env_steps'] + 1000} steps" in resumed.stdout
    client = MlflowClient(f"sqlite:///{db}")
    (run_info,) = client.search_runs([client.get_experiment_by_name("dqn").experiment_id])
    assert run_info.info.status == "FINISHED"  # one run, the killed one, finished by the resumed process
    returns = [m.step for m in client.get_metric_history(run_info.info.run_id, "charts/episodic_return")]
    assert min(returns) < saved["env_steps"] < max(returns)  # the curve goes on past the checkpoint in the same run
    final = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert final["env_steps"] == saved["env_steps"] + 1000 and final["updates"] > saved["updates"]
    assert len(final["extra"]["eval_history"]) > len(saved["extra"]["eval_history"])  # the curves kept their past

    nothing = run([*CLI, "train", "dqn", "--env", "Acrobot-v1", "--output-dir", str(runs), "--resume"], env=env, cwd=tmp_path)
    assert nothing.returncode == 2 and nothing.stderr.startswith(f"error: --resume found no Acrobot-v1 run with a latest.pt under {runs}")
