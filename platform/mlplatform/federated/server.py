"""``FederatedServer``: holds the global model and runs rounds (sample, inject faults, train, validate, aggregate)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from mlplatform.federated.aggregate import update_problem
from mlplatform.federated.pool import ClientJob, ClientPool
from mlplatform.federated.privacy import DifferentialPrivacy
from mlplatform.federated.strategy import Failure, Strategy


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Seeded, reproducible fault injection: which sampled clients drop out, straggle or send garbage, per round.

    Args:
        dropout_rate: chance that a sampled client never replies.
        slow_rate: chance that a sampled client is slowed down by ``slowdown_s`` seconds.
        slowdown_s: the injected delay.
        corrupt_rate: chance that a sampled client sends NaN instead of its update.
        seed: the same seed and round always give the same faults.
    """

    dropout_rate: float = 0.0
    slow_rate: float = 0.0
    slowdown_s: float = 0.0
    corrupt_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.dropout_rate, self.slow_rate, self.corrupt_rate)
        if not (all(0 <= r <= 1 for r in rates) and self.slowdown_s >= 0):
            raise ValueError(f"need rates in [0, 1] and slowdown_s >= 0, got dropout_rate={self.dropout_rate}, "
                             f"slow_rate={self.slow_rate}, corrupt_rate={self.corrupt_rate}, slowdown_s={self.slowdown_s}")

    def jobs(self, server_round: int, clients: list[int], partitions: list[np.ndarray], seed: int) -> tuple[list[ClientJob], list[int]]:
        """The jobs of the clients that stay (some slowed, some corrupt) and the ids of those that drop out."""
        rng = np.random.default_rng([self.seed, server_round, 2])
        drops, slows, corrupts = rng.random((3, len(clients)))
        jobs = [
            ClientJob(c, partitions[c], seed=int(np.random.SeedSequence([seed, server_round, c]).generate_state(1)[0]),
                      slowdown_s=self.slowdown_s if slow < self.slow_rate else 0.0, corrupt=bool(corrupt < self.corrupt_rate))
            for c, drop, slow, corrupt in zip(clients, drops, slows, corrupts) if drop >= self.dropout_rate
        ]
        return jobs, [c for c, drop in zip(clients, drops) if drop < self.dropout_rate]


@dataclasses.dataclass
class RoundReport:
    """What one round did: client counts by outcome, loss, update size, time, ε and evaluation."""

    server_round: int
    sampled: int
    used: int
    dropped: int
    late: int
    rejected: int
    errors: int
    retried: int
    """Clients whose actor died mid-round and that trained again on another actor."""
    actors_replaced: int
    """Client actors replaced so far (lost with their node or process): a fact of the cluster, not of the data."""
    aggregated: bool
    train_loss: float
    update_norm: float
    seconds: float
    epsilon: float | None = None
    actor_memory_mb: float | None = None
    evaluation: dict[str, float] = dataclasses.field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat, namespaced metrics for the tracker; under DP only what the guarantee covers (`released_metrics`)."""
        if self.epsilon is not None:
            return released_metrics(self)
        values = {
            "clients/sampled": self.sampled, "clients/used": self.used, "clients/dropped": self.dropped,
            "clients/late": self.late, "clients/rejected": self.rejected, "clients/errors": self.errors,
            "clients/retried": self.retried, "faults/actors_replaced": self.actors_replaced,
            "train/loss": self.train_loss, "train/update_norm": self.update_norm, "perf/round_seconds": self.seconds,
        }
        if self.actor_memory_mb is not None:
            values["perf/actor_memory_mb"] = self.actor_memory_mb
        return values | {f"eval/{k}": v for k, v in self.evaluation.items()}


def released_metrics(report: RoundReport) -> dict[str, float]:
    """What a DP round may publish: ε, the norm of the released update (a function of the released model), the
    client actors replaced (a fact of the cluster) and the evaluation, which a DP run makes on public data only.

    Counts of sampled, late, rejected or failed clients, their training loss and the round's duration
    are functions of the private data that the accountant does not cover, so they stay in the run.
    """
    return {"privacy/epsilon": report.epsilon, "train/update_norm": report.update_norm,
            "faults/actors_replaced": report.actors_replaced} | {
        f"eval/{k}": v for k, v in report.evaluation.items()}


class FederatedServer:
    """The global model (a flat weight vector) and the rounds that move it.

    Each round the strategy chooses clients, the fault plan drops or slows some, the pool trains the
    rest until the deadline, updates with NaN/Inf or a norm beyond ``max_update_norm`` are rejected,
    and the strategy aggregates the remainder (None keeps the model). Under DP nothing is rejected:
    the mechanism zeroes a non-finite update and clips the rest, so no published count depends on them.

    Args:
        weights: the initial global weights.
        strategy: FedAvg, FedProx, a robust rule, or any of them wrapped in DifferentialPrivacy.
        partitions: each virtual client's indices into the task's training split.
        seed: seeds client sampling (a DP strategy samples from its own secret source) and local shuffling.
        server_learning_rate: step size on the aggregated update (1.0 is plain FedAvg).
        max_update_norm: reject updates longer than this (None accepts any finite one).
        faults: injected dropout and slowdown.
    """

    def __init__(
        self,
        weights: np.ndarray,
        strategy: Strategy,
        partitions: list[np.ndarray],
        *,
        seed: int = 0,
        server_learning_rate: float = 1.0,
        max_update_norm: float | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        self.weights = np.asarray(weights, dtype=np.float32).copy()
        self.strategy = strategy
        self.partitions = partitions
        self.seed = seed
        self.server_learning_rate = server_learning_rate
        self.max_update_norm = max_update_norm
        self.faults = faults or FaultPlan(seed=seed)
        if isinstance(strategy, DifferentialPrivacy):
            strategy.model_size = self.weights.size

    def run_round(self, server_round: int, pool: ClientPool, *, deadline_s: float | None = None) -> RoundReport:
        """Run one round on ``pool`` and move the global weights."""
        start = time.perf_counter()
        sampled = self.strategy.configure_fit(server_round, len(self.partitions), np.random.default_rng([self.seed, server_round, 1]))
        jobs, dropped = self.faults.jobs(server_round, sampled, self.partitions, self.seed)
        proximal_mu = self.strategy.fit_config(server_round).get("proximal_mu", 0.0)
        retried_before = pool.clients_retried
        arrived, failures = pool.run_round(self.weights, jobs, proximal_mu=proximal_mu, deadline_s=deadline_s)
        failures = failures + [Failure(c, "dropped") for c in dropped]
        results = []
        private = isinstance(self.strategy, DifferentialPrivacy)
        for result in arrived:
            problem = None if private else update_problem(result.delta, max_norm=self.max_update_norm)
            if problem:
                failures.append(Failure(result.client_id, problem))
            else:
                results.append(result)
        update = self.strategy.aggregate_fit(server_round, results, failures)
        if update is not None:
            self.weights = self.weights + self.server_learning_rate * update
        reasons = [f.reason for f in failures]
        examples = sum(r.num_examples for r in results)
        return RoundReport(
            server_round=server_round, sampled=len(sampled), used=len(results), dropped=reasons.count("dropped"),
            late=reasons.count("deadline"), rejected=reasons.count("non-finite") + reasons.count("norm"),
            errors=reasons.count("error"), retried=pool.clients_retried - retried_before,
            actors_replaced=pool.actors_replaced, aggregated=update is not None,
            train_loss=sum(r.metrics["train_loss"] * r.num_examples for r in results) / examples if examples else float("nan"),
            update_norm=float(np.linalg.norm(update)) if update is not None else 0.0,
            seconds=time.perf_counter() - start,
            epsilon=self.strategy.accountant.epsilon() if private else None,
        )
