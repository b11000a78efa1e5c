"""The federated run: config, task and strategy from it, the client pool, rounds, logging and the saved model."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import ray
import torch
from pydantic.dataclasses import dataclass
from tqdm.auto import tqdm

from mlplatform import storage
from mlplatform.cluster import connect_ray
from mlplatform.config import RUN_CONFIG, ConfigError, config_to_dict
from mlplatform.federated.client import ClientConfig, FederatedClient, flat_weights, load_flat_weights
from mlplatform.federated.partition import dirichlet_partition, iid_partition, writer_partition
from mlplatform.federated.pool import ClientPool
from mlplatform.federated.privacy import DifferentialPrivacy, noise_multiplier_for
from mlplatform.federated.server import FaultPlan, FederatedServer, RoundReport
from mlplatform.federated.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy
from mlplatform.federated.task import EmotionTask, FederatedTask, NgramTask, Source


@dataclass(config=RUN_CONFIG)
class FederatedConfig(ClientConfig):
    """One federated run; every field can be set from YAML or ``--set key=value`` (client fields included)."""

    task: Literal["ngram", "emotion"] = "ngram"
    """ngram: softmax regression on hashed character n-grams (tiny, fast); emotion: the BERT emotion classifier."""
    corpus: str | None = None
    """JSONL file or folder of labelled texts; None uses the bundled emotion corpus."""
    model: str | None = None
    """emotion task: the model to fine-tune: a folder, a hub name or a registry URI (models:/emotion@champion); None builds the small default BERT."""
    tokenizer: str | None = None
    """emotion task: tokenizer path or hub name; None uses the model's own, or trains the project's WordPiece vocabulary."""
    num_features: int = pydantic.Field(4096, ge=8)
    """ngram task: hash buckets."""
    hidden_size: int = pydantic.Field(128, ge=8)
    """emotion task: width of the default model."""
    num_layers: int = pydantic.Field(2, ge=1)
    """emotion task: layers of the default model."""
    max_length: int = pydantic.Field(128, ge=8)
    """emotion task: tokens per text."""
    train_head_only: bool = False
    """emotion task: federate only the classification head (the encoder stays as loaded); keeps DP noise small."""
    partition: Literal["iid", "dirichlet", "writer"] = "dirichlet"
    """How the training split is dealt to clients; writer gives each writer id its own client."""
    num_clients: int = pydantic.Field(100, ge=1)
    """Virtual clients (iid and dirichlet; writer makes one per writer)."""
    alpha: float = pydantic.Field(0.5, gt=0.0)
    """Dirichlet concentration: small is skewed, large approaches IID."""
    rounds: int = pydantic.Field(50, ge=1)
    """Rounds to run (a DP budget may stop the run sooner)."""
    strategy: Literal["fedavg", "fedprox", "median", "trimmed_mean"] = "fedavg"
    """Aggregation rule (under DP the clipped fixed-denominator mean replaces it)."""
    fraction_fit: float = pydantic.Field(0.1, gt=0.0, le=1.0)
    """Share of clients sampled per round (without DP)."""
    min_fit_clients: int = pydantic.Field(2, ge=1)
    """Fewest updates a round needs before the model moves (without DP)."""
    proximal_mu: float = pydantic.Field(0.01, ge=0.0)
    """FedProx's μ."""
    trim_beta: float = pydantic.Field(0.2, ge=0.0, lt=0.5)
    """Trimmed mean: share cut from each end per coordinate."""
    server_learning_rate: float = pydantic.Field(1.0, gt=0.0)
    """Step size on the aggregated update."""
    round_deadline_s: float | None = pydantic.Field(None, gt=0.0)
    """Seconds after which a round aggregates what has arrived; None waits for every client."""
    dropout_rate: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    """Injected: chance that a sampled client never replies."""
    slow_rate: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    """Injected: chance that a sampled client is slowed by slowdown_s."""
    slowdown_s: float = pydantic.Field(0.0, ge=0.0)
    """Injected delay of a slowed client."""
    corrupt_rate: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    """Injected: chance that a sampled client sends NaN instead of its update."""
    max_update_norm: float | None = pydantic.Field(None, gt=0.0)
    """Reject client updates longer than this (non-finite updates are always rejected)."""
    dp: bool = False
    """DP-FedAvg: Poisson sampling, clipping, Gaussian noise and an accountant."""
    noise_multiplier: float | None = pydantic.Field(None, ge=0.0)
    """z; None computes the smallest z for target_epsilon over all rounds."""
    clip_norm: float = pydantic.Field(1.0, gt=0.0)
    """C, the L2 bound on each client's update."""
    sample_rate: float = pydantic.Field(0.1, gt=0.0, le=1.0)
    """q, each client's chance of joining a DP round."""
    delta: float = pydantic.Field(1e-5, gt=0.0, lt=1.0)
    """δ of the (ε, δ) guarantee."""
    target_epsilon: float | None = pydantic.Field(None, gt=0.0)
    """Stop before ε would pass this."""
    accountant: Literal["pld", "rdp"] = "pld"
    """pld (tightest) or rdp."""
    num_actors: int | None = pydantic.Field(None, ge=1)
    """Client actors in the pool; None uses one per CPU (or per GPU) of the cluster."""
    eval_every: int = pydantic.Field(1, ge=1)
    """Rounds between evaluations on the dev split (the last round is always evaluated, on test too)."""
    seed: int = 0
    """Seeds the partition, sampling, faults, local shuffling and the initial model."""
    output_dir: str = "runs/federated"
    """Folder for the final model, written by the driver (made absolute)."""
    experiment_name: str = "federated"
    """MLflow experiment the run is logged under."""

    @pydantic.model_validator(mode="after")
    def _dp_has_noise(self) -> FederatedConfig:
        if self.dp and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dp needs noise_multiplier or target_epsilon")
        if self.strategy == "fedprox" and self.optimizer == "sgd" and self.proximal_mu * self.learning_rate >= 2:
            # SGD on the proximal term alone multiplies the distance to the global model by (1 - lr·μ) each step
            raise ValueError(f"fedprox with sgd diverges when proximal_mu * learning_rate >= 2, got "
                             f"{self.proximal_mu} * {self.learning_rate}")
        return self


@dataclasses.dataclass
class FederatedResult:
    """How a federated run ended."""

    rounds: int
    seconds: float
    history: list[RoundReport]
    test_metrics: dict[str, float]
    epsilon: float | None
    noise_multiplier: float | None
    model_dir: Path
    stopped_by_budget: bool


def build_task(config: FederatedConfig) -> FederatedTask:
    """The task the config names, everything it needs read here and carried by value to the client actors.

    The examples, the tokenizer's files and a local model's files travel inside the task; a registry
    URI is pinned to the version it names now, which each node downloads from the tracking server.
    """
    from mlplatform.emotion.data import load_corpus

    examples = load_corpus(config.corpus)
    if config.task == "ngram":
        return NgramTask(examples=examples, num_features=config.num_features)
    from mlplatform.emotion.tokenizer import default_tokenizer, load_tokenizer

    model = model_source(config.model)
    if config.tokenizer is not None:
        load_tokenizer(config.tokenizer)
        tokenizer = storage.portable(config.tokenizer)
    elif model is not None:  # a model's own folder or hub name carries the tokenizer it was trained with
        tokenizer = model
    else:
        tokenizer = storage.portable(default_tokenizer([e.text for e in examples if e.split == "train"]).name_or_path)
    load_tokenizer(storage.local_path(tokenizer))  # a broken one fails here, in one line, not in every actor
    return EmotionTask(tokenizer=tokenizer, model=model, examples=examples, max_length=config.max_length,
                       model_options={"hidden_size": config.hidden_size, "num_layers": config.num_layers},
                       train_head_only=config.train_head_only)


def model_source(model: str | None) -> Source | None:
    """``model`` in a form every node can use: a registry URI pinned to its version now, a local folder's files, a hub name."""
    if model is not None and model.startswith("models:/"):
        from mlplatform.mlops.registry import ModelRegistry

        return ModelRegistry().pinned(model)
    return storage.portable(model) if model is not None else None


def build_partitions(config: FederatedConfig, task: FederatedTask) -> list[np.ndarray]:
    """Each client's indices into the task's training split."""
    if config.partition == "writer":
        return writer_partition(task.train_writers())[0]
    if config.partition == "iid":
        return iid_partition(len(task.train_examples()), config.num_clients, seed=config.seed)
    return dirichlet_partition(task.train_labels(), config.num_clients, alpha=config.alpha, seed=config.seed)


def build_strategy(config: FederatedConfig, evaluate_fn: Any = None) -> Strategy:
    """The strategy the config names, wrapped in DifferentialPrivacy when ``dp`` is on."""
    common = {"fraction_fit": config.fraction_fit, "min_fit_clients": config.min_fit_clients,
              "evaluate_fn": evaluate_fn, "evaluate_every": config.eval_every}
    inner: Strategy = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(proximal_mu=config.proximal_mu, **common),
        "median": lambda: FedMedian(**common),
        "trimmed_mean": lambda: FedTrimmedAvg(beta=config.trim_beta, **common),
    }[config.strategy]()
    if not config.dp:
        return inner
    noise = config.noise_multiplier
    if noise is None:
        noise = noise_multiplier_for(target_epsilon=config.target_epsilon, delta=config.delta, rounds=config.rounds,
                                     sample_rate=config.sample_rate, kind=config.accountant)
    return DifferentialPrivacy(inner, noise_multiplier=noise, clip_norm=config.clip_norm, sample_rate=config.sample_rate,
                               delta=config.delta, target_epsilon=config.target_epsilon, accountant=config.accountant)


def client_config(config: FederatedConfig) -> ClientConfig:
    """The local-training part of a federated config."""
    return ClientConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ClientConfig)})


def initial_weights(task: FederatedTask, seed: int) -> tuple[torch.nn.Module, np.ndarray]:
    """The server's model, seeded, and its flat weights."""
    torch.manual_seed(seed)
    model = task.build_model()
    return model, flat_weights(model)


def train_centralized(config: FederatedConfig, *, epochs: int) -> dict[str, float]:
    """The baseline a federation is judged against: the same model, data and local settings on one machine.

    One client holding every training example for ``epochs`` passes is exactly centralized training.
    """
    task = build_task(config)
    model, weights = initial_weights(task, config.seed)
    client = FederatedClient(task, dataclasses.replace(client_config(config), local_epochs=epochs))
    result = client.fit(0, weights, np.arange(len(task.train_examples())), seed=config.seed)
    load_flat_weights(model, weights + result.delta)
    return task.evaluate(model, "test")


def default_num_actors() -> int:
    """One client actor per GPU if the cluster has GPUs, else one per CPU."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 1)))


def run_federated(config: FederatedConfig, tracker: Any | None = None, *, progress: bool = True) -> FederatedResult:
    """Run a federation on the cluster in ``RAY_ADDRESS``, else on a fresh local one.

    Args:
        config: the run's settings.
        tracker: an :class:`~mlplatform.mlops.tracking.ExperimentTracker` (None: log nowhere).
        progress: show a progress line per round.

    Raises:
        ConfigError: a partition that cannot be made from the data.
    """
    start = time.perf_counter()
    task = build_task(config)  # data, tokenizer and partitions are checked before Ray starts
    try:
        partitions = build_partitions(config, task)
    except ValueError as e:
        raise ConfigError(f"partition: {e}") from None
    connect_ray()
    model, weights = initial_weights(task, config.seed)

    def evaluate(flat: np.ndarray, split: str = "dev") -> dict[str, float]:
        load_flat_weights(model, flat)
        return task.evaluate(model, split)

    strategy = build_strategy(config, evaluate)
    server = FederatedServer(weights, strategy, partitions, seed=config.seed, server_learning_rate=config.server_learning_rate,
                             max_update_norm=config.max_update_norm,
                             faults=FaultPlan(dropout_rate=config.dropout_rate, slow_rate=config.slow_rate,
                                              slowdown_s=config.slowdown_s, corrupt_rate=config.corrupt_rate,
                                              seed=config.seed))
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    pool = ClientPool(task, client_config(config), num_actors=config.num_actors or default_num_actors(), num_gpus=gpus)
    dp = strategy if isinstance(strategy, DifferentialPrivacy) else None
    if tracker is not None:
        tracker.log_params(config_to_dict(config) | strategy.describe() | {"num_clients_actual": len(partitions)})
    history: list[RoundReport] = []
    stopped_by_budget = False
    bar = tqdm(range(1, config.rounds + 1), unit="round", disable=not progress)
    try:
        for server_round in bar:
            if dp is not None and not dp.budget_allows_round():
                stopped_by_budget = True
                break
            report = server.run_round(server_round, pool, deadline_s=config.round_deadline_s)
            report.evaluation = strategy.evaluate(server_round, server.weights) or {}
            report.actor_memory_mb = pool.resident_bytes() / 2**20
            history.append(report)
            bar.set_postfix_str(_progress_line(report), refresh=False)
            if tracker is not None:  # once per round, so the store shows the run as it goes
                tracker.log_metrics(report.metrics(), step=server_round)
                tracker.flush()
    finally:
        pool.shutdown()
    test_metrics = evaluate(server.weights, "test")
    model_dir = Path(config.output_dir).resolve()
    load_flat_weights(model, server.weights)
    task.save(model, model_dir)
    result = FederatedResult(
        rounds=len(history), seconds=time.perf_counter() - start, history=history, test_metrics=test_metrics,
        epsilon=dp.accountant.epsilon() if dp else None, noise_multiplier=dp.noise_multiplier if dp else None,
        model_dir=model_dir, stopped_by_budget=stopped_by_budget,
    )
    (model_dir / "federated.json").write_text(json.dumps(_summary(config, result), indent=2) + os.linesep, encoding="utf-8")
    if tracker is not None:
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, step=len(history))
        tracker.log_artifact(model_dir, "model")
    return result


def _progress_line(report: RoundReport) -> str:
    parts = [f"used {report.used}/{report.sampled}", f"loss {report.train_loss:.3f}"]
    if "accuracy" in report.evaluation:
        parts.append(f"dev acc {report.evaluation['accuracy']:.3f}")
    if report.epsilon is not None:
        parts.append(f"ε {report.epsilon:.2f}")
    return ", ".join(parts)


def _summary(config: FederatedConfig, result: FederatedResult) -> dict[str, Any]:
    return {"config": config_to_dict(config), "rounds": result.rounds, "test": result.test_metrics,
            "epsilon": result.epsilon, "delta": config.delta if config.dp else None,
            "noise_multiplier": result.noise_multiplier, "stopped_by_budget": result.stopped_by_budget}
