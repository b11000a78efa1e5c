"""RolloutWorker: a Ray actor that plays vectorized envs with its own ε and emits n-step blocks."""

from __future__ import annotations

import dataclasses

import numpy as np
import ray
import torch

from mlplatform.rl.agent import DQNAgent
from mlplatform.rl.apex.config import ApexConfig
from mlplatform.rl.atari import clip_rewards, is_atari
from mlplatform.rl.frames import FrameBlock, is_frame_stack, pack_transitions
from mlplatform.rl.nstep import NStepAccumulator, Transitions
from mlplatform.rl.train import make_vector_env, true_next_obs


class RolloutWorker:
    """Acts with a local copy of the network and turns experience into prioritized blocks.

    Args:
        config: the run config.
        worker_index: this worker's place among the workers; picks its envs' ε and seeds.
        epsilons: one exploration rate per env of this worker.
        incarnation: how many times this worker has been replaced, so a replacement does not
            replay its predecessor's episodes.
    """

    def __init__(self, config: ApexConfig, worker_index: int, epsilons: np.ndarray, incarnation: int = 0) -> None:
        torch.set_num_threads(1)
        self.config = config
        self.epsilons = np.asarray(epsilons, dtype=np.float64)
        if self.epsilons.shape != (config.num_envs,):
            raise ValueError(f"expected {config.num_envs} epsilons, got shape {self.epsilons.shape}")
        self.envs = make_vector_env(config.env_id, config.num_envs)
        space = self.envs.single_observation_space
        seed = config.seed + 10_007 * worker_index + 1_000_003 * incarnation
        # The worker's own seed drives its exploration; its network weights always come from the learner.
        self.agent = DQNAgent(space.shape, int(self.envs.single_action_space.n), dataclasses.replace(config, seed=seed))
        self.nstep = NStepAccumulator(
            config.num_envs, space.shape, space.dtype, n_steps=config.n_steps, gamma=config.gamma
        )
        self.obs, _ = self.envs.reset(seed=seed)
        self.episode_returns = np.zeros(config.num_envs)
        # Atari learns from sign-clipped rewards; episode returns stay in game points.
        self.clip_rewards = is_atari(config.env_id)
        self.pack_frames = is_frame_stack(space.shape, space.dtype)

    @ray.method(num_returns=3)
    def collect(self, weights: dict[str, torch.Tensor]) -> tuple[Transitions | FrameBlock, np.ndarray, dict]:
        """Run ``rollout_steps`` vector steps with ``weights``.

        Returns:
            The block of n-step transitions (a :class:`FrameBlock` for frame stacks, so the object
            store carries each frame once), their initial priorities, and stats (env steps taken,
            returns of the episodes that ended).
        """
        self.agent.set_weights(weights)
        parts: list[Transitions] = []
        finished: list[float] = []
        for _ in range(self.config.rollout_steps):
            actions = self.agent.act(self.obs, self.epsilons)
            next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
            done = terminated | truncated
            targets = clip_rewards(rewards) if self.clip_rewards else rewards
            parts.append(
                self.nstep.push(self.obs, actions, targets, true_next_obs(next_obs, done, info), terminated, truncated)
            )
            self.obs = next_obs
            self.episode_returns += rewards
            finished.extend(self.episode_returns[done].tolist())
            self.episode_returns[done] = 0.0
        block = Transitions(*(np.concatenate(field) for field in zip(*parts)))
        stats = {"env_steps": self.config.rollout_steps * self.config.num_envs, "episode_returns": finished}
        priorities = self.agent.initial_priorities(block)
        return (pack_transitions(block) if self.pack_frames else block), priorities, stats


RolloutWorkerActor = ray.remote(RolloutWorker)
