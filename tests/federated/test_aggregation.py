"""Aggregation maths, partitions and strategies: pure numpy, no Ray."""

import numpy as np
import pytest

from mlplatform.federated.aggregate import clip_to_norm, coordinate_median, trimmed_mean, update_problem
from mlplatform.federated.partition import dirichlet_partition, iid_partition, writer_partition
from mlplatform.federated.strategy import Failure, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FitResult


def results_of(updates, counts):
    return [FitResult(i, np.asarray(u, dtype=np.float32), n) for i, (u, n) in enumerate(zip(updates, counts))]


def test_weighted_fedavg_is_the_example_weighted_mean():
    rng = np.random.default_rng(0)
    updates, counts = rng.normal(size=(5, 50)), [3, 10, 1, 40, 6]
    expected = sum(n * u for n, u in zip(counts, updates)) / sum(counts)
    aggregate = FedAvg().aggregate_fit(1, results_of(updates, counts), [])
    np.testing.assert_allclose(aggregate, expected, rtol=1e-5)
    assert not np.allclose(aggregate, updates.mean(axis=0), rtol=1e-2)  # the sketch's unweighted mean differs


@pytest.mark.parametrize("strategy", [FedMedian(), FedTrimmedAvg(beta=0.2)], ids=["median", "trimmed_mean"])
def test_robust_rules_resist_one_client_scaled_by_a_million(strategy):
    rng = np.random.default_rng(1)
    honest = rng.normal(0.0, 0.1, size=(9, 200)) + 1.0
    attacker = honest[0] * 1e6
    aggregate = strategy.aggregate_fit(1, results_of([*honest, attacker], [10] * 10), [])
    assert np.abs(aggregate - honest.mean(axis=0)).max() < 0.2
    fedavg = FedAvg().aggregate_fit(1, results_of([*honest, attacker], [10] * 10), [])
    assert np.abs(fedavg).max() > 1e4  # while the plain mean is dragged away


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    updates = np.array([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [3.0, -100.0], [100.0, 13.0]])
    np.testing.assert_allclose(trimmed_mean(updates, beta=0.2), [2.0, 11.0])
    np.testing.assert_allclose(coordinate_median(updates), [2.0, 11.0])


def test_clip_scales_down_long_updates_only():
    long, short = np.array([3.0, 4.0], dtype=np.float32), np.array([0.3, 0.4], dtype=np.float32)
    np.testing.assert_allclose(clip_to_norm(long, 1.0), [0.6, 0.8], rtol=1e-6)
    assert clip_to_norm(short, 1.0) is short


def test_update_problems_are_named():
    assert update_problem(np.array([1.0, np.nan]), max_norm=None) == "non-finite"
    assert update_problem(np.array([1.0, np.inf]), max_norm=None) == "non-finite"
    assert update_problem(np.array([3.0, 4.0]), max_norm=4.9) == "norm"
    assert update_problem(np.array([3.0, 4.0]), max_norm=5.0) is None


def test_fedavg_keeps_the_model_below_min_fit_clients():
    strategy = FedAvg(min_fit_clients=3)
    assert strategy.aggregate_fit(1, results_of(np.ones((2, 4)), [1, 1]), [Failure(2, "dropped")]) is None
    assert strategy.aggregate_fit(1, results_of(np.ones((3, 4)), [1, 1, 1]), []) is not None


def test_fedavg_samples_its_fraction_without_repeats():
    chosen = FedAvg(fraction_fit=0.1, min_fit_clients=2).configure_fit(1, 100, np.random.default_rng(0))
    assert len(chosen) == 10 == len(set(chosen)) and all(0 <= c < 100 for c in chosen)
    assert len(FedAvg(fraction_fit=0.01, min_fit_clients=5).configure_fit(1, 100, np.random.default_rng(0))) == 5


def test_fedprox_forwards_mu_and_rejects_a_negative_one():
    assert FedProx(proximal_mu=0.1).fit_config(3) == {"proximal_mu": 0.1}
    with pytest.raises(ValueError, match="proximal_mu must be >= 0, got proximal_mu=-1"):
        FedProx(proximal_mu=-1)
    with pytest.raises(ValueError, match="fraction_fit"):
        FedAvg(fraction_fit=0)


def test_iid_partition_deals_every_index_once():
    parts = iid_partition(103, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}
    assert all((a == b).all() for a, b in zip(parts, iid_partition(103, 10, seed=0)))


def test_dirichlet_partition_is_seeded_complete_and_skewed():
    labels = np.repeat(np.arange(8), 100)
    skewed = dirichlet_partition(labels, 20, alpha=0.1, seed=3)
    mild = dirichlet_partition(labels, 20, alpha=100.0, seed=3)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(800))
    assert all((a == b).all() for a, b in zip(skewed, dirichlet_partition(labels, 20, alpha=0.1, seed=3)))
    classes_held = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])  # noqa: E731
    assert classes_held(skewed) < 4 < classes_held(mild)


def test_dirichlet_partition_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition([0, 1], 2, alpha=0, seed=0)
    with pytest.raises(ValueError, match="cannot fill"):
        dirichlet_partition([0, 1, 0], 10, alpha=1.0, seed=0)


def test_writer_partition_gives_each_writer_a_client():
    parts, names = writer_partition(["b", "a", "b", "c", "a"])
    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
