"""`mlplatform up`'s plan without starting it: the jobs it submits, the Serve config it deploys, and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from mlplatform.config import load_config, parse_overrides
from mlplatform.emotion.train import EmotionConfig
from mlplatform.federated.config import FederatedConfig
from mlplatform.rl.apex.config import ApexConfig
from mlplatform.stack import StackConfig, StackState, down, pipeline, serve_app_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def config_of(job, cls):
    """The config a job's entrypoint would build from its --config and --set arguments."""
    arguments = job.arguments
    pairs = [arguments[i + 1] for i, a in enumerate(arguments) if a == "--set"]
    return load_config(cls, REPO / arguments[arguments.index("--config") + 1], parse_overrides(pairs))


def test_the_pipeline_trains_on_the_shipped_configs_with_the_overrides_given(tmp_path):
    config = StackConfig(apex={"total_steps": 3000, "stop_at_return": None}, tune={"epochs": 2}, federated={"rounds": 3}, tune_samples=4)
    apex, tune, federated = pipeline(config, tmp_path)
    assert [job.script for job in (apex, tune, federated)] == ["jobs/train_dqn.py", "jobs/tune_emotion.py", "jobs/train_federated.py"]
    assert all((REPO / job.script).is_file() for job in (apex, tune, federated))
    apex_config = config_of(apex, ApexConfig)
    assert (apex_config.total_steps, apex_config.stop_at_return, apex_config.env_id) == (3000, None, "CartPole-v1")
    assert apex_config.checkpoint_dir == str(tmp_path / "checkpoints" / "apex")  # absolute: the job runs in a copy
    assert config_of(tune, EmotionConfig).epochs == 2 and tune.arguments[tune.arguments.index("--num-samples") + 1] == "4"
    federated_config = config_of(federated, FederatedConfig)
    assert federated_config.model == "models:/emotion@champion"  # starts from what the search registered
    assert (federated_config.dp, federated_config.partition, federated_config.rounds) == (True, "writer", 3)
    # the base model learns from public writers only; DP fine-tuning runs over the private ones
    assert (config_of(tune, EmotionConfig).writers, federated_config.writers) == ("public", "private")
    assert [job.model_name for job in (apex, tune, federated)] == ["cartpole", "emotion", "emotion-dp"]
    assert tune.arguments[tune.arguments.index("--output-dir") + 1] == str(tmp_path / "emotion-tune")


def test_with_worker_nodes_the_study_goes_to_storage_every_node_reaches(tmp_path):
    _, tune, _ = pipeline(StackConfig(workers=2), tmp_path)
    assert tune.arguments[tune.arguments.index("--output-dir") + 1] == "stack/emotion-tune"  # under MLPLATFORM_STORAGE


def test_the_serve_config_is_the_shipped_one_with_three_models_on_this_stack():
    config = StackConfig(serve_port=8123, model_cpus=0.25)
    deployed = serve_app_config(config, "sqlite:////srv/m.db")
    ServeDeploySchema.model_validate(deployed)
    assert deployed["http_options"]["host"] == "127.0.0.1" and deployed["http_options"]["port"] == 8123
    app = deployed["applications"][0]
    assert app["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "sqlite:////srv/m.db"
    assert app["args"]["emotion_models"] == ["emotion-dp", "emotion"] and app["args"]["policies"] == ["cartpole"]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Ingress", "Emotion-emotion-dp", "Emotion-emotion", "Policy-cartpole"}
    assert all(deployments[name]["ray_actor_options"]["num_cpus"] == 0.25 for name in deployments if name != "Ingress")
    assert deployments["Emotion-emotion"]["user_config"]["max_batch_size"] == 16  # the shipped settings are kept
    assert deployments["Emotion-emotion-dp"]["autoscaling_config"]["max_replicas"] == 1


def run_cli(*arguments, cwd=REPO):
    return subprocess.run([str(BIN / "mlplatform"), *arguments], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path, taken_port):
    done = run_cli("up", "--set", f"home={tmp_path / 'stack'}", "--set", f"dashboard_port={taken_port}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"port {taken_port} (dashboard_port) is in use" in done.stderr
    assert StackState.load(tmp_path / "stack") is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--set", "tune_samples=0"], "tune_samples"),
        (["--set", "serve_prot=8000"], "did you mean 'serve_port'"),
        (["--set", "apex_config=jobs/configs/missing.yaml"], "jobs/configs/missing.yaml"),
    ],
)
def test_up_explains_bad_settings_in_one_line(tmp_path, arguments, message):
    done = run_cli("up", "--set", f"home={tmp_path / 'stack'}", *arguments)
    assert done.returncode in (1, 2) and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2


def test_up_must_run_from_the_repository_root(tmp_path):
    done = run_cli("up", "--set", f"home={tmp_path / 'stack'}", cwd=tmp_path)
    assert done.returncode == 1 and "repository root" in done.stderr


def test_down_stops_only_the_recorded_processes_and_forgets_them(tmp_path):
    state = StackState(str(tmp_path))
    service = state.launch("sleeper", ["sleep", "300"], {"PATH": "/usr/bin:/bin"})
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        assert service.alive() and json.loads(StackState.path(tmp_path).read_text())["processes"][0]["pid"] == service.pid
        assert down(tmp_path, print) == ["sleeper"]
        assert not service.alive() and bystander.poll() is None
        assert StackState.load(tmp_path) is None and down(tmp_path, print) == []
    finally:
        bystander.kill()
