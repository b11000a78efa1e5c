"""Replay maths: sum tree against a numpy oracle, PER frequencies and weights, ring ids, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from mlplatform.rl.replay import PrioritizedReplayBuffer, ReplayBuffer, ReplaySample
from mlplatform.rl.sumtree import SumTree


def fill(buffer: ReplayBuffer, n: int, first: int = 0) -> np.ndarray:
    """Adds n transitions whose obs, reward and action all encode their running number."""
    values = np.arange(first, first + n)
    obs = np.repeat(values[:, None], 4, axis=1).astype(np.float32)
    return buffer.add(
        obs, values, values.astype(np.float32), obs + 0.5, np.zeros(n, np.float32), np.full(n, 0.99, np.float32)
    )


def oracle_find(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Smallest i with cumsum(values)[i] > target, clamped to the non-zero leaves."""
    cumsum = np.cumsum(values)
    nonzero = np.flatnonzero(values)
    found = np.searchsorted(cumsum, targets, side="right")
    return np.clip(found, nonzero[0], nonzero[-1])


# ---- sum tree ----


@pytest.mark.parametrize("capacity", [1, 2, 7, 64, 1000, 100_003])
def test_sumtree_matches_numpy_oracle_over_random_updates(capacity):
    rng = np.random.default_rng(capacity)
    tree, oracle = SumTree(capacity), np.zeros(capacity)
    ever_set = np.zeros(capacity, dtype=bool)
    for _ in range(300):
        # Small integers (a third of them 0) keep every sum exact, so the oracle can demand equality.
        indices = rng.integers(0, capacity, size=rng.integers(1, 40))
        values = rng.integers(0, 10, size=indices.size).astype(np.float64) * (rng.random(indices.size) > 0.3)
        tree.set(indices, values)
        for i, v in zip(indices, values):  # sequential, so duplicates resolve last-wins like the tree
            oracle[i] = v
        ever_set[indices] = True
        assert tree.total == oracle.sum()
        assert tree.min == oracle[ever_set].min()
        probe = rng.integers(0, capacity, size=16)
        np.testing.assert_array_equal(tree.get(probe), oracle[probe])
        if oracle.sum() > 0:
            # Half-integer targets sit strictly inside a leaf's interval, integer ones on its edge.
            total = int(oracle.sum())
            targets = np.concatenate([rng.integers(0, total, 32) + 0.5, rng.integers(0, total + 1, 32)])
            np.testing.assert_array_equal(tree.find_prefix_sum(targets), oracle_find(oracle, targets))


def test_sumtree_prefix_search_edges_never_return_empty_leaves():
    rng = np.random.default_rng(0)
    capacity = 5000
    values = np.where(rng.random(capacity) < 0.9, 0.0, rng.random(capacity) * 10.0 ** rng.integers(-8, 8, capacity))
    values[[0, -1]] = 0.0
    tree = SumTree(capacity)
    tree.set(np.arange(capacity), values)
    nonzero = np.flatnonzero(values)
    total = tree.total
    found = tree.find_prefix_sum(np.array([0.0, -1.0, total, total * 2]))
    np.testing.assert_array_equal(found, [nonzero[0], nonzero[0], nonzero[-1], nonzero[-1]])
    # Every float leaf boundary and its neighbours: rounding must never land on a zero leaf.
    cumsum = np.cumsum(values)[nonzero]
    near_total = [np.nextafter(total, 0.0), total * (1 - 1e-12)]
    targets = np.concatenate(
        [cumsum, np.nextafter(cumsum, 0.0), np.nextafter(cumsum, np.inf), near_total, rng.random(10_000) * total]
    )
    found = tree.find_prefix_sum(targets)
    assert (values[found] > 0).all()
    # And the leaf found owns the target, up to rounding in the order of summation.
    before = np.concatenate([[0.0], np.cumsum(values)])
    tol = 1e-9 * total
    assert ((before[found] - tol <= targets) & (targets <= before[found + 1] + tol)).all()


def test_sumtree_min_and_empty_state():
    tree = SumTree(10)
    assert tree.total == 0.0 and tree.min == np.inf
    with pytest.raises(ValueError, match="total is 0"):
        tree.find_prefix_sum(np.array([0.0]))
    tree.set(np.array([3, 4]), np.array([2.0, 0.0]))
    assert tree.min == 0.0 and tree.total == 2.0
    np.testing.assert_array_equal(tree.find_prefix_sum(np.array([0.0, 1.0, 2.0])), [3, 3, 3])


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 70),
    ops=st.lists(st.tuples(st.integers(0, 69), st.floats(0.0, 1e6, allow_nan=False)), min_size=1, max_size=60),
)
def test_sumtree_property_matches_oracle(capacity, ops):
    tree, oracle = SumTree(capacity), np.zeros(capacity)
    for index, value in ops:
        tree.set(np.array([index % capacity]), np.array([value]))
        oracle[index % capacity] = value
    np.testing.assert_allclose(tree.total, oracle.sum(), rtol=1e-12)
    if oracle.sum() > 0:
        found = tree.find_prefix_sum(np.linspace(0.0, tree.total, 25))
        assert (oracle[found] > 0).all()


# ---- prioritized sampling maths ----


def test_sampling_frequencies_follow_p_alpha():
    alpha, n = 0.7, 12
    buffer = PrioritizedReplayBuffer(n, (4,), alpha=alpha, eps=1e-6, seed=1)
    ids = fill(buffer, n)
    priorities = np.linspace(0.05, 3.0, n)
    buffer.update_priorities(ids, priorities)
    counts = np.zeros(n)
    for _ in range(2000):
        np.add.at(counts, buffer.sample(8).indices, 1)
    expected_p = (priorities + 1e-6) ** alpha / ((priorities + 1e-6) ** alpha).sum()
    assert chisquare(counts, counts.sum() * expected_p).pvalue > 0.001
    # A uniform guess must fail the same test, or the test proves nothing.
    assert chisquare(counts, np.full(n, counts.sum() / n)).pvalue < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_importance_weights_match_the_paper_formula(beta):
    alpha, eps, capacity = 0.6, 1e-6, 50
    buffer = PrioritizedReplayBuffer(capacity, (4,), alpha=alpha, eps=eps, seed=2)
    fill(buffer, 70)  # wrapped: ids 20..69 are stored
    ids = np.arange(20, 70)
    td = np.random.default_rng(3).exponential(size=capacity)
    buffer.update_priorities(ids, td)
    sample = buffer.sample(32, beta=beta)
    p = (td + eps) ** alpha
    prob = p / p.sum()
    w_all = (capacity * prob) ** -beta
    expected = w_all[sample.indices - 20] / w_all.max()
    np.testing.assert_allclose(sample.weights, expected, rtol=1e-5)
    assert sample.weights.dtype == np.float32 and sample.weights.max() <= 1.0


def test_new_transitions_enter_at_running_max_priority():
    alpha, eps = 0.5, 1e-6
    buffer = PrioritizedReplayBuffer(8, (4,), alpha=alpha, eps=eps, seed=0)
    ids = fill(buffer, 3)
    # Before any update everything sits at 1.0, so all weights are 1.
    np.testing.assert_allclose(buffer.sample(3, beta=1.0).weights, 1.0)
    buffer.update_priorities(ids, [3.0, 0.5, 0.5])
    buffer.update_priorities(ids[:1], [0.2])  # the max ever given stays 3.0
    new = fill(buffer, 1, first=3)[0]
    sample = buffer.sample(4, beta=1.0)
    while new not in sample.indices:
        sample = buffer.sample(4, beta=1.0)
    # With beta = 1 the weight is p_min / p_i.
    expected = ((0.2 + eps) / (3.0 + eps)) ** alpha
    np.testing.assert_allclose(sample.weights[sample.indices == new], expected, rtol=1e-5)


def test_stale_priority_updates_are_dropped():
    buffer = PrioritizedReplayBuffer(4, (4,), seed=0)
    fill(buffer, 4)
    sampled = np.arange(4)
    fill(buffer, 2, first=4)  # ids 0 and 1 are overwritten by ids 4 and 5
    assert buffer.update_priorities(sampled, [100.0, 100.0, 0.0, 0.0]) == 2
    # Slots 0 and 1 must still hold the newcomers' priority 1.0, not the stale 100.
    seen = np.concatenate([buffer.sample(4, beta=1.0).indices for _ in range(200)])
    assert set(seen) <= {2, 3, 4, 5}
    share = np.isin(seen, [4, 5]).mean()
    assert share > 0.95  # p = 1.0 versus eps**0.6 for ids 2 and 3


# ---- ring storage and ids ----


@pytest.mark.parametrize("cls", [ReplayBuffer, PrioritizedReplayBuffer])
def test_ring_wraps_and_overwrites_the_oldest(cls):
    buffer = cls(5, (4,), seed=0)
    np.testing.assert_array_equal(fill(buffer, 3), [0, 1, 2])
    np.testing.assert_array_equal(fill(buffer, 4, first=3), [3, 4, 5, 6])
    assert len(buffer) == 5 and buffer.capacity == 5
    sample = buffer.sample(5)
    for _ in range(50):
        sample = buffer.sample(5)
        assert ((sample.indices >= 2) & (sample.indices <= 6)).all()
        # Each row holds the transition its id names.
        np.testing.assert_array_equal(sample.obs[:, 0], sample.indices)
        np.testing.assert_array_equal(sample.next_obs[:, 0], sample.indices + 0.5)
        np.testing.assert_array_equal(sample.actions, sample.indices)


def test_batch_larger_than_capacity_keeps_the_last_rows():
    buffer = ReplayBuffer(5, (4,), seed=0)
    ids = fill(buffer, 12)
    np.testing.assert_array_equal(ids, np.arange(12))
    assert len(buffer) == 5
    seen = set()
    for _ in range(100):
        sample = buffer.sample(5)
        np.testing.assert_array_equal(sample.rewards, sample.indices)
        seen |= set(sample.indices.tolist())
    assert seen == {7, 8, 9, 10, 11}


def test_uniform_buffer_shares_the_interface():
    buffer = ReplayBuffer(10, (4,), seed=0)
    ids = fill(buffer, 10)
    counts = np.zeros(10)
    for _ in range(2000):
        sample = buffer.sample(5, beta=0.9)
        np.add.at(counts, sample.indices, 1)
        np.testing.assert_array_equal(sample.weights, 1.0)
    assert chisquare(counts).pvalue > 0.001
    assert buffer.update_priorities(ids, np.ones(10)) == 10
    fill(buffer, 3, first=10)
    assert buffer.update_priorities(ids, np.ones(10)) == 7
    with pytest.raises(ValueError, match="finite"):
        buffer.update_priorities(ids[:1], [np.nan])


def test_sample_dtypes():
    buffer = PrioritizedReplayBuffer(10, (4,), seed=0)
    fill(buffer, 10)
    sample = buffer.sample(4)
    assert isinstance(sample, ReplaySample)
    dtypes = {name: getattr(sample, name).dtype for name in ReplaySample._fields}
    assert dtypes == {
        "obs": np.float32, "actions": np.int64, "rewards": np.float32, "next_obs": np.float32,
        "terminated": np.float32, "discounts": np.float32, "indices": np.int64, "weights": np.float32,
    }
    np.testing.assert_array_equal(sample.discounts, np.float32(0.99))


def test_uint8_frames_stay_uint8():
    buffer = PrioritizedReplayBuffer(6, (2, 3, 3), obs_dtype=np.uint8, seed=0)
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 2, 3, 3), dtype=np.uint8)
    buffer.add(frames, np.zeros(4, np.int64), np.zeros(4), frames, np.zeros(4, bool), np.ones(4))
    sample = buffer.sample(4)
    assert sample.obs.dtype == np.uint8 and sample.next_obs.dtype == np.uint8
    np.testing.assert_array_equal(sample.obs, frames[sample.indices])
    with pytest.raises(ValueError, match="dtype float32 cannot be stored safely as uint8"):
        buffer.add(frames.astype(np.float32), np.zeros(4, np.int64), np.zeros(4), frames, np.zeros(4), np.ones(4))


# ---- bad input ----


def _add(buffer, n=3, **overrides):
    args = {
        "obs": np.zeros((n, 4), np.float32), "actions": np.zeros(n, np.int64), "rewards": np.zeros(n, np.float32),
        "next_obs": np.zeros((n, 4), np.float32), "terminated": np.zeros(n, np.float32),
        "discounts": np.ones(n, np.float32),
    }
    return buffer.add(**(args | overrides))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"obs": np.zeros((3, 5), np.float32)}, r"obs must have shape \(batch, \*\(4,\)\), got \(3, 5\)"),
        ({"obs": np.zeros(4, np.float32)}, r"obs must have shape .* got \(4,\)"),
        ({"next_obs": np.zeros((2, 4), np.float32)}, "obs and next_obs must have the same batch length, got 3 and 2"),
        ({"actions": np.zeros(2, np.int64)}, r"actions must have shape \(3,\) to match obs, got \(2,\)"),
        ({"rewards": np.zeros((3, 1))}, r"rewards must have shape \(3,\) to match obs, got \(3, 1\)"),
        ({"actions": np.zeros(3, np.float32)}, "actions of dtype float32 cannot be stored safely as int64"),
        ({"discounts": np.array(["a", "b", "c"])}, "discounts of dtype <U1 cannot be stored safely"),
    ],
)
def test_add_rejects_bad_batches(overrides, match):
    with pytest.raises(ValueError, match=match):
        _add(ReplayBuffer(8, (4,)), **overrides)


@pytest.mark.parametrize("cls", [ReplayBuffer, PrioritizedReplayBuffer])
def test_sample_and_update_reject_bad_arguments(cls):
    buffer = cls(8, (4,), seed=0)
    with pytest.raises(ValueError, match="cannot sample from an empty buffer"):
        buffer.sample(1)
    ids = _add(buffer, 3)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 3\] \(the stored count\), got batch_size=4"):
        buffer.sample(4)
    with pytest.raises(ValueError, match="batch_size=0"):
        buffer.sample(0)
    with pytest.raises(TypeError, match="batch_size must be an int, got float"):
        buffer.sample(2.0)
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got beta="):
            buffer.sample(2, beta=beta)
    for bad, shown in ((np.nan, "nan"), (np.inf, "inf"), (-1.0, "-1.0")):
        with pytest.raises(ValueError, match=f"priorities must be finite and >= 0, got {shown}"):
            buffer.update_priorities(ids, [1.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"index 3 was never written \(ids so far are 0..2\)"):
        buffer.update_priorities([0, 3], [1.0, 1.0])
    with pytest.raises(ValueError, match="index -1 was never written"):
        buffer.update_priorities([-1], [1.0])
    with pytest.raises(ValueError, match="indices and priorities must have the same length, got 3 and 2"):
        buffer.update_priorities(ids, [1.0, 1.0])
    with pytest.raises(ValueError, match="indices must be integer transition ids, got dtype float64"):
        buffer.update_priorities(ids.astype(float), [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ReplayBuffer(0, (4,)), "capacity must be >= 1, got capacity=0"),
        (lambda: PrioritizedReplayBuffer(-3, (4,)), "capacity must be >= 1, got capacity=-3"),
        (lambda: SumTree(0), "capacity must be >= 1, got capacity=0"),
        (lambda: ReplayBuffer(4, (4, -1)), r"obs_shape must have non-negative dimensions, got obs_shape=\(4, -1\)"),
        (lambda: PrioritizedReplayBuffer(4, (4,), alpha=-1), "alpha must be >= 0, got alpha=-1"),
        (lambda: PrioritizedReplayBuffer(4, (4,), eps=0.0), "eps must be > 0, got eps=0.0"),
    ],
)
def test_constructors_reject_bad_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sumtree_rejects_bad_input():
    tree = SumTree(4)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\), got 4"):
        tree.set(np.array([4]), np.array([1.0]))
    with pytest.raises(ValueError, match="values must be finite and >= 0, got -2.0"):
        tree.set(np.array([1]), np.array([-2.0]))
    with pytest.raises(ValueError, match="indices and values must have the same length, got 2 and 1"):
        tree.set(np.array([1, 2]), np.array([1.0]))
    with pytest.raises(ValueError, match="indices must be integers, got dtype float64"):
        tree.get(np.array([1.0]))
    tree.set(np.array([1]), np.array([1.0]))
    with pytest.raises(ValueError, match="targets must be finite, got nan"):
        tree.find_prefix_sum(np.array([np.nan]))
