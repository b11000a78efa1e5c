"""End to end: the default DQN solves CartPole-v1 (greedy mean >= 475 over 20 episodes) within 50k steps."""

import numpy as np
import pytest
import torch

from mlplatform.rl.agent import DQNAgent, DQNConfig
from mlplatform.rl.train import evaluate, train_dqn


@pytest.mark.slow
def test_default_config_solves_cartpole(tmp_path):
    torch.set_num_threads(1)
    result = train_dqn(DQNConfig(seed=1), output_dir=tmp_path, progress=False)
    assert result.solved_at_step is not None and result.solved_at_step <= 50_000, result.eval_history

    # the saved greedy policy holds up on 20 episodes it has never seen
    agent = DQNAgent((4,), 2, DQNConfig())
    agent.load(result.checkpoint)
    returns = evaluate(agent, "CartPole-v1", 20, seed=123_456)
    assert np.mean(returns) >= 475, returns
