"""ModelRegistry on a real MLflow SQLite store: versions, moving aliases, downloads, safe checkpoint loads."""

import pickle

import pytest
import torch

from mlplatform.mlops.registry import ModelRegistry, RegistryError, parse_model_uri
from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.rl.agent import DQNAgent, DQNConfig


class Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path}/m.db"


def run_with_model_folder(store, tmp_path, marker: str) -> str:
    folder = tmp_path / marker / "best"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"marker": "{marker}"}}')
    with ExperimentTracker("registry", tracking_uri=store) as tracker:
        tracker.log_artifact(folder, artifact_path="model")
    return tracker.run_id


def run_with_checkpoint(store, tmp_path, content) -> str:
    path = tmp_path / "dqn.pt"
    if isinstance(content, Payload):
        path.write_bytes(pickle.dumps(content))
    else:
        torch.save(content, path)
    with ExperimentTracker("registry", tracking_uri=store) as tracker:
        tracker.log_checkpoint(path)
    return tracker.run_id


def test_versions_aliases_and_downloads(store, tmp_path):
    registry = ModelRegistry(store)
    first = registry.register_model("emotion", run_id=run_with_model_folder(store, tmp_path, "one"), tags={"macro_f1": 0.3})
    second = registry.register_model("emotion", run_id=run_with_model_folder(store, tmp_path, "two"))
    assert (first.version, second.version) == ("1", "2")
    assert first.kind == "emotion" and first.artifact_path == "model/best" and first.tags == {"macro_f1": "0.3"}
    registry.set_alias("emotion", "champion", "1")
    registry.set_alias("emotion", "challenger", "2")
    assert registry.get_model_version("emotion", "@champion").version == "1"
    moved = registry.set_alias("emotion", "champion", "2")
    assert set(moved.aliases) == {"champion", "challenger"}
    assert registry.get_model_version("emotion", "1").aliases == ()
    version, folder = registry.download_model("models:/emotion@champion", dst=tmp_path / "download")
    assert version.version == "2" and '"two"' in (folder / "config.json").read_text()
    assert [v.version for v in registry.search_model_versions("emotion")] == ["2", "1"]


def test_run_metrics_are_the_latest_values(store):
    with ExperimentTracker("registry", tracking_uri=store) as tracker:
        tracker.log_metrics({"test/macro_f1": 0.2}, step=1)
        tracker.log_metrics({"test/macro_f1": 0.4, "privacy/epsilon": 7.5}, step=2)
    assert ModelRegistry(store).run_metrics(tracker.run_id) == {"test/macro_f1": 0.4, "privacy/epsilon": 7.5}


def test_checkpoints_load_with_weights_only(store, tmp_path):
    registry = ModelRegistry(store)
    registry.register_model("cartpole", run_id=run_with_checkpoint(store, tmp_path, {"weights": torch.ones(3), "step": 7}))
    loaded = registry.load_checkpoint("models:/cartpole/1")
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], torch.ones(3))
    assert registry.get_model_version("cartpole", "1").kind == "dqn"


def test_a_pickled_payload_is_refused(store, tmp_path, capsys):
    registry = ModelRegistry(store)
    registry.register_model("evil", run_id=run_with_checkpoint(store, tmp_path, Payload()), kind="dqn")
    with pytest.raises(RegistryError, match="refused to load dqn.pt"):
        registry.load_checkpoint("evil", "1")
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_errors_name_what_was_wrong(store, tmp_path):
    registry = ModelRegistry(store)
    with pytest.raises(RegistryError, match="bad model name"):
        registry.register_model("no spaces", run_id="x")
    with pytest.raises(RegistryError) as unknown_run:
        registry.register_model("emotion", run_id="0" * 32)
    assert unknown_run.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(RegistryError, match="no model folder"):
        with ExperimentTracker("registry", tracking_uri=store) as tracker:
            pass
        registry.register_model("emotion", run_id=tracker.run_id)
    registry.register_model("emotion", run_id=run_with_model_folder(store, tmp_path, "one"))
    with pytest.raises(RegistryError, match="emotion@champion") as no_alias:
        registry.get_model_version("emotion", "champion")
    assert no_alias.value.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}
    with pytest.raises(RegistryError, match="cannot be a number"):
        registry.set_alias("emotion", "3", "1")


def test_model_uris():
    assert parse_model_uri("models:/emotion@champion") == ("emotion", "champion")
    assert parse_model_uri("models:/cartpole/12") == ("cartpole", "12")
    with pytest.raises(RegistryError, match="not a model URI"):
        parse_model_uri("runs:/abc/model")


def test_models_command_line(store, tmp_path):
    import os
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlplatform.cli", "models", *args], capture_output=True, text=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": store}, timeout=120)

    def run_with_policy(seed: int) -> str:
        agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(8,), seed=seed))
        with ExperimentTracker("registry", tracking_uri=store) as tracker:
            tracker.log_checkpoint(agent.save(tmp_path / str(seed) / "cartpole.pt"))
        return tracker.run_id

    not_a_policy = cli("register", "cartpole", "--run-id", run_with_checkpoint(store, tmp_path, {"step": 1}))
    assert not_a_policy.returncode == 2 and "Traceback" not in not_a_policy.stderr
    assert "does not load as a dqn model: no 'config' in it" in not_a_policy.stderr.strip().splitlines()[-1], not_a_policy.stderr
    first, second = run_with_policy(1), run_with_policy(2)
    assert cli("register", "cartpole", "--run-id", first, "--alias", "champion").returncode == 0
    registered = cli("register", "cartpole", "--run-id", second)
    assert registered.returncode == 0 and "v2" in registered.stdout and "dqn" in registered.stdout
    assert "@champion" in cli("show", "cartpole").stdout.split("v1")[1]
    assert cli("promote", "cartpole", "2").returncode == 0
    listed = cli("list").stdout.splitlines()
    assert "v2" in listed[0] and "@champion" in listed[0] and "@champion" not in listed[1]
    missing = cli("show", "nosuchmodel")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: find nosuchmodel@champion")
    assert "Traceback" not in missing.stderr
