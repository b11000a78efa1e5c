"""Policy: a DQN checkpoint's greedy policy, what the Serve endpoint and the MLflow flavour both answer with."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mlplatform.rl.model import DuelingDQN
from mlplatform.rl.train import make_vector_env


class Policy:
    """The online network of a checkpoint, rebuilt from the config saved with it (read with ``weights_only=True``)."""

    def __init__(self, path: str | Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = state["config"]
        env = make_vector_env(config["env_id"], 1)  # the spaces the agent saw, Atari preprocessing included
        self.obs_shape = tuple(env.single_observation_space.shape)
        self.num_actions = int(env.single_action_space.n)
        self.network = DuelingDQN(self.obs_shape, self.num_actions, hidden_sizes=config["hidden_sizes"])
        env.close()
        self.network.load_state_dict(state["online"])
        self.network.eval()

    @torch.no_grad()
    def q_values(self, observation: list[float]) -> np.ndarray:
        """Q(s, ·) for one flattened observation.

        Raises:
            ValueError: the observation has the wrong number of values.
        """
        expected = math.prod(self.obs_shape)
        if len(observation) != expected:
            raise ValueError(f"expected {expected} values (shape {list(self.obs_shape)}), got {len(observation)}")
        obs = torch.tensor(observation, dtype=torch.float32).reshape(1, *self.obs_shape)
        return self.network(obs)[0].numpy()
