"""DP-FedAvg: clipping bound, noise calibration, fixed denominator under dropout, and ε from dp-accounting."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.federated.privacy import DifferentialPrivacy, PrivacyAccountant, noise_multiplier_for
from mlplatform.federated.strategy import Failure, FedAvg, FitResult


def dp(**options):
    settings_ = {"noise_multiplier": 0.0, "clip_norm": 1.0, "sample_rate": 0.1, "num_clients": 100, "seed": 0} | options
    return DifferentialPrivacy(FedAvg(), **settings_)


def start_round(strategy, size=None):
    strategy.configure_fit(1, strategy.num_clients, np.random.default_rng(0))
    strategy.model_size = size


def fit(client_id, delta, n=10):
    return FitResult(client_id, np.asarray(delta, dtype=np.float32), n)


def library_epsilon(accountant, q, z, rounds, delta):
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q, z, rounds, delta", [(0.1, 1.0, 100, 1e-5), (0.05, 0.8, 500, 1e-6), (1.0, 5.0, 10, 1e-5)])
def test_epsilon_is_the_library_accountants(q, z, rounds, delta):
    ours = PrivacyAccountant(delta=delta, kind="pld")
    ours.step(noise_multiplier=z, sample_rate=q, rounds=rounds)
    same_grid = library_epsilon(pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3), q, z, rounds, delta)
    library_default = library_epsilon(pld_privacy_accountant.PLDAccountant(), q, z, rounds, delta)
    assert ours.epsilon() == same_grid
    assert ours.epsilon() == pytest.approx(library_default, rel=1e-3)
    rdp = PrivacyAccountant(delta=delta, kind="rdp")
    for _ in range(rounds):
        rdp.step(noise_multiplier=z, sample_rate=q)
    assert rdp.epsilon() == library_epsilon(rdp_privacy_accountant.RdpAccountant(), q, z, rounds, delta)
    assert ours.epsilon() < rdp.epsilon()  # PLD is the tighter of the two


def test_pinned_epsilon():
    """The DESIGN's reference point: q = 0.1, z = 1.0, 100 rounds, δ = 1e-5."""
    for kind, expected in (("pld", 7.05), ("rdp", 7.90)):
        accountant = PrivacyAccountant(delta=1e-5, kind=kind)
        accountant.step(noise_multiplier=1.0, sample_rate=0.1, rounds=100)
        assert accountant.epsilon() == pytest.approx(expected, abs=0.01)
        assert len(accountant) == 100


def test_noise_multiplier_for_a_target_is_the_smallest_that_meets_it():
    z = noise_multiplier_for(target_epsilon=3.0, delta=1e-5, rounds=200, sample_rate=0.05)
    at = lambda noise: PrivacyAccountant(delta=1e-5).epsilon_after(noise_multiplier=noise, sample_rate=0.05, rounds=200)  # noqa: E731
    assert at(z) <= 3.0 < at(z - 0.01)


def test_accountant_state_round_trips():
    accountant = PrivacyAccountant(delta=1e-5, kind="rdp")
    accountant.step(noise_multiplier=1.0, sample_rate=0.1, rounds=10)
    accountant.step(noise_multiplier=2.0, sample_rate=0.2)
    restored = PrivacyAccountant(delta=1e-3, kind="pld")
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon() == accountant.epsilon() and len(restored) == 11


def test_no_client_moves_the_aggregate_by_more_than_c_over_expected_clients():
    rng = np.random.default_rng(0)
    others = [fit(i, rng.normal(size=300)) for i in range(1, 8)]
    strategy = dp(clip_norm=0.5)
    start_round(strategy)
    without = strategy.aggregate_fit(1, others, [])
    for scale in (1e-3, 1.0, 1e6):
        with_client = strategy.aggregate_fit(1, [fit(0, rng.normal(size=300) * scale), *others], [])
        assert np.linalg.norm(with_client - without) <= 0.5 / strategy.expected_clients() * (1 + 1e-5)


def test_noise_std_in_the_aggregate_is_z_c_over_expected_clients():
    strategy = dp(noise_multiplier=1.3, clip_norm=0.7, sample_rate=0.1, seed=1)
    start_round(strategy)
    size = 200_000
    aggregate = strategy.aggregate_fit(1, [fit(i, np.zeros(size)) for i in range(10)], [])
    expected_std = 1.3 * 0.7 / 10
    # the sample std of 200k normal draws is within 5 standard errors (1/sqrt(2n)) of the truth
    assert abs(aggregate.std() / expected_std - 1) < 5 / np.sqrt(2 * size)
    assert abs(aggregate.mean()) < 5 * expected_std / np.sqrt(size)


def test_dropouts_change_neither_the_denominator_nor_the_noise():
    strategy = dp(sample_rate=0.1, clip_norm=10.0, num_clients=40)
    start_round(strategy, size=3)
    replies = [fit(0, [1.0, 2.0, 3.0]), fit(1, [3.0, 2.0, 1.0])]
    aggregate = strategy.aggregate_fit(1, replies, [Failure(2, "dropped"), Failure(3, "deadline")])
    np.testing.assert_allclose(aggregate, np.array([4.0, 4.0, 4.0]) / 4.0)  # sum / (q·N), not the mean of two
    noisy = dp(noise_multiplier=1.0, sample_rate=0.1, seed=5, num_clients=40)
    start_round(noisy, size=50_000)
    nobody = noisy.aggregate_fit(1, [], [Failure(i, "dropped") for i in range(4)])
    assert nobody.std() == pytest.approx(1.0 / 4.0, rel=0.02)  # an empty round is still noised and accounted
    assert len(noisy.accountant) == 1


def test_poisson_sampling_rate():
    strategy = dp(sample_rate=0.2, num_clients=1000)
    sizes = [len(strategy.configure_fit(r, 1000, np.random.default_rng(r))) for r in range(50)]
    assert np.mean(sizes) == pytest.approx(200, rel=0.05)
    assert len(set(sizes)) > 1  # the round size varies, as Poisson sampling requires


@settings(max_examples=10, deadline=None)
@given(z=st.floats(0.5, 3.0), q=st.floats(0.01, 1.0), target=st.floats(0.5, 20.0))
def test_a_run_never_passes_its_target_epsilon(z, q, target):
    strategy = dp(noise_multiplier=z, sample_rate=q, target_epsilon=target, accountant="rdp", num_clients=10)
    start_round(strategy, size=4)
    rounds = 0
    while strategy.budget_allows_round() and rounds < 10:
        strategy.aggregate_fit(rounds + 1, [], [])
        rounds += 1
    assert strategy.accountant.epsilon() <= target
    if rounds < 10:
        assert strategy.accountant.epsilon_after(noise_multiplier=z, sample_rate=q) > target


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="sample_rate must be in"):
        dp(sample_rate=0)
    with pytest.raises(ValueError, match="clip_norm"):
        dp(clip_norm=0)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        dp(num_clients=0)
    with pytest.raises(ValueError, match="delta must be in"):
        PrivacyAccountant(delta=0)
    with pytest.raises(ValueError, match="accountant must be 'pld' or 'rdp'"):
        PrivacyAccountant(delta=1e-5, kind="gdp")


def test_the_denominator_is_the_public_n_and_more_clients_are_refused():
    strategy = dp(sample_rate=0.5, clip_norm=10.0, num_clients=8)
    strategy.configure_fit(1, 3, np.random.default_rng(0))  # fewer clients than N: the absent are never sampled
    np.testing.assert_allclose(strategy.aggregate_fit(1, [fit(0, [4.0, 8.0])], []), [1.0, 2.0])  # over q·N = 4
    with pytest.raises(ValueError, match="9 clients exceed the public num_clients=8"):
        strategy.configure_fit(2, 9, np.random.default_rng(0))


def test_a_non_finite_update_counts_as_a_zero_update():
    strategy = dp(sample_rate=0.5, clip_norm=1.0, num_clients=4)
    start_round(strategy, size=2)
    clean = strategy.aggregate_fit(1, [fit(0, [3.0, 4.0])], [])
    with_nan = strategy.aggregate_fit(1, [fit(0, [3.0, 4.0]), fit(1, [np.nan, 1.0]), fit(2, [np.inf, 0.0])], [])
    np.testing.assert_allclose(with_nan, clean)  # [0.3, 0.4]: the clipped update over q·N = 2
    assert len(strategy.accountant) == 2


def test_without_a_seed_sampling_and_noise_are_secret_and_differ_between_runs():
    from mlplatform.federated.randomness import SecretRandom

    public_rng = np.random.default_rng([0, 1, 1])  # what the server hands every strategy: the config seed's stream
    runs = [dp(sample_rate=0.5, num_clients=64, seed=None, noise_multiplier=1.0) for _ in range(2)]
    samples = [[tuple(s.configure_fit(r, 64, np.random.default_rng([0, r, 1]))) for r in range(1, 6)] for s in runs]
    assert samples[0] != samples[1]  # same seed, different clients
    assert samples[0][0] != tuple(np.flatnonzero(public_rng.random(64) < 0.5))  # and not the seed's draw
    for strategy in runs:
        strategy.model_size = 8
    assert not np.array_equal(runs[0].aggregate_fit(1, [], []), runs[1].aggregate_fit(1, [], []))
    first, second = (dp(sample_rate=0.5, num_clients=64, seed=3) for _ in range(2))  # a seed, for tests, repeats itself
    assert first.configure_fit(1, 64, public_rng) == second.configure_fit(1, 64, public_rng)
    draws = SecretRandom().random(200_000)
    assert 0.0 <= draws.min() and draws.max() < 1.0 and abs(draws.mean() - 0.5) < 5 * (1 / 12) ** 0.5 / 200_000 ** 0.5
    normal = SecretRandom().normal(0.0, 2.0, 200_001)
    assert normal.size == 200_001 and abs(normal.std() / 2.0 - 1) < 5 / np.sqrt(2 * normal.size)
