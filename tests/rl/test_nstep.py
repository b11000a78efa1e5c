"""n-step returns at episode ends: terminated stops bootstrapping, truncated does not."""

import numpy as np
import pytest

from mlplatform.rl.nstep import NStepAccumulator

GAMMA = 0.9


def push(acc, t, rewards, terminated=None, truncated=None, next_obs=None):
    n = len(rewards)
    terminated = (False,) * n if terminated is None else terminated
    truncated = (False,) * n if truncated is None else truncated
    obs = np.full((n, 1), float(t), dtype=np.float32)
    nxt = np.full((n, 1), float(t + 1), dtype=np.float32) if next_obs is None else next_obs
    return acc.push(obs, np.full(n, t), np.asarray(rewards, np.float32), nxt,
                    np.asarray(terminated), np.asarray(truncated))


def test_full_window_emits_discounted_sum_and_gamma_power():
    acc = NStepAccumulator(1, (1,), n_steps=3, gamma=GAMMA)
    assert len(push(acc, 0, [1.0])) == 0
    assert len(push(acc, 1, [2.0])) == 0
    out = push(acc, 2, [4.0])
    assert len(out) == 1
    assert out.obs[0, 0] == 0.0 and out.actions[0] == 0 and out.next_obs[0, 0] == 3.0
    np.testing.assert_allclose(out.rewards, [1 + GAMMA * 2 + GAMMA**2 * 4], rtol=1e-6)
    np.testing.assert_allclose(out.discounts, [GAMMA**3], rtol=1e-6)
    assert out.terminated[0] == 0.0


@pytest.mark.parametrize("terminated", [True, False])
def test_episode_end_flushes_every_pending_step(terminated):
    acc = NStepAccumulator(1, (1,), n_steps=3, gamma=GAMMA)
    push(acc, 0, [1.0])
    final = np.array([[99.0]], dtype=np.float32)  # the true last observation, not a reset one
    out = push(acc, 1, [2.0], terminated=(terminated,), truncated=(not terminated,), next_obs=final)
    order = np.argsort(out.obs[:, 0])
    np.testing.assert_allclose(out.rewards[order], [1 + GAMMA * 2, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out.discounts[order], [GAMMA**2, GAMMA], rtol=1e-6)
    np.testing.assert_array_equal(out.next_obs[:, 0], [99.0, 99.0])
    # terminated stops the bootstrap; a time-limit truncation keeps it
    np.testing.assert_array_equal(out.terminated, [float(terminated)] * 2)
    # the next episode starts clean: nothing from before the end leaks into it
    assert len(push(acc, 2, [5.0])) == 0
    assert len(push(acc, 3, [5.0])) == 0
    assert push(acc, 4, [5.0]).obs[0, 0] == 2.0


def test_envs_are_independent():
    acc = NStepAccumulator(2, (1,), n_steps=2, gamma=GAMMA)
    push(acc, 0, [1.0, 10.0])
    out = push(acc, 1, [2.0, 20.0], terminated=(True, False), truncated=(False, False))
    order = np.argsort(out.rewards)
    np.testing.assert_allclose(out.rewards[order], [2.0, 1 + GAMMA * 2, 10 + GAMMA * 20], rtol=1e-6)
    np.testing.assert_array_equal(out.terminated[order], [1.0, 1.0, 0.0])


def test_one_step_is_plain_transitions():
    acc = NStepAccumulator(3, (1,), n_steps=1, gamma=GAMMA)
    out = push(acc, 0, [1.0, 2.0, 3.0], terminated=(False,) * 3, truncated=(False,) * 3)
    np.testing.assert_allclose(out.rewards, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(out.discounts, [GAMMA] * 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        NStepAccumulator(1, (1,), n_steps=0, gamma=0.9)
    with pytest.raises(ValueError, match="gamma must be in"):
        NStepAccumulator(1, (1,), n_steps=1, gamma=1.5)
    with pytest.raises(ValueError, match="expected 2 envs, got 3 rewards"):
        push(NStepAccumulator(2, (1,), n_steps=1, gamma=0.9), 0, [1.0, 2.0, 3.0])
