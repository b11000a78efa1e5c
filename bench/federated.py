"""Benchmark: seconds per federated round, our Ray simulation vs Flower's simulation engine, as one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from mlplatform.federated.simulation import (
    FederatedConfig, build_partitions, build_strategy, build_task, initial_weights, run_federated,
)

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / ".peers"
PEER_VENV = PEERS / "flwr-venv"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_SCRIPT = BENCH / "federated_flower_peer.py"
CONSTRAINTS = BENCH.parent / "constraints.txt"
PEER_REQUIREMENTS = ["flwr[simulation]==1.42.0", "torch", "scikit-learn"]  # torch pinned by constraints.txt
TARGET_RATIO = 0.5
NOTES = (
    "Both sides: the ngram task (nn.Linear(4096, 8) on hashed char 1-3-grams of the bundled corpus, labelled "
    "examples only), the same Dirichlet(0.5) partitions of the train split over 100 clients, the same 10 clients "
    "each round (ours samples them; Flower's strategy sends each sampled node one of those partition ids in its "
    "train config, with our shuffling seed for that client and round), the same initial weights, local SGD lr 5.0, "
    "batch 16, 2 epochs, example-weighted FedAvg, and a centralized dev-split evaluation after every round (loss, "
    "accuracy, macro-F1; Flower: evaluate_fn, no client-side evaluation). Ray with the same CPU count on both sides, "
    "one CPU per client actor. Flower gets features precomputed by our task in an .npz that each of its actors loads "
    "once. A round's seconds run from the end of one round's evaluation to the end of the next (so they include "
    "evaluation); steady = median of rounds 2..N, as round 1 includes actor start-up. total_s: ray.init (Flower: "
    "run_simulation) to the end of the run, Ray shutdown included. dev/test: the final global model. Flower 1.42's "
    "simulation engine polls twice per round trip, every 0.1 s each (the engine's queue of pending messages, and "
    "InMemoryGrid.pull_interval for replies; neither settable through run_simulation), so its rounds come in steps "
    "of about 0.1 s. load_avg_1m: the machine's load when the bench started (2 cores, shared)."
)


def log(message: str) -> None:
    print(f"[federated-bench] {message}", file=sys.stderr, flush=True)


class RoundClock:
    """A tracker for ``run_federated`` that notes when each round (training and evaluation) has ended."""

    def __init__(self) -> None:
        self.ends: list[float] = []  # [0]: when the run was set up, just before round 1

    def log_params(self, params: dict[str, Any]) -> None:
        self.ends.append(time.perf_counter())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "perf/round_seconds" in metrics:  # a round's line, not the final test metrics
            self.ends.append(time.perf_counter())

    def log_artifact(self, path: str | Path, name: str) -> None: ...


def ensure_peer() -> Path:
    """The peer's virtual environment under bench/.peers/, built with pip on first use (or when its packages change)."""
    stamp = PEER_VENV / "bench-requirements.txt"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if PEER_PYTHON.exists() and stamp.exists() and stamp.read_text() == wanted:
        return PEER_PYTHON
    log(f"building {PEER_VENV} with {PEER_REQUIREMENTS}")
    pip = [str(PEER_PYTHON), "-m", "pip", "install", "--quiet", "--constraint", str(CONSTRAINTS)]
    steps = [[sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], [*pip, *PEER_REQUIREMENTS]]
    for step in steps:
        if subprocess.run(step, check=False, stdout=sys.stderr, stderr=sys.stderr).returncode != 0:
            sys.exit(f"federated.py: could not build the Flower peer's venv ({' '.join(step)}); or pass --skip-peer")
    stamp.write_text(wanted)
    return PEER_PYTHON


def export(config: FederatedConfig, path: Path) -> None:
    """Our task's features, partitions, per-round client samples and initial weights, for the peer."""
    task = build_task(config)
    partitions = build_partitions(config, task)
    strategy = build_strategy(config)
    # Drawn as our server draws them each round: the same clients, shuffling their data alike, on both sides.
    schedule = [strategy.configure_fit(r, len(partitions), np.random.default_rng([config.seed, r, 1]))
                for r in range(1, config.rounds + 1)]
    seeds = [[np.random.SeedSequence([config.seed, r, c]).generate_state(1)[0] for c in clients]
             for r, clients in enumerate(schedule, start=1)]
    model, _ = initial_weights(task, config.seed)
    splits = {}
    for split in ("train", "dev", "test"):
        dataset = task.dataset(split)
        batch = next(iter(task.loader(dataset, batch_size=len(dataset))))
        splits[f"x_{split}"], splits[f"y_{split}"] = batch["features"].numpy(), batch["labels"].numpy()
    np.savez(path, **splits, partition_indices=np.concatenate(partitions),
             partition_offsets=np.cumsum([0] + [len(p) for p in partitions]), schedule=np.array(schedule),
             seeds=np.array(seeds, dtype=np.int64),
             weight=model.linear.weight.detach().numpy(), bias=model.linear.bias.detach().numpy())


def summarize(seconds: list[float], total: float, dev: dict[str, float], test: dict[str, float]) -> dict[str, Any]:
    return {"s_per_round_steady": round(statistics.median(seconds[1:]), 4), "first_round_s": round(seconds[0], 3),
            "total_s": round(total, 2), "dev_accuracy": round(dev["accuracy"], 4),
            "test_accuracy": round(test["accuracy"], 4), "test_macro_f1": round(test["macro_f1"], 4),
            "round_s": [round(s, 3) for s in seconds]}


def run_ours(config: FederatedConfig, num_cpus: int) -> dict[str, Any]:
    clock = RoundClock()
    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        result = run_federated(config, clock, progress=False)
    finally:
        ray.shutdown()
    total = time.perf_counter() - start
    return summarize(np.diff(clock.ends).tolist(), total, result.history[-1].evaluation, result.test_metrics)


def run_peer(python: Path, data: Path, config: FederatedConfig, num_cpus: int) -> tuple[dict[str, Any], dict[str, str]]:
    command = [str(python), str(PEER_SCRIPT), "--data", str(data), "--rounds", str(config.rounds),
               "--local-epochs", str(config.local_epochs), "--batch-size", str(config.batch_size),
               "--lr", str(config.learning_rate), "--num-cpus", str(num_cpus)]
    done = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.exit(f"federated.py: the Flower peer failed (exit {done.returncode})")
    peer = json.loads(lines[-1])
    return summarize(peer["round_seconds"], peer["total_s"], peer["dev"], peer["test"]), peer["versions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="rounds per side (steady state: rounds 2..N)")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs per side; one per client actor")
    parser.add_argument("--skip-peer", action="store_true", help="measure ours only")
    args = parser.parse_args()
    load = round(os.getloadavg()[0], 2)
    peer_python = None if args.skip_peer else ensure_peer()
    with tempfile.TemporaryDirectory() as folder:
        config = FederatedConfig(task="ngram", num_clients=100, partition="dirichlet", alpha=0.5, fraction_fit=0.1,
                                 local_epochs=2, batch_size=16, learning_rate=5.0, optimizer="sgd", rounds=args.rounds,
                                 seed=0, output_dir=str(Path(folder) / "model"), num_actors=args.cpus)
        ours = run_ours(config, args.cpus)
        log(f"ours: {ours}")
        report: dict[str, Any] = {"bench": "federated_ngram", "ours": ours}
        versions = {"python": platform.python_version(),
                    "ours": {name: version(name) for name in ("ray", "torch", "numpy")}}
        if peer_python is not None:
            data = Path(folder) / "federation.npz"
            export(config, data)
            report["flower"], versions["flower"] = run_peer(peer_python, data, config, args.cpus)
            log(f"flower: {report['flower']}")
            ratio = ours["s_per_round_steady"] / report["flower"]["s_per_round_steady"]
            report |= {"ratio": round(ratio, 3), "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO}
    report["settings"] = {
        "task": config.task, "num_features": config.num_features, "num_clients": config.num_clients,
        "partition": f"{config.partition}(alpha={config.alpha})",
        "clients_per_round": round(config.fraction_fit * config.num_clients), "local_epochs": config.local_epochs,
        "batch_size": config.batch_size, "optimizer": f"{config.optimizer}(lr={config.learning_rate})",
        "rounds": config.rounds, "ray_cpus": args.cpus, "client_actors": args.cpus, "seed": config.seed,
        "torch_threads_driver": torch.get_num_threads(), "load_avg_1m": load,
    }
    report["versions"] = versions
    report["notes"] = NOTES
    print(json.dumps(report))


if __name__ == "__main__":
    main()
