"""Strategies: the small ``Strategy`` base named after a round's phases, with FedAvg, FedProx, median and trimmed mean."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

from mlplatform.federated.aggregate import coordinate_median, trimmed_mean, weighted_mean

EvaluateFn = Callable[[np.ndarray], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What one client sent back: its update (local minus global weights), its example count and metrics."""

    client_id: int
    delta: np.ndarray
    num_examples: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Failure:
    """A sampled client whose update is not in the aggregate, and why (dropped, deadline, non-finite, norm, error)."""

    client_id: int
    reason: str


class Strategy(ABC):
    """How a round goes: which clients train, what they are told, how updates combine, how the model is judged.

    Every method takes ``server_round`` (1-based). ``aggregate_fit`` receives the failures beside the
    results, and returning None means "keep the previous global model" for this round.
    """

    def configure_fit(self, server_round: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        """Client ids to train this round; the default takes every client."""
        return list(range(num_clients))

    def fit_config(self, server_round: int) -> dict[str, float]:
        """Settings forwarded to every client this round (FedProx sends its ``proximal_mu``)."""
        return {}

    @abstractmethod
    def aggregate_fit(self, server_round: int, results: Sequence[FitResult], failures: Sequence[Failure]) -> np.ndarray | None:
        """The update to add to the global weights, or None to keep them."""

    def evaluate(self, server_round: int, weights: np.ndarray) -> dict[str, float] | None:
        """Centralized evaluation of the global weights; None when this strategy does none."""
        return None

    def describe(self) -> dict[str, object]:
        """Parameters worth logging with the run."""
        return {"strategy": type(self).__name__}


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017, arXiv:1602.05629), weighted by each client's example count.

    Args:
        fraction_fit: share of clients sampled each round (at least ``min_fit_clients``).
        min_fit_clients: fewest updates a round needs; with fewer the global model is kept.
        evaluate_fn: centralized evaluation of flat global weights, called every ``evaluate_every`` rounds.
        evaluate_every: rounds between evaluations (the last round is always evaluated by the server).
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        min_fit_clients: int = 1,
        evaluate_fn: EvaluateFn | None = None,
        evaluate_every: int = 1,
    ) -> None:
        if not 0 < fraction_fit <= 1:
            raise ValueError(f"fraction_fit must be in (0, 1], got fraction_fit={fraction_fit}")
        if min_fit_clients < 1 or evaluate_every < 1:
            raise ValueError(f"min_fit_clients and evaluate_every must be >= 1, got {min_fit_clients} and {evaluate_every}")
        self.fraction_fit = fraction_fit
        self.min_fit_clients = min_fit_clients
        self.evaluate_fn = evaluate_fn
        self.evaluate_every = evaluate_every

    def configure_fit(self, server_round: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        count = min(num_clients, max(self.min_fit_clients, round(self.fraction_fit * num_clients)))
        return sorted(rng.choice(num_clients, size=count, replace=False).tolist())

    def aggregate_fit(self, server_round: int, results: Sequence[FitResult], failures: Sequence[Failure]) -> np.ndarray | None:
        if len(results) < self.min_fit_clients:
            return None
        return self.combine(results)

    def combine(self, results: Sequence[FitResult]) -> np.ndarray:
        """The aggregation rule proper; subclasses swap this and keep the rest."""
        return weighted_mean([r.delta for r in results], [r.num_examples for r in results])

    def evaluate(self, server_round: int, weights: np.ndarray) -> dict[str, float] | None:
        if self.evaluate_fn is None or server_round % self.evaluate_every:
            return None
        return self.evaluate_fn(weights)

    def describe(self) -> dict[str, object]:
        return {"strategy": type(self).__name__, "fraction_fit": self.fraction_fit, "min_fit_clients": self.min_fit_clients}


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, arXiv:1812.06127): FedAvg whose clients add (mu/2)·||w - w_global||² to their loss.

    The server only forwards ``proximal_mu``; the client owns the proximal term.
    """

    def __init__(self, *, proximal_mu: float, **fedavg: object) -> None:
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got proximal_mu={proximal_mu}")
        super().__init__(**fedavg)  # type: ignore[arg-type]
        self.proximal_mu = proximal_mu

    def fit_config(self, server_round: int) -> dict[str, float]:
        return {"proximal_mu": self.proximal_mu}

    def describe(self) -> dict[str, object]:
        return super().describe() | {"proximal_mu": self.proximal_mu}


class FedMedian(FedAvg):
    """Coordinate-wise median of the updates; a minority of arbitrary (Byzantine) updates cannot move it far."""

    def combine(self, results: Sequence[FitResult]) -> np.ndarray:
        return coordinate_median([r.delta for r in results])


class FedTrimmedAvg(FedAvg):
    """Coordinate-wise trimmed mean: drop the ``beta`` share of extremes on each side, average the rest."""

    def __init__(self, *, beta: float = 0.2, **fedavg: object) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got beta={beta}")
        super().__init__(**fedavg)  # type: ignore[arg-type]
        self.beta = beta

    def combine(self, results: Sequence[FitResult]) -> np.ndarray:
        return trimmed_mean([r.delta for r in results], beta=self.beta)

    def describe(self) -> dict[str, object]:
        return super().describe() | {"beta": self.beta}
