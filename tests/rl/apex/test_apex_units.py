"""Ape-X pieces that need no cluster: exploration rates, config checks, stale-priority safety."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.config import ConfigError, load_config
from mlplatform.rl.apex.config import ApexConfig, apex_epsilons
from mlplatform.rl.apex.shard import ReplayShard
from mlplatform.rl.nstep import Transitions


def test_epsilons_follow_the_apex_formula():
    eps = apex_epsilons(8, eps_base=0.4, eps_alpha=7.0)
    expected = [0.4 ** (1 + 7 * i / 7) for i in range(8)]
    np.testing.assert_allclose(eps, expected)
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4**8)
    np.testing.assert_allclose(apex_epsilons(1, eps_base=0.4, eps_alpha=7.0), [0.4])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_shards": 0}, "num_shards: Input should be greater than or equal to 1"),
        ({"learning_starts": 10}, "learning_starts \\(10\\) must be at least num_shards \\* batch_size"),
        ({"buffer_size": 100, "num_shards": 4}, "each of the 4 shards holds 25 transitions"),
        ({"samples_in_flight": 1}, "samples_in_flight: Input should be greater than or equal to 2"),
        ({"num_wrokers": 3}, "did you mean 'num_workers'"),
        ({"algorithm": "dqn"}, "algorithm: Input should be 'apex'"),
    ],
)
def test_impossible_configs_fail_before_any_actor_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ApexConfig, overrides=overrides)


def block(first: int, n: int) -> Transitions:
    ids = np.arange(first, first + n, dtype=np.float32)
    return Transitions(
        obs=ids[:, None], actions=np.zeros(n, np.int64), rewards=ids, next_obs=ids[:, None] + 1,
        terminated=np.zeros(n, np.float32), discounts=np.ones(n, np.float32),
    )


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 6)),
        st.tuples(st.just("sample"), st.integers(1, 4)),
        st.tuples(st.just("update"), st.integers(0, 10)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_no_stale_priority_is_ever_written(ops):
    """Adds and priority updates interleave as they do when the learner trains on an old sample.

    An oracle tracks which transition id lives in each slot and the priority it should have; at
    the end every slot must hold its live transition's own priority, never one meant for an id
    that was overwritten while its sample was in flight.
    """
    capacity, alpha = 8, 1.0
    shard = ReplayShard(capacity, (1,), "float32", alpha=alpha, seed=0)
    live: dict[int, int] = {}  # slot -> id
    expected: dict[int, float] = {}  # id -> stored priority (|delta| + eps) ** alpha
    in_flight: list[tuple[np.ndarray, np.ndarray]] = []
    next_id, rng = 0, np.random.default_rng(0)
    for op, arg in ops:
        if op == "add":
            priorities = rng.uniform(0.1, 5.0, size=arg)
            shard.add(block(next_id, arg), priorities)
            for offset, priority in enumerate(priorities):
                live[(next_id + offset) % capacity] = next_id + offset
                expected[next_id + offset] = (priority + 1e-6) ** alpha
            next_id += arg
        elif op == "sample" and len(shard.buffer) >= arg:
            sample = shard.sample(arg, beta=0.5)
            in_flight.append((sample.indices, rng.uniform(0.1, 5.0, size=arg)))
        elif op == "update" and in_flight:
            ids, priorities = in_flight.pop(arg % len(in_flight))
            stale = shard.update_priorities(ids, priorities)
            assert stale == int(sum(live.get(i % capacity) != i for i in ids))
            for i, priority in zip(ids, priorities):
                if live[i % capacity] == i:
                    expected[int(i)] = (priority + 1e-6) ** alpha
    tree = shard.buffer._tree
    for slot, transition_id in live.items():
        assert tree.get(np.array([slot]))[0] == pytest.approx(expected[transition_id])
