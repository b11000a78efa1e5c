"""A privacy audit: an empirical lower bound on the ε of the project's DP aggregation, from a canary client.

The auditor plays the adversary of the DP definition (Jagielski et al. 2020, arXiv:2006.07709;
Nasr et al. 2021, arXiv:2101.04535): it picks two neighbouring populations, one without and one
with a canary client, runs the real mechanism (``DifferentialPrivacy``) many times on each, and
guesses from every released aggregate whether the canary was there. Any (ε, δ)-DP mechanism bounds
the error rates of every such guess (Kairouz et al. 2015, arXiv:1311.0776): FPR + e^ε·FNR ≥ 1 − δ.
Clopper–Pearson upper bounds on the two rates then give an ε the mechanism must exceed, with the
stated confidence. The bound is compared with the accountant's ε for exactly what was released:
one round. A bound above it is a violation: the code does not do what the accountant assumes.

The worst case is the smallest population: no other client replies, so the canary's update (longer
than C, along a secret direction) is all there is to see beside the noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import beta

from mlplatform.federated.config import FederatedConfig
from mlplatform.federated.privacy import DifferentialPrivacy, PrivacyAccountant, dp_from_config
from mlplatform.federated.strategy import Failure, FedAvg, FitResult


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """How hard the auditor tries."""

    trials: int = 20_000
    """Rounds run in each world (with and without the canary); half choose the threshold, half measure."""
    confidence: float = 0.95
    """Probability that the lower bound holds (split between the two Clopper–Pearson bounds)."""
    canary_norm_multiple: float = 10.0
    """The canary's update is this many clipping norms long: clipping must bring it back to C."""
    model_size: int = 16
    """Length of the flat update vectors (the canary's direction is one unit vector among them)."""
    seed: int | None = None
    """Seeds the canary's direction; the mechanism draws its own randomness."""


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What one audit measured, beside what the accountant claims."""

    epsilon_lower_bound: float
    """ε the mechanism exceeds with probability ``confidence``."""
    epsilon_accounted: float
    """The accountant's ε (at the same δ) for one round: what each audited release claims."""
    false_positive_rate: float
    false_negative_rate: float
    trials: int
    confidence: float

    @property
    def violation(self) -> bool:
        """Whether the measured lower bound exceeds the accounted ε."""
        return self.epsilon_lower_bound > self.epsilon_accounted


def clopper_pearson_upper(errors: np.ndarray | int, trials: int, alpha: float) -> np.ndarray:
    """The one-sided upper confidence bound (level 1 − α) on a rate seen ``errors`` times in ``trials``."""
    errors = np.asarray(errors)
    bound = beta.ppf(1 - alpha, errors + 1, np.maximum(trials - errors, 1))
    return np.where(errors >= trials, 1.0, bound)


def epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    """The largest ε that error rates (upper bounds) of a membership guess force on an (ε, δ)-DP mechanism; 0 when none."""
    fpr, fnr = np.asarray(fpr, dtype=np.float64), np.asarray(fnr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.maximum(1 - delta - fnr, 0) / fpr)
        other = np.log(np.maximum(1 - delta - fpr, 0) / fnr)
    return np.nan_to_num(np.maximum(np.maximum(one, other), 0.0), nan=0.0, posinf=0.0, neginf=0.0)


def released_scores(mechanism: DifferentialPrivacy, canary: np.ndarray, *, with_canary: bool, trials: int) -> np.ndarray:
    """Each round's released update projected on the canary's direction (a round that releases None releases zero)."""
    mechanism.model_size = canary.size
    direction = canary / np.linalg.norm(canary)
    population = [FitResult(0, canary, 1)] if with_canary else []
    public = np.random.default_rng(0)  # what the server hands a strategy; a DP mechanism must not use it
    scores = np.empty(trials)
    for trial in range(trials):
        sampled = mechanism.configure_fit(1, len(population), public)
        update = mechanism.aggregate_fit(1, [population[i] for i in sampled], [])
        scores[trial] = 0.0 if update is None else float(update @ direction)
    return scores


def audit(make_mechanism: Callable[[], DifferentialPrivacy], accounted: DifferentialPrivacy,
          config: AuditConfig = AuditConfig()) -> AuditResult:
    """Audit what ``make_mechanism`` builds against the one-round ε that ``accounted``'s settings claim.

    Args:
        make_mechanism: a fresh mechanism for each world (it is run, not trusted).
        accounted: the mechanism as configured: its noise multiplier, sample rate and δ give the claimed ε.
        config: trials, confidence and the canary's length.
    """
    rng = np.random.default_rng(config.seed)
    direction = rng.normal(size=config.model_size)
    canary = config.canary_norm_multiple * accounted.clip_norm * direction / np.linalg.norm(direction)
    scores = {present: released_scores(make_mechanism(), canary, with_canary=present, trials=config.trials)
              for present in (False, True)}
    half, alpha, delta = config.trials // 2, (1 - config.confidence) / 2, accounted.accountant.delta
    threshold = best_threshold(scores[False][:half], scores[True][:half], delta=delta, alpha=alpha)
    measured = config.trials - half
    false_positives = int((scores[False][half:] > threshold).sum())
    false_negatives = int((scores[True][half:] <= threshold).sum())
    bound = epsilon_from_rates(clopper_pearson_upper(false_positives, measured, alpha),
                               clopper_pearson_upper(false_negatives, measured, alpha), delta)
    return AuditResult(epsilon_lower_bound=float(bound), epsilon_accounted=one_round_epsilon(accounted),
                       false_positive_rate=false_positives / measured, false_negative_rate=false_negatives / measured,
                       trials=config.trials, confidence=config.confidence)


def audit_config(config: FederatedConfig, settings: AuditConfig = AuditConfig()) -> tuple[DifferentialPrivacy, AuditResult]:
    """Audit the DP-FedAvg that ``config`` runs (built as a run builds it); returns the mechanism as claimed, and the audit."""
    claimed = dp_from_config(config, FedAvg())
    calibrated = dataclasses.replace(config, noise_multiplier=claimed.noise_multiplier)  # calibrate once, not per world
    return claimed, audit(lambda: dp_from_config(calibrated, FedAvg()), claimed, settings)


def best_threshold(without: np.ndarray, with_canary: np.ndarray, *, delta: float, alpha: float) -> float:
    """The threshold on these (calibration) scores whose guess "canary present if above" bounds ε highest."""
    without, with_canary = np.sort(without), np.sort(with_canary)
    candidates = np.unique(np.concatenate([with_canary, without[-1:]]))
    false_positives = without.size - np.searchsorted(without, candidates, side="right")
    false_negatives = np.searchsorted(with_canary, candidates, side="right")
    bounds = epsilon_from_rates(clopper_pearson_upper(false_positives, without.size, alpha),
                                clopper_pearson_upper(false_negatives, with_canary.size, alpha), delta)
    return float(candidates[int(np.argmax(bounds))])


def one_round_epsilon(mechanism: DifferentialPrivacy) -> float:
    """The accountant's ε for one round of ``mechanism``'s settings."""
    accountant = PrivacyAccountant(delta=mechanism.accountant.delta, kind=mechanism.accountant.kind)
    accountant.step(noise_multiplier=mechanism.noise_multiplier, sample_rate=mechanism.sample_rate)
    return accountant.epsilon()


class RepliesDenominator(DifferentialPrivacy):
    """Broken on purpose: the noisy sum over the clients that replied, not over q·N (no replies, no update)."""

    def aggregate_fit(self, server_round: int, results: Sequence[FitResult], failures: Sequence[Failure]) -> np.ndarray | None:
        if not results:
            return None
        return super().aggregate_fit(server_round, results, failures) * self.expected_clients() / len(results)


def broken_copies(mechanism: DifferentialPrivacy) -> dict[str, Callable[[], DifferentialPrivacy]]:
    """The mechanism deliberately broken three ways, each still accounted as ``mechanism``: what an audit must catch."""
    settings = {"sample_rate": mechanism.sample_rate, "num_clients": mechanism.num_clients,
                "delta": mechanism.accountant.delta}
    z, clip = mechanism.noise_multiplier, mechanism.clip_norm
    return {
        "noise 10x too small": lambda: DifferentialPrivacy(FedAvg(), noise_multiplier=z / 10, clip_norm=clip, **settings),
        # the same noise std z·C, with a clipping norm no update reaches
        "clipping off": lambda: DifferentialPrivacy(FedAvg(), noise_multiplier=z / 1e6, clip_norm=clip * 1e6, **settings),
        "denominator from the replies": lambda: RepliesDenominator(FedAvg(), noise_multiplier=z, clip_norm=clip, **settings),
    }
