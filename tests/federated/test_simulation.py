"""Federated runs on a real two-CPU Ray: virtual clients, non-IID accuracy, faults, DP and MLflow logging."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from mlplatform.config import ConfigError, load_config
from mlplatform.emotion.data import load_corpus
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.writers import load_provenance, provenance, save_provenance
from mlplatform.federated.checkpoint import load_round_state, resumed_run_id
from mlplatform.federated.pool import ClientPool
from mlplatform.federated.privacy import PrivacyAccountant
from mlplatform.federated.server import FederatedServer
from mlplatform.federated.simulation import (
    FederatedConfig, build_partitions, build_strategy, build_task, client_config, guarantee_tags, initial_weights,
    run_federated, train_centralized,
)
from mlplatform.mlops.registry import ModelRegistry, RegistrySource
from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.storage import cache_dir

pytestmark = pytest.mark.usefixtures("local_ray")
REPO_CONFIGS = "jobs/configs"
FORTY_WRITERS = Path(__file__).parents[1] / "emotion" / "data" / "forty-writers"
"""The bundled corpus' first 40 writers (1,120 texts): four times cheaper to train on than all 160."""


def tiny(tmp_path, **options) -> FederatedConfig:
    values = {"num_features": 512, "num_actors": 2, "output_dir": str(tmp_path / "model"), "corpus": str(FORTY_WRITERS)} | options
    return FederatedConfig(**values)


def test_a_hundred_virtual_clients_complete_five_rounds_on_two_actors(tmp_path):
    result = run_federated(tiny(tmp_path, num_clients=100, fraction_fit=1.0, rounds=5), progress=False)
    assert [r.used for r in result.history] == [100] * 5
    assert all(r.aggregated for r in result.history)
    assert (tmp_path / "model" / "model.pt").is_file() and (tmp_path / "model" / "federated.json").is_file()


def test_non_iid_fedavg_comes_within_five_points_of_centralized_training(tmp_path):
    config = dataclasses.replace(load_config(FederatedConfig, f"{REPO_CONFIGS}/federated_tiny.yaml"),
                                 num_actors=2, output_dir=str(tmp_path / "model"), corpus=str(FORTY_WRITERS))
    assert (config.partition, config.alpha, config.num_clients) == ("dirichlet", 0.5, 100)
    federated = run_federated(config, progress=False)
    centralized = train_centralized(config, epochs=20)
    print(f"test accuracy: federated {federated.test_metrics['accuracy']:.3f}, centralized {centralized['accuracy']:.3f}")
    assert federated.test_metrics["accuracy"] >= centralized["accuracy"] - 0.05
    assert centralized["accuracy"] > 0.3  # both far above the 1-in-8 guess
    memory = [r.actor_memory_mb for r in federated.history]
    assert memory[99] <= 1.05 * memory[9]  # a fixed pool: no growth from round 10 to round 100


def test_every_round_completes_with_thirty_percent_dropout(tmp_path):
    result = run_federated(tiny(tmp_path, dropout_rate=0.3, fraction_fit=0.2, rounds=5), progress=False)
    assert all(r.aggregated for r in result.history)
    assert sum(r.dropped for r in result.history) > 0
    assert all(r.used + r.dropped == r.sampled for r in result.history)


@pytest.mark.parametrize("strategy", ["fedavg", "median"])
def test_nan_clients_are_rejected_and_the_model_stays_finite(tmp_path, strategy):
    result = run_federated(tiny(tmp_path, corrupt_rate=0.3, fraction_fit=0.2, rounds=4, strategy=strategy), progress=False)
    assert sum(r.rejected for r in result.history) > 0
    assert all(np.isfinite(r.update_norm) for r in result.history)
    assert np.isfinite(result.test_metrics["loss"]) and result.test_metrics["accuracy"] > 0


def test_a_round_closes_at_its_deadline_without_its_stragglers(tmp_path):
    result = run_federated(tiny(tmp_path, slow_rate=0.3, slowdown_s=30.0, round_deadline_s=2.0, fraction_fit=0.2,
                                rounds=3), progress=False)
    assert all(r.seconds <= 2.0 * 1.05 for r in result.history), [r.seconds for r in result.history]
    assert sum(r.late for r in result.history) > 0 and all(r.used > 0 for r in result.history)


def test_a_killed_client_actor_is_replaced_and_its_clients_train_on_another(tmp_path):
    config = tiny(tmp_path, fraction_fit=0.2)
    task = build_task(config)
    _, weights = initial_weights(task, 0)
    server = FederatedServer(weights, build_strategy(config), build_partitions(config, task))
    pool = ClientPool(task, client_config(config), num_actors=2)
    try:
        ray.kill(pool.actors[0])
        report = server.run_round(1, pool)
        assert pool.actors_replaced == 1 and report.retried >= 1 and report.aggregated
        assert report.errors == 0 and report.used == report.sampled  # no client lost with the actor
        assert server.run_round(2, pool).used == report.sampled  # the replacement serves the next round in full
    finally:
        pool.shutdown()


def test_dp_run_logs_epsilon_every_round_and_stops_before_the_target(tmp_path):
    db = f"sqlite:///{tmp_path}/m.db"
    config = tiny(tmp_path, dp=True, writers="private", noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.2,
                  target_epsilon=3.0, rounds=100, eval_every=1, corrupt_rate=0.3)
    with ExperimentTracker("federated", tracking_uri=db) as tracker:
        result = run_federated(config, tracker, progress=False)
    assert result.stopped_by_budget and 0 < result.rounds < 100
    assert result.epsilon <= 3.0
    epsilons = [m.value for m in MlflowClient(db).get_metric_history(tracker.run_id, "privacy/epsilon")]
    assert len(epsilons) == result.rounds and epsilons == sorted(epsilons) and epsilons[-1] == result.epsilon
    run = MlflowClient(db).get_run(tracker.run_id)
    params = run.data.params
    assert params["dp_accountant"] == "pld" and params["dp"] == "True" and params["dp_mechanism"] == "DP-FedAvg"
    # only accounted releases: ε, the released update's norm, evaluation on public writers, the cluster's faults
    assert {key.split("/")[0] for key in run.data.metrics} == {"privacy", "train", "eval", "test", "test_private", "faults"}
    assert "train/loss" not in run.data.metrics and "num_clients_actual" not in params
    assert all(np.isfinite(r.update_norm) for r in result.history)  # NaN clients (30%) count as zero updates
    assert sum(r.rejected for r in result.history) == 0 and sum(r.used for r in result.history) > 0
    assert run.data.tags["dp.guarantee"].startswith(f"(ε = {result.epsilon:.3f}, δ = 1e-05)-DP for each private writer")
    assert "OS CSPRNG" in run.data.tags["dp.sampling"] and f"N = {config.num_clients}" in run.data.tags["dp.mechanism"]


def test_a_resumed_dp_run_goes_on_from_its_last_round_with_its_epsilon_ledger(tmp_path):
    db = f"sqlite:///{tmp_path}/m.db"
    config = tiny(tmp_path, dp=True, writers="private", noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.2, rounds=2)
    with pytest.raises(ConfigError, match="--resume found no round checkpoint at"):
        run_federated(config, progress=False, resume=True)
    with ExperimentTracker("federated", tracking_uri=db) as tracker:
        first = run_federated(config, tracker, progress=False)
    after_two = load_round_state(config, first_weights_size(config))
    assert after_two.server_round == 2 and after_two.mlflow_run_id == tracker.run_id

    more = dataclasses.replace(config, rounds=4)
    with ExperimentTracker("federated", tracking_uri=db, run_id=resumed_run_id(more)) as resumed_tracker:
        second = run_federated(more, resumed_tracker, progress=False, resume=True)
    assert resumed_tracker.run_id == tracker.run_id and second.rounds == 4
    assert [r.server_round for r in second.history] == [3, 4]
    ledger = PrivacyAccountant(delta=config.delta)
    ledger.step(noise_multiplier=1.0, sample_rate=0.2, rounds=4)  # all four rounds compose, not the last two
    assert second.epsilon == pytest.approx(ledger.epsilon(), rel=1e-9) and second.epsilon > first.epsilon
    epsilons = MlflowClient(db).get_metric_history(tracker.run_id, "privacy/epsilon")
    assert [m.step for m in epsilons] == [1, 2, 3, 4] and epsilons[1].value == pytest.approx(first.epsilon)
    assert second.test_metrics["start_macro_f1"] == first.test_metrics["start_macro_f1"]  # against the same start
    assert "plots/rounds.png" in {a.path for a in MlflowClient(db).list_artifacts(tracker.run_id, "plots")}
    with pytest.raises(ConfigError, match="the checkpoint was made with dp: True, the config says dp: False"):
        run_federated(dataclasses.replace(more, dp=False, writers="all"), progress=False, resume=True)


def first_weights_size(config: FederatedConfig) -> int:
    return initial_weights(build_task(config), config.seed)[1].size


def test_dp_runs_use_private_writers_and_a_public_n():
    examples = build_task(FederatedConfig(corpus=str(FORTY_WRITERS), writers="private")).examples
    groups = json.loads((FORTY_WRITERS / "writer_groups.json").read_text())
    by_split = {split: {e.writer for e in examples if e.split == split} for split in ("train", "dev", "test", "private_test")}
    assert by_split["private_test"] <= by_split["train"] == set(groups["private"]) and len(by_split["private_test"]) >= 19
    assert by_split["dev"] | by_split["test"] <= set(groups["public"])  # evaluation during training reads public writers
    with pytest.raises(ConfigError, match="num_clients: the writer partition makes 20 clients, more than num_clients=10"):
        run_federated(FederatedConfig(corpus=str(FORTY_WRITERS), writers="private", partition="writer", num_clients=10,
                                      dp=True, noise_multiplier=1.0), progress=False)
    with pytest.raises(ValueError, match="dp needs writers: private"):
        FederatedConfig(dp=True, noise_multiplier=1.0)


def test_the_emotion_model_federated_by_writer_under_dp(tmp_path, monkeypatch):
    config = dataclasses.replace(load_config(FederatedConfig, f"{REPO_CONFIGS}/federated_emotion_dp.yaml"),
                                 rounds=2, num_actors=2, hidden_size=32, num_layers=1, output_dir=str(tmp_path / "model"),
                                 corpus=str(FORTY_WRITERS))
    result = run_federated(config, progress=False)
    assert result.rounds == 2 and 0 < result.epsilon <= config.target_epsilon
    assert result.history[0].sampled > 0 and result.noise_multiplier > 0
    trained = EmotionClassifier.from_pretrained(tmp_path / "model").state_dict()
    start, _ = initial_weights(build_task(config), config.seed)
    changed = {name for name, value in start.state_dict().items() if not torch.equal(value, trained[name])}
    assert changed == {"model.classifier.weight", "model.classifier.bias"}  # only the head was federated
    groups = json.loads((FORTY_WRITERS / "writer_groups.json").read_text())
    assert load_provenance(tmp_path / "model")["writers"] == sorted(groups["public"])  # its vocabulary: public texts
    # a starting model that read private writers is refused, unless the run gives up its guarantee
    leaky = tmp_path / "leaky"
    shutil.copytree(tmp_path / "model", leaky)
    private = [e for e in load_corpus(FORTY_WRITERS) if e.writer in groups["private"][:3] and e.split == "train"]
    save_provenance(leaky, provenance(private, FORTY_WRITERS))
    with pytest.raises(ConfigError, match=r"learnt from 3 of the clients' writers \(w01, w03, w05\), so DP cannot protect"):
        build_task(dataclasses.replace(config, model=str(leaky)))
    accepted = dataclasses.replace(config, model=str(leaky), public_data_overlap="accept")
    assert build_task(accepted).provenance["writers"] == ["w01", "w03", "w05"]
    assert guarantee_tags(accepted, result)["dp.guarantee"].startswith("none")
    # a registered model fine-tunes further, with the tokenizer saved beside it, whatever vocabulary it was built with
    store = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with ExperimentTracker("federated", tracking_uri=store) as tracker:
        tracker.log_artifact(tmp_path / "model", artifact_path="model")
    registry = ModelRegistry(store)
    registry.set_alias("emotion-dp", "champion", registry.register_model("emotion-dp", run_id=tracker.run_id).version)
    again = dataclasses.replace(config, model="models:/emotion-dp@champion", rounds=1, output_dir=str(tmp_path / "again"))
    source = build_task(again).tokenizer
    assert isinstance(source, RegistrySource) and source.version == "1"  # pinned here, so every node gets the same version
    copy = source.local_path()  # what each client actor does on its own node
    assert copy == str(registry.cached_model("models:/emotion-dp@champion", cache_dir())[1]) and copy.startswith(str(cache_dir()))
    assert EmotionClassifier.from_pretrained(copy).state_dict()["model.classifier.bias"].equal(trained["model.classifier.bias"])
    assert run_federated(again, progress=False).rounds == 1
