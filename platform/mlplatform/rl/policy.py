"""Policy: a DQN checkpoint's greedy policy, what the Serve endpoint and the MLflow flavour both answer with."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from mlplatform.rl.atari import is_atari, register_atari_envs
from mlplatform.rl.model import DuelingDQN
from mlplatform.rl.train import make_vector_env


def registered_env_id(env_id: str) -> str:
    """``env_id`` when gymnasium's registry holds it; never ``module:Env``, which would import a module the
    checkpoint names (a checkpoint is data, and data must not choose code to run).

    Raises:
        ValueError: any other id.
    """
    if ":" not in env_id:
        with contextlib.suppress(gym.error.Error):  # a malformed id is refused just below
            if is_atari(env_id):
                register_atari_envs()
    if ":" in env_id or env_id not in gym.registry:
        raise ValueError(f"the checkpoint's env_id {env_id!r} is not an environment in gymnasium's registry")
    return env_id


class Policy:
    """The online network of a checkpoint, rebuilt from the config saved with it (read with ``weights_only=True``)."""

    def __init__(self, path: str | Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = state["config"]
        env = make_vector_env(registered_env_id(config["env_id"]), 1)  # the spaces the agent saw, Atari preprocessing included
        self.obs_shape = tuple(env.single_observation_space.shape)
        self.num_actions = int(env.single_action_space.n)
        self.network = DuelingDQN(self.obs_shape, self.num_actions, hidden_sizes=config["hidden_sizes"])
        env.close()
        self.network.load_state_dict(state["online"])
        self.network.eval()

    @torch.no_grad()
    def q_values(self, observation: list[float] | np.ndarray) -> np.ndarray:
        """Q(s, ·) for one observation: flat in C order, or of the observation's shape (images as uint8 or floats).

        Raises:
            ValueError: the observation has the wrong number of values, or a shape that is not the policy's.
        """
        array = np.asarray(observation, dtype=np.float32)
        expected = math.prod(self.obs_shape)
        if array.size != expected:
            raise ValueError(f"expected {expected} values (shape {list(self.obs_shape)}), got {array.size}")
        if array.ndim > 1 and array.shape != self.obs_shape:
            raise ValueError(f"expected shape {list(self.obs_shape)} (or {expected} values flat), got {list(array.shape)}")
        return self.network(torch.from_numpy(array).reshape(1, *self.obs_shape))[0].numpy()
