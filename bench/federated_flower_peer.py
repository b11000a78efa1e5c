"""Peer of bench/federated.py: the same federated n-gram run on Flower's simulation engine; prints one JSON line."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Iterable
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.simulation import run_simulation
from sklearn.metrics import f1_score
from torch import nn

client_app = ClientApp()


@functools.cache
def load_data(path: str) -> dict[str, np.ndarray]:
    """The bench's exported features, labels, partitions and schedule, read once per process (each Ray actor)."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def partition(data: dict[str, np.ndarray], client: int) -> np.ndarray:
    """Indices into the training split of one client (partitions are stored concatenated with their offsets)."""
    return data["partition_indices"][data["partition_offsets"][client]: data["partition_offsets"][client + 1]]


def build_model(data: dict[str, np.ndarray]) -> nn.Linear:
    """Softmax regression with the initial weights our side starts from."""
    model = nn.Linear(data["weight"].shape[1], data["weight"].shape[0])
    model.load_state_dict({"weight": torch.from_numpy(data["weight"]), "bias": torch.from_numpy(data["bias"])})
    return model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD on the partition the server named, from the global weights; replies with weights and example count."""
    config = msg.content["config"]
    data = load_data(str(config["data"]))
    indices = partition(data, int(config["partition-id"]))
    model = build_model(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(data["x_train"][indices]),
                                             torch.from_numpy(data["y_train"][indices]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(config["batch-size"]), shuffle=True,
                                         generator=torch.Generator().manual_seed(int(config["shuffle-seed"])))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    model.train()
    total_loss, seen = 0.0, 0
    for _ in range(int(config["local-epochs"])):
        for features, labels in loader:
            loss = nn.functional.cross_entropy(model(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
    metrics = MetricRecord({"train_loss": total_loss / seen, "num-examples": len(indices)})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


class ScheduledFedAvg(FedAvg):
    """FedAvg that trains, in round r, the partitions our simulation samples in round r with its shuffling seeds."""

    def __init__(self, schedule: np.ndarray, seeds: np.ndarray, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.schedule, self.seeds = schedule, seeds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        clients, seeds = self.schedule[server_round - 1], self.seeds[server_round - 1]
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, len(clients))
        messages = []
        for node_id, client, seed in zip(node_ids, clients, seeds):
            node_config = ConfigRecord({**config, "server-round": server_round, "partition-id": int(client),
                                        "shuffle-seed": int(seed)})
            messages.append(Message(content=RecordDict({"arrays": arrays, "config": node_config}),
                                    message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages


@torch.no_grad()
def evaluate(model: nn.Linear, features: np.ndarray, labels: np.ndarray, batch_size: int = 128) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on one split, in batches of 128 like our task's evaluate."""
    model.eval()
    batches = range(0, len(features), batch_size)
    logits = torch.cat([model(torch.from_numpy(features[i: i + batch_size])) for i in batches])
    predicted, truth = logits.argmax(dim=-1).numpy(), labels
    return {"loss": float(nn.functional.cross_entropy(logits, torch.from_numpy(labels))),
            "accuracy": float((predicted == truth).mean()),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help=".npz written by bench/federated.py")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--local-epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--num-cpus", type=int, required=True, help="Ray CPUs; each client actor takes one")
    args = parser.parse_args()
    data = load_data(args.data)
    num_clients = len(data["partition_offsets"]) - 1
    model = build_model(data)
    round_ends: list[float] = []
    outcome: dict[str, Any] = {}

    def evaluate_dev(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, data["x_dev"], data["y_dev"])
        round_ends.append(time.perf_counter())  # round 0 is the initial model's evaluation
        return MetricRecord(metrics)

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        strategy = ScheduledFedAvg(data["schedule"], data["seeds"], fraction_evaluate=0.0,
                                   min_available_nodes=num_clients)
        train_config = ConfigRecord({"data": args.data, "lr": args.lr, "batch-size": args.batch_size,
                                     "local-epochs": args.local_epochs})
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=args.rounds,
                                train_config=train_config, evaluate_fn=evaluate_dev)
        outcome["dev"] = dict(result.evaluate_metrics_serverapp[args.rounds])
        model.load_state_dict(result.arrays.to_torch_state_dict())
        outcome["test"] = evaluate(model, data["x_test"], data["y_test"])

    backend_config = {"init_args": {"address": "local", "num_cpus": args.num_cpus, "include_dashboard": False,
                                    "log_to_driver": False},
                      "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config=backend_config)
    total = time.perf_counter() - start
    seconds = np.diff(round_ends).tolist()
    print(json.dumps({"s_per_round_steady": statistics.median(seconds[1:]), "first_round_s": seconds[0],
                      "round_seconds": seconds, "total_s": total, "dev": outcome["dev"], "test": outcome["test"],
                      "versions": {name: version(name) for name in ("flwr", "ray", "torch", "numpy")}}))


if __name__ == "__main__":
    import federated_flower_peer  # the actors unpickle the ClientApp by module name, keeping load_data's cache

    federated_flower_peer.main()
