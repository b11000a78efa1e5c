"""Hostile versions are refused before they serve: NaN weights fail the probe, a checkpoint cannot choose code to
import, a registry entry cannot point a cached model outside the cache, and a rollout error shows no URI; a rollout
leaves no download behind."""

import tempfile

import pytest
import torch

from mlplatform.emotion.data import load_corpus
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.emotion.tokenizer import default_tokenizer
from mlplatform.mlops.registry import ModelRegistry, RegistryError
from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.rl.agent import DQNAgent, DQNConfig
from mlplatform.rl.policy import Policy
from mlplatform.serving.deployments import probe_emotion, probe_policy
from mlplatform.serving.rollout import AliasFollower


def nan_weights(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))


def test_a_version_with_nan_weights_fails_its_probe(tmp_path):
    tokenizer = default_tokenizer([e.text for e in load_corpus() if e.split == "train"][:300], vocab_size=500)
    model = EmotionClassifier.from_config(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    model.save_pretrained(tmp_path / "healthy")
    tokenizer.save_pretrained(tmp_path / "healthy")
    assert probe_emotion(EmotionPredictor(tmp_path / "healthy")).shape == (1, 8)
    nan_weights(model)
    model.save_pretrained(tmp_path / "nan")
    tokenizer.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match="the probe text's scores are not all finite"):
        probe_emotion(EmotionPredictor(tmp_path / "nan"))

    agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(8,)))
    agent.save(tmp_path / "healthy.pt")
    assert probe_policy(Policy(tmp_path / "healthy.pt")).shape == (2,)
    nan_weights(agent.online)
    agent.save(tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="the Q-values of a zero observation are not all finite"):
        probe_policy(Policy(tmp_path / "nan.pt"))


def test_a_checkpoint_naming_a_module_env_is_refused_without_importing_it(tmp_path):
    agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(8,)))
    state = torch.load(agent.save(tmp_path / "ok.pt"), weights_only=True)
    for env_id in ("mlplatform_never_imported:Env", "NoSuchEnv-v0"):
        torch.save({**state, "config": {**state["config"], "env_id": env_id}}, tmp_path / "crafted.pt")
        with pytest.raises(ValueError, match=f"env_id '{env_id}' is not an environment in gymnasium's registry"):
            Policy(tmp_path / "crafted.pt")


@pytest.mark.parametrize("crafted", ["/etc", "../../outside", "model/../../outside"])
def test_a_crafted_artifact_path_cannot_leave_the_cache(tmp_path, crafted):
    store = f"sqlite:///{tmp_path}/m.db"
    with ExperimentTracker("hostile", tracking_uri=store) as tracker:
        pass
    registry = ModelRegistry(store)
    registry.register_model("emotion", run_id=tracker.run_id, artifact_path=crafted, kind="emotion")
    with pytest.raises(RegistryError, match="a cached model's path must be relative, without '..'"):
        registry.cached_model("models:/emotion/1", tmp_path / "cache")
    assert not (tmp_path / "outside").exists()


def test_a_rollout_error_names_no_uri(tmp_path):
    store = f"sqlite:///{tmp_path}/m.db"
    registry = ModelRegistry(store)
    agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(8,)))
    state = torch.load(agent.save(tmp_path / "ok.pt"), weights_only=True)
    crafted = {**state, "config": {**state["config"], "env_id": "https://user:secret@example.com/env"}}
    for checkpoint in (state, crafted):
        torch.save(checkpoint, tmp_path / "cartpole.pt")
        with ExperimentTracker("hostile", tracking_uri=store) as tracker:
            tracker.log_checkpoint(tmp_path / "cartpole.pt")
        registry.set_alias("cartpole", "champion", registry.register_model("cartpole", run_id=tracker.run_id).version)
        if checkpoint is state:
            follower = AliasFollower(registry, "cartpole", "champion", load=Policy, probe=probe_policy)
    try:
        assert not follower.refresh() and follower.current[0].version == "1"  # the crafted version is refused
        assert follower.info()["last_rollout_error"] == (
            "cartpole@champion: ValueError: the checkpoint's env_id '<uri>' is not an environment in gymnasium's registry")
    finally:
        follower.stop()


def test_rollout_downloads_are_gone_once_loaded(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/m.db"
    registry = ModelRegistry(store)
    for seed in (1, 2):
        agent = DQNAgent((4,), 2, DQNConfig(hidden_sizes=(8,), seed=seed))
        with ExperimentTracker("hygiene", tracking_uri=store) as tracker:
            tracker.log_checkpoint(agent.save(tmp_path / "cartpole.pt"))
        registry.register_model("cartpole", run_id=tracker.run_id)
    registry.set_alias("cartpole", "champion", "1")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    follower = AliasFollower(registry, "cartpole", "champion", load=Policy, probe=probe_policy)
    try:
        assert list(scratch.iterdir()) == []
        registry.set_alias("cartpole", "champion", "2")
        assert follower.refresh() and follower.current[0].version == "2"
        assert list(scratch.iterdir()) == []  # the promotion's download is gone too
        assert registry.load_checkpoint("cartpole", "2")["config"]["seed"] == 2
        assert list(scratch.iterdir()) == []
    finally:
        follower.stop()
