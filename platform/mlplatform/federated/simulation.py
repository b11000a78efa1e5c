"""The federated run: config, task and strategy from it, the client pool, rounds, logging and the saved model."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from mlplatform import storage
from mlplatform.cluster import connect_ray
from mlplatform.config import ConfigError, config_to_dict
from mlplatform.emotion.writers import (
    PRIVATE_TEST, inherited_provenance, overlapping_writers, private_clients_view, provenance, provenance_tags,
)
from mlplatform.federated.checkpoint import RoundState, load_round_state, save_round_state
from mlplatform.federated.client import FederatedClient, flat_weights, load_flat_weights
from mlplatform.federated.config import ClientConfig, FederatedConfig
from mlplatform.federated.partition import dirichlet_partition, iid_partition, writer_partition
from mlplatform.federated.pool import ClientPool
from mlplatform.federated.privacy import DifferentialPrivacy, dp_from_config
from mlplatform.federated.server import FaultPlan, FederatedServer, RoundReport
from mlplatform.federated.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy
from mlplatform.federated.task import EmotionTask, FederatedTask, NgramTask, Source
from mlplatform.mlops.figures import learning_curves_figure


@dataclasses.dataclass
class FederatedResult:
    """How a federated run ended."""

    rounds: int
    """Rounds run in all, those before a resume included."""
    seconds: float
    history: list[RoundReport]
    """The rounds this call ran."""
    test_metrics: dict[str, float]
    """On the test split (the public writers' in a run over private writers); ``start_*``: the starting model's."""
    private_test_metrics: dict[str, float]
    """On the private writers' own test split (a run over private writers): a measurement outside the DP guarantee."""
    epsilon: float | None
    noise_multiplier: float | None
    model_dir: Path
    stopped_by_budget: bool


def build_task(config: FederatedConfig) -> FederatedTask:
    """The task the config names, everything it needs read here and carried by value to the client actors.

    The examples, the tokenizer's and a local model's files travel inside the task; a registry
    URI is pinned to the version it names now, which each node downloads from the tracking server.
    With ``writers: private`` the clients hold the private writers' texts, evaluation reads the
    public writers', and the vocabulary is built from public texts only.

    Raises:
        ConfigError: under DP, a base model or tokenizer that already learnt from a client's writer.
    """
    from mlplatform.emotion.data import load_corpus

    examples = load_corpus(config.corpus)
    vocabulary_examples = [e for e in examples if e.split == "train"]
    if config.writers == "private":
        examples, vocabulary_examples = private_clients_view(examples, config.corpus)
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
        tokenizer = storage.portable(default_tokenizer([e.text for e in vocabulary_examples]).name_or_path)
    tokenizer_folder = storage.local_path(tokenizer)
    load_tokenizer(tokenizer_folder)  # a broken one fails here, in one line, not in every actor
    learnt_from = vocabulary_examples if config.tokenizer is None and model is None else []
    record = inherited_provenance(provenance(learnt_from, config.corpus), tokenizer_folder,
                                  storage.local_path(model) if model is not None else None)
    task = EmotionTask(tokenizer=tokenizer, model=model, examples=examples, max_length=config.max_length,
                       model_options={"hidden_size": config.hidden_size, "num_layers": config.num_layers},
                       train_head_only=config.train_head_only, provenance=record)
    if config.dp:
        check_public(record, task.train_writers(), config)
    return task


def check_public(record: dict[str, Any], client_writers: list[str], config: FederatedConfig) -> None:
    """Refuse a DP run whose starting point (model, vocabulary) learnt from a client's writer, unless the config accepts it."""
    overlap = overlapping_writers(record, client_writers)
    if overlap and config.public_data_overlap == "refuse":
        shown = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
        raise ConfigError(f"public_data_overlap: the base model or tokenizer ({config.model or config.tokenizer}) learnt "
                          f"from {len(overlap)} of the clients' writers ({shown}), so DP cannot protect them; train it on "
                          f"public writers (writers: public), or set public_data_overlap: accept for a run without a guarantee")


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
    return dp_from_config(config, inner) if config.dp else inner


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


def run_federated(config: FederatedConfig, tracker: Any | None = None, *, progress: bool = True,
                  resume: bool = False) -> FederatedResult:
    """Run a federation on the cluster in ``RAY_ADDRESS``, else on a fresh local one.

    After each round the global weights, the accountant's ledger and the metrics so far are saved
    (``<output_dir>/last_round.pt``, see :mod:`mlplatform.federated.checkpoint`).

    Args:
        config: the run's settings.
        tracker: an :class:`~mlplatform.mlops.tracking.ExperimentTracker` (None: log nowhere); on resume, the
            checkpoint's run (see :func:`~mlplatform.federated.checkpoint.resumed_run_id`).
        progress: show a progress line per round.
        resume: go on from the last round saved, up to ``config.rounds``; ε composes every round, before and after.

    Raises:
        ConfigError: a partition that cannot be made from the data, or ``resume`` with no checkpoint that fits.
    """
    start = time.perf_counter()
    task = build_task(config)  # data, tokenizer and partitions are checked before Ray starts
    try:
        partitions = build_partitions(config, task)
    except ValueError as e:
        raise ConfigError(f"partition: {e}") from None
    if config.dp and len(partitions) > config.num_clients:
        raise ConfigError(f"num_clients: the {config.partition} partition makes {len(partitions)} clients, more than "
                          f"num_clients={config.num_clients}, the public N of the DP denominator q·N")
    connect_ray()
    model, weights = initial_weights(task, config.seed)
    resumed = load_round_state(config, weights.size) if resume else None
    if resumed is not None and (resumed.accountant is not None) != config.dp:
        raise ConfigError(f"--resume: the checkpoint was made with dp: {not config.dp}, the config says dp: {config.dp}")

    def evaluate(flat: np.ndarray, split: str = "dev") -> dict[str, float]:
        load_flat_weights(model, flat)
        return task.evaluate(model, split)

    strategy = build_strategy(config, evaluate)
    server = FederatedServer(resumed.weights if resumed else weights, strategy, partitions, seed=config.seed,
                             server_learning_rate=config.server_learning_rate, max_update_norm=config.max_update_norm,
                             faults=FaultPlan(dropout_rate=config.dropout_rate, slow_rate=config.slow_rate,
                                              slowdown_s=config.slowdown_s, corrupt_rate=config.corrupt_rate,
                                              seed=config.seed))
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    pool = ClientPool(task, client_config(config), num_actors=config.num_actors or default_num_actors(), num_gpus=gpus)
    dp = strategy if isinstance(strategy, DifferentialPrivacy) else None
    if dp is not None and resumed is not None:
        dp.accountant.load_state_dict(resumed.accountant)
    if tracker is not None and resumed is None:  # a resumed run has its parameters logged already
        counted = {} if dp is not None else {"num_clients_actual": len(partitions)}  # under DP, N is the config's
        tracker.log_params(config_to_dict(config) | strategy.describe() | counted)
        if isinstance(task, EmotionTask) and task.provenance is not None:
            tracker.set_tags(provenance_tags(task.provenance))
    start_test = resumed.start_metrics if resumed else {
        split: evaluate(weights, split) for split in ("test", PRIVATE_TEST) if split in task.splits}
    logged = list(resumed.history) if resumed else []
    history: list[RoundReport] = []
    stopped_by_budget = False
    bar = tqdm(range(len(logged) + 1, config.rounds + 1), unit="round", disable=not progress)
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
            logged.append(report.metrics())
            if tracker is not None:  # once per round, so the store shows the run as it goes
                tracker.log_metrics(logged[-1], step=server_round)
                tracker.flush()
            save_round_state(config, RoundState(server_round, server.weights, logged, start_test,
                                                dp.accountant.state_dict() if dp else None, tracker.run_id if tracker else None))
    finally:
        pool.shutdown()
    final = {split: evaluate(server.weights, split) | {f"start_{k}": v for k, v in start.items()}
             for split, start in start_test.items()}
    test_metrics, private_test_metrics = final["test"], final.get(PRIVATE_TEST, {})
    model_dir = Path(config.output_dir).resolve()
    load_flat_weights(model, server.weights)
    task.save(model, model_dir)
    result = FederatedResult(
        rounds=len(logged), seconds=time.perf_counter() - start, history=history, test_metrics=test_metrics,
        private_test_metrics=private_test_metrics,
        epsilon=dp.accountant.epsilon() if dp else None, noise_multiplier=dp.noise_multiplier if dp else None,
        model_dir=model_dir, stopped_by_budget=stopped_by_budget,
    )
    (model_dir / "federated.json").write_text(json.dumps(_summary(config, result), indent=2) + os.linesep, encoding="utf-8")
    if tracker is not None:
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}
                            | {f"test_private/{k}": v for k, v in private_test_metrics.items()}, step=len(logged))
        if dp is not None:
            tracker.set_tags(guarantee_tags(config, result))
        if logged:
            tracker.log_figure(rounds_figure(logged), "plots/rounds.png")
        tracker.log_artifact(model_dir, "model")
    return result


ROUND_CURVES = {"eval/accuracy": "eval accuracy", "eval/macro_f1": "eval macro-F1", "train/loss": "train loss",
                "privacy/epsilon": "ε"}
"""The per-round figure's panels, from each round's logged metrics (under DP only what the guarantee covers)."""


def rounds_figure(history: list[dict[str, float]]) -> Figure:
    """Evaluation, training loss and ε after each round, one panel each; a round not evaluated is a gap."""
    curves = {label: [metrics.get(key, float("nan")) for metrics in history]
              for key, label in ROUND_CURVES.items() if any(key in metrics for metrics in history)}
    return learning_curves_figure(list(range(1, len(history) + 1)), curves, title="federated: rounds", xlabel="round")


def guarantee_tags(config: FederatedConfig, result: FederatedResult) -> dict[str, str]:
    """The DP guarantee a run gives, stated exactly, as tags its registered model versions carry."""
    if config.public_data_overlap == "accept":
        return {"dp.guarantee": "none: public_data_overlap: accept let the base model or vocabulary learn from clients"}
    return {
        "dp.guarantee": f"(ε = {result.epsilon:.3f}, δ = {config.delta:g})-DP for each private writer",
        "dp.epsilon": f"{result.epsilon:.4f}", "dp.delta": f"{config.delta:g}",
        "dp.unit": "one client = one writer of the corpus' private group; neighbouring runs add or remove one writer",
        "dp.mechanism": (f"DP-FedAvg: updates clipped to C = {config.clip_norm:g}, Gaussian noise z = {result.noise_multiplier:.4f}, "
                         f"sum over q·N with N = {config.num_clients} (public), {result.rounds} rounds"),
        "dp.sampling": f"Poisson, q = {config.sample_rate:g}, drawn with the noise from the OS CSPRNG (not the seed)",
        "dp.accountant": f"dp-accounting {config.accountant.upper()}, composed over the rounds run",
        "dp.released": "the model after each round, ε, the released update's norm, evaluation on public writers",
        "dp.not_covered": "test_private/* (a simulation measurement on the private writers); the base model and "
                          "vocabulary's training (public writers only, checked); timing side channels",
    }


def _progress_line(report: RoundReport) -> str:
    parts = [] if report.epsilon is not None else [f"used {report.used}/{report.sampled}", f"loss {report.train_loss:.3f}"]
    if "accuracy" in report.evaluation:
        parts.append(f"dev acc {report.evaluation['accuracy']:.3f}")
    if report.epsilon is not None:
        parts.append(f"ε {report.epsilon:.2f}")
    return ", ".join(parts)


def _summary(config: FederatedConfig, result: FederatedResult) -> dict[str, Any]:
    return {"config": config_to_dict(config), "rounds": result.rounds, "test": result.test_metrics,
            "test_private": result.private_test_metrics,
            "epsilon": result.epsilon, "delta": config.delta if config.dp else None,
            "noise_multiplier": result.noise_multiplier, "stopped_by_budget": result.stopped_by_budget}
