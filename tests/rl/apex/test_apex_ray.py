"""Ape-X on a real local Ray: the run solves CartPole while a worker and a shard are killed."""

import threading
import time

import ray
from mlflow.tracking import MlflowClient

from mlplatform.mlops.tracking import ExperimentTracker
from mlplatform.rl.apex.config import ApexConfig
from mlplatform.rl.apex.driver import train_apex


def kill_when_running(killed: list[str], stop: threading.Event) -> None:
    """Once the run's first worker and shard exist and the shard holds data, kill both."""
    wanted = ("worker-0.0", "shard-0.0")
    while not stop.is_set():
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        targets = [n for n in names if n.endswith(wanted)]
        shard = next((ray.get_actor(n) for n in targets if "shard" in n), None)
        # as soon as the shard holds data (its loss must be reported), long before CartPole is solved
        if len(targets) == 2 and ray.get(shard.stats.remote())["size"] > 0:
            for name in targets:
                ray.kill(ray.get_actor(name))
                killed.append(name)
            return
        time.sleep(0.05)


def test_apex_survives_a_dead_worker_and_shard_and_still_solves(local_ray, tmp_path):
    killed: list[str] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_when_running, args=(killed, stop), daemon=True)
    killer.start()
    tracker = ExperimentTracker("apex-faults", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    config = ApexConfig(seed=1, checkpoint_dir=str(tmp_path / "ckpt"), total_steps=150_000)
    with tracker:
        result = train_apex(config, tracker, progress=False)
    stop.set()

    assert len(killed) == 2, killed
    assert result.workers_replaced >= 1 and result.shards_replaced >= 1
    assert result.lost_transitions > 0  # reported, not silently ignored
    assert result.solved_at_step is not None, result.eval_history
    assert result.eval_history[-1][1] >= 475

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["faults/workers_replaced"] >= 1
    assert run.data.metrics["faults/shards_replaced"] >= 1
    assert run.data.metrics["eval/mean_return"] >= 475
    assert (tmp_path / "ckpt" / "latest.pt").is_file()
    # nothing of the run is left behind on the cluster
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith("apex-")]
