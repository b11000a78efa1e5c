"""Every workload on a three-node cluster whose worker nodes share no disk with the driver, each surviving a lost node.

Each workload is submitted with `ray job submit` from a fresh shell, as a user would, and one worker
node is killed (SIGKILL of all its Ray processes) while it runs; the test then checks where the
actors ran, that the job SUCCEEDED, what it logged to the MLflow server, and what the loss cost.
The figures each test measures are printed (run with -s to see them).
"""

import json
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from mlplatform import storage
from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.mlops.registry import ModelRegistry
from mlplatform.mlops.tracking import job_runs

REPO = Path(__file__).resolve().parents[2]


def report(case: str, **figures: object) -> None:
    print(f"\nnode-loss {case}: " + json.dumps(figures))


def nodes_of(cluster, class_name: str) -> set[str]:
    return {a["node_id"] for a in cluster.actors(class_name) if a.get("node_id")}


def wait_for(condition, what: str, timeout_s: float = 300, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)
    return value


def test_a_worker_node_cannot_read_what_the_driver_wrote(cluster, tmp_path):
    runs = cluster_repo_file("runs/isolation-probe.txt")
    runs.write_text("driver-only")
    local = tmp_path / "probe.txt"
    local.write_text("driver-only")
    try:
        ray.init(address=cluster.state.gcs_address, log_to_driver=False)

        @ray.remote(num_cpus=0)
        def look(paths: list[str]) -> dict:
            import os

            return {"seen": [os.path.exists(p) for p in paths], "home": os.environ["HOME"],
                    "code": os.path.exists(__import__("mlplatform").__file__)}

        for node, expected in (("head", True), ("w1", False), ("w2", False)):
            seen = ray.get(look.options(resources={node: 0.01}).remote([str(runs), str(local)]))
            assert seen["seen"] == [expected, expected], (node, seen)
            assert seen["code"]  # the project itself is installed on every node, as in a cluster image
            assert (seen["home"] == "/tmp/home") == (node != "head")
    finally:
        ray.shutdown()
        runs.unlink()


def cluster_repo_file(relative: str) -> Path:
    path = REPO / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_updates(checkpoint: str) -> int:
    """The updates of the checkpoint stored so far (0 while there is none, or while it is being replaced)."""
    if not storage.exists(checkpoint):
        return 0
    try:
        return torch_load(storage.read_bytes(checkpoint))["updates"]
    except RuntimeError:  # the bytes of an older version and a newer one, read while the driver replaced it
        return 0


def test_apex_job_survives_losing_the_learners_node_and_still_solves(cluster):
    checkpoint = storage.join(storage.resolve("checkpoints/apex-node-loss"), "latest.pt")
    # A 2-CPU learner fits only a worker node (the head has 1 CPU), so the node lost is the learner's.
    # Two workers and two shards, as by default: on two cores a third of each would only slow the learner.
    submission = cluster.submit(
        "python", "jobs/train_dqn.py", "--config", "jobs/configs/apex_cartpole.yaml", "--no-progress",
        "--set", "checkpoint_dir=checkpoints/apex-node-loss", "--set", "checkpoint_every=250", "--set", "num_workers=2",
        "--set", "num_shards=2", "--set", "learner_num_cpus=2", "--set", "worker_num_cpus=0", "--set", "total_steps=150000")
    # the node goes once the learner has learnt something (its checkpoint, every 250 updates, holds 1000 or more)
    saved_updates = wait_for(lambda: (updates := checkpoint_updates(checkpoint)) >= 1000 and updates,
                             "a checkpoint at 1000 updates", timeout_s=300)
    names = {node: name for name, node in cluster.node_ids().items()}
    alive = {kind: [a for a in cluster.actors(kind) if a["state"] == "ALIVE"] for kind in ("RolloutWorker", "ReplayShard")}
    (learner,) = [a for a in cluster.actors("Learner") if a["state"] == "ALIVE"]  # asked last: the node goes right after
    lost = names[learner["node_id"]]
    assert lost != "head"
    on_lost = {kind: sum(names.get(a["node_id"]) == lost for a in actors) for kind, actors in alive.items()}
    killed_at = cluster.kill(lost)
    status = cluster.wait_job(submission, timeout_s=600)
    assert status == "SUCCEEDED", cluster.jobs().get_job_logs(submission)[-3000:]
    (run_id,) = job_runs(submission, cluster.tracking_uri)
    metrics = MlflowClient(cluster.tracking_uri).get_run(run_id).data.metrics
    assert metrics["eval/mean_return"] >= 475
    assert metrics["faults/learner_restarts"] >= 1, (
        f"the learner was reported on {lost} ({learner['node_id']}, nodes {names}), which was killed "
        f"{time.time() - killed_at:.0f}s before the end, on it {on_lost}:\n" + cluster.jobs().get_job_logs(submission)[-2000:])
    assert metrics["faults/workers_replaced"] >= on_lost["RolloutWorker"] and metrics["faults/shards_replaced"] >= on_lost["ReplayShard"]
    final = torch_load(storage.read_bytes(checkpoint))
    assert final["updates"] > saved_updates and final["env_steps"] > 0
    assert len({a["node_id"] for a in cluster.actors("Learner")}) >= 2  # the first on the lost node, its successor elsewhere
    assert len(nodes_of(cluster, "RolloutWorker") | nodes_of(cluster, "ReplayShard")) >= 2
    registry = ModelRegistry(cluster.tracking_uri)
    version = registry.register_model("cartpole-multinode", run_id=run_id)
    assert registry.load_checkpoint(version.name, version.version)["updates"] == final["updates"]  # artifacts via the server
    restarted = MlflowClient(cluster.tracking_uri).get_metric_history(run_id, "faults/learner_restarts")[0].timestamp / 1000
    report("apex", lost_node=lost, on_lost_node=on_lost, recovery_s=round(restarted - killed_at, 1),
           learner_restarts=metrics["faults/learner_restarts"], lost_updates=metrics["faults/lost_updates"],
           lost_transitions=metrics["faults/lost_transitions"], solved_at_step=metrics["charts/solved_at_step"])


def test_a_wrong_token_is_refused(cluster):
    wrong = cluster.fresh_shell(f"mkdir -p $HOME/.ray && RAY_AUTH_TOKEN=not-the-token .venv/bin/ray job list --address {cluster.dashboard}")
    assert wrong.returncode != 0 and "token" in (wrong.stdout + wrong.stderr).lower()


def torch_load(data: bytes) -> dict:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


TINY_EMOTION = ["--set", "hidden_size=32", "--set", "num_layers=1", "--set", "num_heads=2", "--set", "vocab_size=2000",
                "--set", "max_length=64", "--set", "corpus=tests/emotion/data/forty-writers", "--set", "teacher=none"]  # the first 40 writers only


def metric_steps(run_id: str, key: str, tracking_uri: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def test_ray_train_on_two_nodes_resumes_after_losing_one_and_keeps_one_run(cluster):
    epochs = 6
    submission = cluster.submit("python", "jobs/train_emotion.py", "--set", "num_workers=2", "--set", "cpus_per_worker=1",
                                "--set", "placement_strategy=SPREAD",
                                "--set", f"epochs={epochs}", "--set", f"patience={epochs}", *TINY_EMOTION)
    run_id = wait_for(lambda: (job_runs(submission, cluster.tracking_uri) or [None])[0], "the training's MLflow run")
    # rank 0 logs an epoch before Ray Train has the checkpoints of both ranks: a few epochs in, one is registered
    wait_for(lambda: len(metric_steps(run_id, "dev_macro_f1", cluster.tracking_uri)) >= 3, "three epochs reported")
    workers = cluster.actors("RayTrainWorker")
    ids = cluster.node_ids()
    on = {name for name, node in ids.items() if node in {w["node_id"] for w in workers if w["state"] == "ALIVE"}}
    assert len(on) == 2, on  # SPREAD: one worker per node
    lost = sorted(on - {"head"})[0]
    epochs_done = len(metric_steps(run_id, "dev_macro_f1", cluster.tracking_uri))
    killed_at = cluster.kill(lost)
    status = cluster.wait_job(submission)
    assert status == "SUCCEEDED", cluster.jobs().get_job_logs(submission)[-3000:]
    assert job_runs(submission, cluster.tracking_uri) == [run_id]  # the restarted workers logged into the same run
    client = MlflowClient(cluster.tracking_uri)
    (resumed,) = client.get_metric_history(run_id, "faults/resumed_from_epoch") or [None]
    assert resumed is not None, "\n".join(line for line in cluster.jobs().get_job_logs(submission).splitlines()
                                           if "TrainController" in line)[-4000:]
    assert 1 <= resumed.value <= epochs_done + 1
    steps = metric_steps(run_id, "dev_macro_f1", cluster.tracking_uri)
    assert steps[:epochs_done] == list(range(1, epochs_done + 1))  # rank 0 alone logged, once an epoch, until the loss
    assert set(steps) == set(range(1, epochs + 1))
    assert "test_macro_f1" in client.get_run(run_id).data.metrics
    assert {Path(a.path).name for a in client.list_artifacts(run_id, "plots")} == {"learning_curves.png", "confusion_matrix_test.png"}
    registry = ModelRegistry(cluster.tracking_uri)
    version = registry.register_model("emotion-multinode", run_id=run_id)
    assert version.tags["provenance.writer_count"] == "40"  # whose texts it read, carried from the run to the version
    _, folder = registry.download_model(version.name, version.version)  # the best model, from the server
    assert (folder / "config.json").is_file() and (folder / "vocab.txt").is_file()
    assert not (folder / "trainer_state.pt").exists()  # the training state stays in the checkpoints
    prediction = EmotionPredictor(folder).predict(["今日はいい天気で嬉しい"])[0]
    assert sum(prediction.scores.values()) == pytest.approx(1.0, abs=1e-5)
    report("ray-train", recovery_s=round(resumed.timestamp / 1000 - killed_at, 1), lost_node=lost,
           epochs_redone=epochs_done - int(resumed.value), resumed_from_epoch=int(resumed.value))


def test_federated_dp_job_replaces_the_clients_of_a_lost_node_and_keeps_its_accounting(cluster, tmp_path):
    from mlplatform.federated.privacy import PrivacyAccountant

    rounds, q, z = 16, 0.5, 1.0
    submission = cluster.submit("python", "jobs/train_federated.py", "--config", "jobs/configs/federated_tiny.yaml", "--no-progress",
                                "--set", f"rounds={rounds}", "--set", "num_clients=20", "--set", "num_actors=4",
                                "--set", "dp=true", "--set", "writers=private", "--set", f"sample_rate={q}",
                                "--set", f"noise_multiplier={z}",
                                "--set", "round_deadline_s=20", "--set", "local_epochs=20", "--set", "eval_every=100",
                                "--set", "corpus=tests/emotion/data/forty-writers")
    run_id = wait_for(lambda: (job_runs(submission, cluster.tracking_uri) or [None])[0], "the federated run")
    wait_for(lambda: len(metric_steps(run_id, "privacy/epsilon", cluster.tracking_uri)) >= 2, "two rounds")
    on = {name for name, node in cluster.node_ids().items() if node in nodes_of(cluster, "ClientActor")}
    assert {"w1", "w2"} <= on
    killed_at = cluster.kill("w2")
    status = cluster.wait_job(submission)
    assert status == "SUCCEEDED", cluster.jobs().get_job_logs(submission)[-3000:]
    client = MlflowClient(cluster.tracking_uri)
    epsilons = client.get_metric_history(run_id, "privacy/epsilon")
    assert len(epsilons) == rounds  # every round closed, the one in flight included
    accountant = PrivacyAccountant(delta=1e-5, kind="pld")
    accountant.step(noise_multiplier=z, sample_rate=q, rounds=rounds)
    assert epsilons[-1].value == pytest.approx(accountant.epsilon(), rel=1e-6)  # the loss changed nothing in it
    # under DP, client counts and round times stay private: the run publishes the actors the cluster lost
    assert not [key for key in client.get_run(run_id).data.metrics if key.startswith(("clients/", "perf/", "train/loss"))]
    replaced = client.get_metric_history(run_id, "faults/actors_replaced")
    after = {m.step: m.timestamp / 1000 for m in epsilons}
    fault_round = min(m.step for m in epsilons if m.timestamp / 1000 >= killed_at)
    report("federated", fault_round=fault_round, fault_round_s=round(after[fault_round] - after.get(fault_round - 1, killed_at), 1),
           other_rounds_s=round(after[2] - after[1], 1), actors_replaced=max(m.value for m in replaced))
    assert max(m.value for m in replaced) >= 1
    downloaded = Path(client.download_artifacts(run_id, "model", str(tmp_path)))  # the final model, from the server
    assert [p.name for p in downloaded.rglob("model.pt")] == ["model.pt"]


def trial_runs(parent_run_id: str, tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def epochs_of(trial_run, cluster) -> int:
    """Epochs a trial has reported (its highest step of dev_macro_f1)."""
    return max(metric_steps(trial_run.info.run_id, "dev_macro_f1", cluster.tracking_uri), default=0)


TRIAL_CLASS = "ImplicitFunc"
"""The actor class Ray Tune runs a function trainable in."""


def test_tune_study_survives_a_lost_node_then_a_stopped_driver(cluster):
    epochs = 6
    # 2-CPU trials fit only the worker nodes (the head has 1 CPU): one trial on each
    arguments = ["python", "jobs/tune_emotion.py", "--num-samples", "2", "--grace-period", str(epochs), "--output-dir",
                 "runs/tune-faults", "--set", f"epochs={epochs}", "--set", "cpus_per_worker=2", *TINY_EMOTION]
    first = cluster.submit(*arguments)
    parent = wait_for(lambda: (job_runs(first, cluster.tracking_uri) or [None])[0], "the study's parent run")
    trials = lambda: trial_runs(parent, cluster.tracking_uri)  # noqa: E731
    wait_for(lambda: len(trials()) == 2 and all(epochs_of(r, cluster) >= 2 for r in trials()), "2 trials at epoch 2")
    names = {node: name for name, node in cluster.node_ids().items()}
    trial_nodes = {names.get(a["node_id"]) for a in cluster.actors(TRIAL_CLASS) if a["state"] == "ALIVE"}
    assert trial_nodes == {"w1", "w2"}, trial_nodes
    reached = {r.info.run_id: epochs_of(r, cluster) for r in trials()}
    killed_at = cluster.kill("w1")

    def resumed(run_id: str) -> list:
        return MlflowClient(cluster.tracking_uri).get_metric_history(run_id, "faults/resumed_from_epoch")

    # the trial of the lost node restarts from its checkpoint on w2, once w2's own trial is done
    restarted = wait_for(lambda: next((r.info.run_id for r in trials() if resumed(r.info.run_id)), None),
                         "a trial restarted from its checkpoint")
    after_node_loss = resumed(restarted)[0]
    cluster.jobs().stop_job(first)  # then the driver goes too
    assert cluster.wait_job(first) == "STOPPED"
    second = cluster.submit(*arguments, "--resume")
    assert cluster.wait_job(second) == "SUCCEEDED", cluster.jobs().get_job_logs(second)[-3000:]
    assert "resumed study emotion-tune-" in cluster.jobs().get_job_logs(second)
    assert job_runs(second, cluster.tracking_uri) == [parent]  # one parent run for the whole study
    assert len(trials()) == 2  # a restarted trial goes on in its own run
    for run in trials():
        assert set(metric_steps(run.info.run_id, "dev_macro_f1", cluster.tracking_uri)) == set(range(1, epochs + 1))
    run = MlflowClient(cluster.tracking_uri).get_run(parent)
    assert run.info.status == "FINISHED" and "best_dev_macro_f1" in run.data.metrics
    registry = ModelRegistry(cluster.tracking_uri)
    version = registry.register_model("emotion-tune-multinode", run_id=parent)  # the study's best model, in the server
    assert (registry.download_model(version.name, version.version)[1] / "config.json").is_file()
    report("tune", lost_node="w1", recovery_s=round(after_node_loss.timestamp / 1000 - killed_at, 1),
           epochs_redone=reached[restarted] - int(after_node_loss.value),
           resumes_after_driver_stop=sum(len(resumed(r.info.run_id)) for r in trials()) - 1)


def register_untrained_emotion(name: str, folder: Path, tracking_uri: str) -> None:
    """An untrained small emotion model registered @champion through the MLflow server (serving does not care how good it is)."""
    from mlplatform.emotion.data import load_corpus
    from mlplatform.emotion.model import EmotionClassifier
    from mlplatform.emotion.tokenizer import default_tokenizer
    from mlplatform.mlops.tracking import ExperimentTracker

    forty_writers = load_corpus(REPO / "tests/emotion/data/forty-writers")
    tokenizer = default_tokenizer([e.text for e in forty_writers if e.split == "train"], vocab_size=2000)
    EmotionClassifier.from_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with ExperimentTracker("serving-multinode", tracking_uri=tracking_uri) as tracker:
        tracker.log_artifact(folder, artifact_path="model")
    registry = ModelRegistry(tracking_uri)
    registry.set_alias(name, "champion", registry.register_model(name, run_id=tracker.run_id).version)


class Load:
    """Closed-loop clients posting one text each, counting answers and failures, until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        import threading

        self.url, self.stop = url, threading.Event()
        self.ok, self.failed, self.failures = 0, 0, []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        import urllib.error
        import urllib.request

        body = json.dumps({"text": "明日は友達と旅行に行くので楽しみ"}).encode()
        while not self.stop.is_set():
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    json.loads(response.read())
                self.ok += 1
            except (urllib.error.URLError, OSError, ValueError) as e:
                self.failed += 1
                self.failures.append(f"{time.time():.1f} {e}")

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)


def test_serve_replicas_of_a_lost_node_are_rescheduled_while_requests_go_on(cluster, tmp_path):
    import yaml

    from mlplatform.services import free_port

    register_untrained_emotion("emotion-serve", tmp_path / "model", cluster.tracking_uri)
    port = free_port()
    app = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{
               "name": "mlplatform", "route_prefix": "/", "import_path": "mlplatform.serving.app:build_app",
               "args": {"emotion_models": ["emotion-serve"], "policies": [], "tracking_uri": cluster.tracking_uri},
               "deployments": [
                   # the ingress stays on the head, beside the HTTP proxy: a lost node takes only model replicas with it
                   {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 0.01}}},
                   {"name": "Emotion-emotion-serve", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5},
                    "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "poll_interval_s": 30.0}},
               ]}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(app))
    deployed = cluster.fresh_shell(f".venv/bin/serve deploy {tmp_path / 'serve.yaml'} --address $RAY_ADDRESS")
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    url = f"http://127.0.0.1:{port}/v1/emotion/emotion-serve"
    replica_class = "ServeReplica:mlplatform:Emotion-emotion-serve"
    alive = lambda: [a for a in cluster.actors(replica_class) if a["state"] == "ALIVE"]  # noqa: E731
    wait_for(lambda: len(alive()) == 2 and answers(url), "two replicas answering", timeout_s=300, every_s=2)
    ids = {node: name for name, node in cluster.node_ids().items()}
    placed = sorted(ids[a["node_id"]] for a in alive())
    assert len(set(placed)) == 2, placed  # Serve spreads the replicas of a deployment over nodes
    lost = next(name for name in placed if name != "head")
    before = {a["actor_id"] for a in alive()}
    load = Load(url, clients=4)
    time.sleep(3)
    killed_at = cluster.kill(lost)
    replaced = wait_for(lambda: len(alive()) == 2 and {a["actor_id"] for a in alive()} != before, "a rescheduled replica",
                        timeout_s=180, every_s=1)
    recovered_at = time.time()
    time.sleep(3)
    load.finish()
    assert answers(url) and load.ok > 0
    assert all(ids.get(a["node_id"]) != lost for a in alive())
    report("serve", lost_node=lost, requests=load.ok + load.failed, failed=load.failed,
           replica_back_s=round(recovered_at - killed_at, 1), failures=load.failures[:3])
    assert load.failed == 0, load.failures[:5]
    assert replaced
    cluster.fresh_shell(".venv/bin/serve shutdown --yes --address $RAY_ADDRESS")


def answers(url: str) -> bool:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps({"text": "嬉しい"}).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False
