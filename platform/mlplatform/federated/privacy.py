"""DP-FedAvg with a real accountant: per-client clipping, Gaussian noise on the sum, a fixed denominator, ε per round.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (arXiv:1710.06963).
The accounting is ``dp-accounting``'s (PLD by default, RDP as an option); nothing here re-derives it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from mlplatform.federated.aggregate import clip_to_norm
from mlplatform.federated.randomness import SecretRandom
from mlplatform.federated.strategy import Failure, FitResult, Strategy

if TYPE_CHECKING:
    from mlplatform.federated.config import FederatedConfig

AccountantKind = Literal["pld", "rdp"]
PLD_DISCRETIZATION = 1e-3
"""PLD value discretization: pessimistic (ε stays an upper bound); 10x faster than the library's 1e-4 default and
equal to it within 1e-3 relative on the settings we run (q = 0.1, z = 1, 100 rounds: 7.0466 both)."""

# dp-accounting's RDP search logs a warning for every order whose series does not converge; those orders are
# simply excluded from the minimum, so the warning is noise for users.
logging.getLogger("absl").setLevel(logging.ERROR)


def dp_round_event(*, noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    """One DP-FedAvg round: the Gaussian mechanism on a Poisson-sampled set of clients."""
    return dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))


def make_accountant(kind: AccountantKind) -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp-accounting`` accountant: PLD (tightest) or RDP."""
    if kind == "pld":
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    if kind == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    raise ValueError(f"accountant must be 'pld' or 'rdp', got {kind!r}")


class PrivacyAccountant:
    """The privacy ledger of a run: records rounds as (noise multiplier, sample rate) and answers ε(δ).

    Args:
        delta: the δ at which ε is reported.
        kind: ``pld`` (privacy loss distributions, the tightest) or ``rdp`` (Rényi DP, looser, faster).
    """

    def __init__(self, *, delta: float, kind: AccountantKind = "pld") -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got delta={delta}")
        make_accountant(kind)
        self.delta = delta
        self.kind: AccountantKind = kind
        self._history: list[tuple[float, float, int]] = []
        self._known: dict[tuple[tuple[float, float, int], ...], float] = {}  # a run asks for each ledger twice

    def step(self, *, noise_multiplier: float, sample_rate: float, rounds: int = 1) -> None:
        """Record ``rounds`` more rounds of the given mechanism."""
        self._history = _merged([*self._history, (noise_multiplier, sample_rate, rounds)])

    def epsilon(self) -> float:
        """ε at ``delta`` for everything recorded so far (0 before the first round)."""
        return self._epsilon_of(self._history)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, rounds: int = 1) -> float:
        """ε if ``rounds`` more rounds ran, without recording them (to stop before a budget is passed)."""
        return self._epsilon_of([*self._history, (noise_multiplier, sample_rate, rounds)])

    def _epsilon_of(self, history: Sequence[tuple[float, float, int]]) -> float:
        key = tuple(_merged(history))
        if key not in self._known:
            accountant = make_accountant(self.kind)
            for noise_multiplier, sample_rate, rounds in history:
                accountant.compose(dp_round_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate), rounds)
            self._known[key] = float(accountant.get_epsilon(self.delta)) if history else 0.0
        return self._known[key]

    def __len__(self) -> int:
        return sum(rounds for *_, rounds in self._history)

    def state_dict(self) -> dict[str, object]:
        """Everything needed to resume the ledger (plain lists and floats, safe for ``weights_only`` loads)."""
        return {"delta": self.delta, "kind": self.kind, "history": [list(h) for h in self._history]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a ledger saved by :meth:`state_dict`."""
        self.delta, self.kind = float(state["delta"]), state["kind"]  # type: ignore[arg-type, assignment]
        self._history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]  # type: ignore[union-attr]
        self._known = {}


def _merged(history: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The ledger with consecutive rounds of the same mechanism counted together."""
    merged: list[tuple[float, float, int]] = []
    for noise_multiplier, sample_rate, rounds in history:
        if merged and merged[-1][:2] == (noise_multiplier, sample_rate):
            merged[-1] = (noise_multiplier, sample_rate, merged[-1][2] + rounds)
        else:
            merged.append((noise_multiplier, sample_rate, rounds))
    return merged


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, rounds: int, sample_rate: float, kind: AccountantKind = "pld"
) -> float:
    """The smallest noise multiplier z whose ``rounds`` rounds at ``sample_rate`` stay within (ε, δ).

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over fresh accountants), to within 1e-4.

    Raises:
        ValueError: a parameter out of range.
    """
    if target_epsilon <= 0 or rounds < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"need target_epsilon > 0, rounds >= 1, 0 < sample_rate <= 1; got "
                         f"{target_epsilon}, {rounds}, {sample_rate}")

    def search(accountant_kind: AccountantKind, bracket: dp_accounting.mechanism_calibration.BracketInterval) -> float:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant_kind),
            lambda z: dp_accounting.SelfComposedDpEvent(dp_round_event(noise_multiplier=z, sample_rate=sample_rate), rounds),
            target_epsilon, delta, bracket_interval=bracket, tol=1e-4,
        ))

    # RDP is cheap at any z and never tighter than PLD, so its answer bounds PLD's from above. PLD is searched only
    # near it: at a tiny z its loss distribution needs gigabytes.
    rdp_z = search("rdp", dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
    if kind == "rdp":
        return rdp_z
    return search("pld", dp_accounting.ExplicitBracketInterval(rdp_z / 2, rdp_z))


class DifferentialPrivacy(Strategy):
    """DP-FedAvg around any strategy: Poisson-sampled clients, each update clipped to L2 norm C, Gaussian noise of
    std z·C on the sum, divided by the *expected* number of clients q·N.

    The denominator and the noise are fixed before the round starts, so they do not depend on who
    replied: a sampled client that drops out, misses the deadline or sends NaN (replaced by a zero
    update before clipping) changes the sum by at most C, exactly like a client that was never
    sampled, and the (ε, δ) guarantee holds as accounted. N is a public constant, never counted
    from the data. For the same reason every round is aggregated and accounted, even one with few or
    no replies (a data-dependent "skip this round" would itself leak), and the inner strategy's
    aggregation rule (example-weighted, median) is not used: it would change the sensitivity. The
    inner strategy still supplies client settings (FedProx's ``proximal_mu``) and evaluation.
    Sampling and noise come from the operating system's CSPRNG, not from the run's seed, which is public.

    Args:
        inner: the strategy whose client settings and evaluation are kept.
        noise_multiplier: z, the noise std in units of the clipping norm.
        clip_norm: C, the largest L2 norm a client's update may have.
        sample_rate: q, each client's independent chance of being sampled in a round.
        num_clients: N, the public population size: q·N is the denominator; a round with more clients is refused.
        delta: the δ at which ε is reported.
        target_epsilon: stop before a round would take ε past this; None runs every round.
        accountant: ``pld`` (default, tightest) or ``rdp``.
        seed: None (the default) samples and noises from ``os.urandom``, as the guarantee needs; a seed makes
            both reproducible for tests and voids the guarantee for anyone who knows it.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        sample_rate: float,
        num_clients: int,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        accountant: AccountantKind = "pld",
        seed: int | None = None,
    ) -> None:
        if noise_multiplier < 0 or clip_norm <= 0:
            raise ValueError(f"need noise_multiplier >= 0 and clip_norm > 0, got {noise_multiplier} and {clip_norm}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got sample_rate={sample_rate}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got num_clients={num_clients}")
        if target_epsilon is not None and target_epsilon <= 0:
            raise ValueError(f"target_epsilon must be > 0, got target_epsilon={target_epsilon}")
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.sample_rate = sample_rate
        self.target_epsilon = target_epsilon
        self.num_clients = num_clients
        self.accountant = PrivacyAccountant(delta=delta, kind=accountant)
        self._random: SecretRandom | np.random.Generator = SecretRandom() if seed is None else np.random.default_rng(seed)
        self.model_size: int | None = None  # set by the server, so that a round with no replies is still noised

    def expected_clients(self) -> float:
        """q·N, the fixed denominator of the noisy mean."""
        return self.sample_rate * self.num_clients

    def budget_allows_round(self) -> bool:
        """Whether one more round keeps ε within ``target_epsilon``."""
        if self.target_epsilon is None:
            return True
        return self.accountant.epsilon_after(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate) \
            <= self.target_epsilon

    def configure_fit(self, server_round: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        """Poisson sampling from the secret source (``rng``, seeded in public, is not used): each client joins
        independently with probability q (the round may be empty)."""
        if num_clients > self.num_clients:
            raise ValueError(f"{num_clients} clients exceed the public num_clients={self.num_clients} "
                             f"that the denominator q·N assumes")
        return np.flatnonzero(self._random.random(num_clients) < self.sample_rate).tolist()

    def fit_config(self, server_round: int) -> dict[str, float]:
        return self.inner.fit_config(server_round)

    def aggregate_fit(self, server_round: int, results: Sequence[FitResult], failures: Sequence[Failure]) -> np.ndarray:
        """The clipped sum plus N(0, (z·C)²) noise, over q·N; a non-finite update counts as a zero one."""
        size = self._size_of(results)
        total = np.zeros(size, dtype=np.float64)
        for result in results:
            if np.isfinite(result.delta).all():
                total += clip_to_norm(result.delta, self.clip_norm)
        total += self._random.normal(0.0, self.noise_multiplier * self.clip_norm, size=size)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return (total / self.expected_clients()).astype(np.float32)

    def _size_of(self, results: Sequence[FitResult]) -> int:
        if results:
            return results[0].delta.size
        if self.model_size is None:
            raise RuntimeError("a round with no replies needs model_size set before aggregation")
        return self.model_size

    def evaluate(self, server_round: int, weights: np.ndarray) -> dict[str, float] | None:
        return self.inner.evaluate(server_round, weights)

    def describe(self) -> dict[str, object]:
        return self.inner.describe() | {
            "dp_mechanism": "DP-FedAvg", "dp_noise_multiplier": self.noise_multiplier, "dp_clip_norm": self.clip_norm,
            "dp_sample_rate": self.sample_rate, "dp_num_clients": self.num_clients, "dp_delta": self.accountant.delta,
            "dp_accountant": self.accountant.kind,
            "dp_target_epsilon": self.target_epsilon,
        }


def dp_from_config(config: FederatedConfig, inner: Strategy) -> DifferentialPrivacy:
    """``inner`` wrapped in the config's DP-FedAvg, its noise multiplier calibrated to ``target_epsilon`` when not given."""
    noise = config.noise_multiplier
    if noise is None:
        noise = noise_multiplier_for(target_epsilon=config.target_epsilon, delta=config.delta, rounds=config.rounds,
                                     sample_rate=config.sample_rate, kind=config.accountant)
    return DifferentialPrivacy(inner, noise_multiplier=noise, clip_norm=config.clip_norm, sample_rate=config.sample_rate,
                               num_clients=config.num_clients, delta=config.delta, target_epsilon=config.target_epsilon,
                               accountant=config.accountant)
