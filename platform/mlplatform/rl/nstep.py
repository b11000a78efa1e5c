"""Vectorized n-step return accumulation that respects episode ends (terminated vs truncated)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Transitions(NamedTuple):
    """A batch of k-step transitions (k <= n) ready for a replay buffer."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    discounts: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


class NStepAccumulator:
    """Turns one-step experience from ``num_envs`` parallel envs into n-step transitions.

    Each emitted transition carries ``R = sum_k gamma^k r_{t+k}``, the observation k steps later
    and ``discount = gamma^k``. When an episode ends every pending step of that env is flushed
    with the shorter return it has. ``terminated`` marks s' terminal, so the learner stops
    bootstrapping; ``truncated`` (a time limit) does not: the transition bootstraps from the true
    last observation, which the caller must pass as ``next_obs`` (``info["final_obs"]`` under
    gymnasium's same-step autoreset), never the reset observation.

    Args:
        num_envs: number of parallel environments pushed together.
        obs_shape: shape of one observation.
        obs_dtype: dtype of observations (uint8 frames stay uint8).
        n_steps: the n of n-step returns (1 gives ordinary one-step transitions).
        gamma: discount factor.
    """

    def __init__(
        self,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype | type = np.float32,
        *,
        n_steps: int,
        gamma: float,
    ) -> None:
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got n_steps={n_steps}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got gamma={gamma}")
        self.num_envs = num_envs
        self.n_steps = n_steps
        self.gamma = gamma
        # One ring slot per time step, shared by all envs because they step in lockstep.
        self._obs = np.zeros((n_steps, num_envs, *obs_shape), dtype=obs_dtype)
        self._actions = np.zeros((n_steps, num_envs), dtype=np.int64)
        self._rewards = np.zeros((n_steps, num_envs), dtype=np.float32)
        self._pending = np.zeros(num_envs, dtype=np.int64)  # steps held per env, at most n
        self._t = 0

    def push(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> Transitions:
        """Record one vector step and return the transitions that became complete."""
        if len(rewards) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} envs, got {len(rewards)} rewards")
        n, slot = self.n_steps, self._t % self.n_steps
        self._obs[slot] = obs
        self._actions[slot] = actions
        self._rewards[slot] = rewards
        self._pending = np.minimum(self._pending + 1, n)
        done = np.logical_or(terminated, truncated)

        parts: list[Transitions] = []
        # age 0 is the step just taken; age n-1 the oldest one kept. An env emits its oldest
        # step once it holds n of them, and every step it holds when its episode ends.
        for age in range(n):
            envs = np.flatnonzero((self._pending > age) & (done | (age == n - 1)))
            if envs.size == 0:
                continue
            returns = np.zeros(envs.size, dtype=np.float32)
            for k in range(age + 1):
                returns += self.gamma**k * self._rewards[(self._t - age + k) % n, envs]
            start = (self._t - age) % n
            parts.append(
                Transitions(
                    obs=self._obs[start, envs],
                    actions=self._actions[start, envs],
                    rewards=returns,
                    next_obs=next_obs[envs],
                    terminated=np.asarray(terminated, dtype=np.float32)[envs],
                    discounts=np.full(envs.size, self.gamma ** (age + 1), dtype=np.float32),
                )
            )
        self._pending[done] = 0
        self._t += 1
        if not parts:
            return self._no_transitions()
        return Transitions(*(np.concatenate(field) for field in zip(*parts)))

    def _no_transitions(self) -> Transitions:
        obs = self._obs[0, :0]
        floats = np.zeros(0, dtype=np.float32)
        return Transitions(obs, self._actions[0, :0], floats, obs, floats, floats)
