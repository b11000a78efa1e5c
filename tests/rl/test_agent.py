"""DQNAgent: acting, learning, target sync, reproducibility and safe checkpoints."""

import pickle

import numpy as np
import pytest
import torch

from mlplatform.rl.agent import DQNAgent, DQNConfig
from mlplatform.rl.replay import ReplaySample
from mlplatform.rl.train import train_dqn


def make_batch(rng: np.random.Generator, size: int = 32) -> ReplaySample:
    return ReplaySample(
        obs=rng.normal(size=(size, 4)).astype(np.float32),
        actions=rng.integers(2, size=size),
        rewards=rng.normal(size=size).astype(np.float32),
        next_obs=rng.normal(size=(size, 4)).astype(np.float32),
        terminated=(rng.random(size) < 0.2).astype(np.float32),
        discounts=np.full(size, 0.99**3, dtype=np.float32),
        indices=np.arange(size),
        weights=rng.uniform(0.2, 1.0, size=size).astype(np.float32),
    )


def test_learning_reduces_the_loss_on_a_fixed_batch():
    agent = DQNAgent((4,), 2, DQNConfig(learning_rate=1e-3, target_update_every=10_000))
    batch = make_batch(np.random.default_rng(0))
    first, priorities = agent.learn(batch)
    for _ in range(100):
        last, _ = agent.learn(batch)
    assert last["losses/td_loss"] < 0.5 * first["losses/td_loss"]
    assert priorities.shape == (32,) and (priorities >= 0).all()
    assert agent.updates == 101


def test_hard_target_sync_every_k_updates():
    agent = DQNAgent((4,), 2, DQNConfig(target_update_every=3))
    batch = make_batch(np.random.default_rng(1))
    agent.learn(batch)
    agent.learn(batch)
    assert not torch.equal(agent.online.value[0].weight, agent.target.value[0].weight)
    agent.learn(batch)
    assert torch.equal(agent.online.value[0].weight, agent.target.value[0].weight)


def test_polyak_target_sync_moves_by_tau():
    agent = DQNAgent((4,), 2, DQNConfig(tau=0.1))
    before = agent.target.value[0].weight.clone()
    agent.learn(make_batch(np.random.default_rng(2)))
    expected = before + 0.1 * (agent.online.value[0].weight - before)
    torch.testing.assert_close(agent.target.value[0].weight, expected)


def test_epsilon_greedy():
    agent = DQNAgent((4,), 3, DQNConfig(seed=0))
    obs = np.random.default_rng(0).normal(size=(4000, 4)).astype(np.float32)
    np.testing.assert_array_equal(agent.act(obs, 0.0), agent.greedy_actions(obs))
    counts = np.bincount(agent.act(obs, 1.0), minlength=3)
    assert counts.min() > 1200  # uniform over 3 actions: ~1333 each


def test_checkpoint_roundtrip_restores_networks_optimizer_and_counters(tmp_path):
    config = DQNConfig(seed=3)
    agent = DQNAgent((4,), 2, config)
    batch = make_batch(np.random.default_rng(3))
    for _ in range(5):
        agent.learn(batch)
    agent.env_steps = 1234
    path = agent.save(tmp_path / "ckpt.pt")

    restored = DQNAgent((4,), 2, DQNConfig(seed=99))
    restored.load(path)
    assert (restored.env_steps, restored.updates) == (1234, 5)
    for a, b in zip(agent.online.parameters(), restored.online.parameters()):
        assert torch.equal(a, b)
    # identical continuation: same optimizer moments and the same exploration stream
    obs = np.zeros((64, 4), dtype=np.float32)
    np.testing.assert_array_equal(agent.act(obs, 0.5), restored.act(obs, 0.5))
    m1, p1 = agent.learn(batch)
    m2, p2 = restored.learn(batch)
    assert m1 == m2
    np.testing.assert_array_equal(p1, p2)


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_loading_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"online": _Exploit()}, path)
    agent = DQNAgent((4,), 2, DQNConfig())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        agent.load(path)


def tiny_config(seed: int) -> DQNConfig:
    return DQNConfig(
        seed=seed, total_steps=800, learning_starts=200, eval_every=800, eval_episodes=2,
        stop_at_return=None, buffer_size=1000,
    )


def test_same_seed_same_run_different_seed_different_run(tmp_path):
    torch.set_num_threads(1)
    runs = [train_dqn(tiny_config(s), output_dir=tmp_path / str(i), progress=False) for i, s in enumerate((5, 5, 6))]
    weights = [torch.load(r.checkpoint, weights_only=True)["online"] for r in runs]
    assert runs[0].updates == runs[1].updates > 0
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert runs[0].eval_history == runs[1].eval_history
