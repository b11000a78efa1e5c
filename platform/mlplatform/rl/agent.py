"""Single-process Dueling Double DQN: the run config, ε-greedy acting, learning and checkpoints."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import pydantic
import torch
from pydantic.dataclasses import dataclass

from mlplatform import storage
from mlplatform.config import RUN_CONFIG, config_to_dict
from mlplatform.rl.atari import is_atari, register_atari_envs
from mlplatform.rl.losses import double_dqn_targets, td_loss
from mlplatform.rl.model import DuelingDQN
from mlplatform.rl.nstep import Transitions
from mlplatform.rl.replay import ReplaySample


@dataclass(config=RUN_CONFIG)
class QLearningConfig:
    """What every DQN trainer shares: environment, replay, targets, optimizer, evaluation, tracking.

    Every field can be set from YAML or ``--set key=value``; the trainers extend it.
    """

    env_id: str = "CartPole-v1"
    """Gymnasium environment id (discrete actions)."""
    seed: int = 1
    """Seed for the networks, the environments, exploration and replay sampling."""
    total_steps: int = pydantic.Field(50_000, ge=1)
    """Environment steps to run (summed over the parallel envs)."""
    num_envs: int = pydantic.Field(4, ge=1)
    """Parallel environments stepped together (per rollout worker under Ape-X)."""
    buffer_size: int = pydantic.Field(50_000, ge=1)
    """Replay capacity in transitions."""
    prioritized: bool = True
    """Sample replay by TD error (PER) instead of uniformly."""
    alpha: float = pydantic.Field(0.6, ge=0.0)
    """PER priority exponent: 0 is uniform, 1 is fully proportional to |TD error|."""
    beta_start: float = pydantic.Field(0.4, ge=0.0, le=1.0)
    """PER importance-sampling exponent at the start, annealed linearly to ``beta_end``."""
    beta_end: float = pydantic.Field(1.0, ge=0.0, le=1.0)
    """PER importance-sampling exponent at the end of the run."""
    n_steps: int = pydantic.Field(3, ge=1)
    """Steps summed into each return before bootstrapping."""
    gamma: float = pydantic.Field(0.99, ge=0.0, le=1.0)
    """Discount factor."""
    learning_rate: float = pydantic.Field(1e-3, gt=0.0)
    """Adam learning rate."""
    batch_size: int = pydantic.Field(64, ge=1)
    """Transitions per gradient update."""
    learning_starts: int = pydantic.Field(1_000, ge=0)
    """Environment steps of pure exploration before the first update."""
    updates_per_step: float = pydantic.Field(0.5, gt=0.0)
    """Gradient updates per environment step once learning has started."""
    target_update_every: int = pydantic.Field(250, ge=1)
    """Updates between hard copies of the online network into the target (when ``tau`` is 1)."""
    tau: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    """Target sync rate: 1 copies every ``target_update_every`` updates, < 1 is Polyak every update."""
    max_grad_norm: float = pydantic.Field(10.0, gt=0.0)
    """Gradient clipping threshold on the global L2 norm."""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """Widths of the MLP torso for vector observations."""
    eval_every: int = pydantic.Field(2_000, ge=1)
    """Environment steps between greedy evaluations."""
    eval_episodes: int = pydantic.Field(20, ge=1)
    """Episodes per greedy evaluation, run in parallel."""
    stop_at_return: float | None = 475.0
    """Stop as soon as a greedy evaluation reaches this mean return (None runs to the end)."""
    device: str = "cpu"
    """Torch device for the networks: cpu, cuda, cuda:1, ..."""
    torch_threads: int = pydantic.Field(1, ge=0)
    """CPU threads for torch in this process (0 keeps torch's default); small MLPs run fastest on one."""
    experiment_name: str = "dqn"
    """MLflow experiment the run is logged under."""

    @pydantic.field_validator("env_id")
    @classmethod
    def _known_env(cls, env_id: str) -> str:
        try:
            if is_atari(env_id):
                register_atari_envs()
            gym.spec(env_id)
        except gym.error.Error as e:
            raise ValueError(f"unknown gymnasium environment: {e}") from None
        except ImportError as e:
            raise ValueError(str(e)) from None
        return env_id

    @pydantic.field_validator("hidden_sizes")
    @classmethod
    def _positive_widths(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if not sizes or min(sizes) < 1:
            raise ValueError("hidden_sizes needs at least one layer, each width >= 1")
        return sizes

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> QLearningConfig:
        if self.batch_size > self.buffer_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) cannot exceed buffer_size ({self.buffer_size})"
            )
        return self


@dataclass(config=RUN_CONFIG)
class DQNConfig(QLearningConfig):
    """One single-process DQN run: ε decays on a schedule while one loop acts and learns."""

    algorithm: Literal["dqn"] = "dqn"
    """Which trainer reads this config; job entrypoints dispatch on it."""
    eps_start: float = pydantic.Field(1.0, ge=0.0, le=1.0)
    """Exploration rate at the start."""
    eps_end: float = pydantic.Field(0.02, ge=0.0, le=1.0)
    """Exploration rate after the decay."""
    eps_decay_steps: int = pydantic.Field(10_000, ge=0)
    """Environment steps over which ε decays linearly from start to end."""
    checkpoint_every: int = pydantic.Field(10_000, ge=1)
    """Environment steps between resume checkpoints (``<output_dir>/latest.pt``: networks, optimizer, counters, the
    curves so far; not the replay buffer, which a resumed run refills before it learns again)."""

    @pydantic.model_validator(mode="after")
    def _schedule(self) -> DQNConfig:
        if self.eps_end > self.eps_start:
            raise ValueError(f"eps_end ({self.eps_end}) must not exceed eps_start ({self.eps_start})")
        return self


class DQNAgent:
    """Online and target Dueling Q-networks, their optimizer and the counters of one run.

    Args:
        obs_shape: shape of one observation.
        num_actions: number of discrete actions.
        config: the run's hyper-parameters.
    """

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, config: QLearningConfig) -> None:
        self.config = config
        self.num_actions = num_actions
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.online = DuelingDQN(obs_shape, num_actions, hidden_sizes=config.hidden_sizes)
        self.online.to(self.device)
        self.target = DuelingDQN(obs_shape, num_actions, hidden_sizes=config.hidden_sizes)
        self.target.to(self.device).load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self._parameters = list(self.online.parameters())
        self.optimizer = torch.optim.Adam(self._parameters, lr=config.learning_rate, fused=True)
        self.rng = np.random.default_rng(config.seed)
        self.env_steps = 0
        self.updates = 0

    @torch.no_grad()
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """argmax_a Q(s, a) for a batch of observations."""
        q_values = self.online(torch.as_tensor(obs, device=self.device))
        return q_values.argmax(dim=1).cpu().numpy()

    def act(self, obs: np.ndarray, epsilon: float | np.ndarray) -> np.ndarray:
        """ε-greedy actions for a batch: row i explores with probability ε (or ``epsilon[i]``)."""
        actions = self.greedy_actions(obs)
        explore = self.rng.random(len(actions)) < epsilon
        actions[explore] = self.rng.integers(self.num_actions, size=int(explore.sum()))
        return actions

    def learn(self, batch: ReplaySample) -> tuple[dict[str, float], np.ndarray]:
        """One gradient step on the importance-weighted Double DQN loss.

        Returns:
            Scalar metrics for logging and the absolute TD errors, the batch's new priorities.
        """
        obs, next_obs = (torch.as_tensor(x, device=self.device) for x in (batch.obs, batch.next_obs))
        actions = torch.as_tensor(batch.actions, device=self.device)
        rewards, terminated, discounts, weights = (
            torch.as_tensor(x, device=self.device)
            for x in (batch.rewards, batch.terminated, batch.discounts, batch.weights)
        )
        with torch.no_grad():
            targets = double_dqn_targets(
                rewards, terminated, discounts, self.online(next_obs), self.target(next_obs)
            )
        q_taken = self.online(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss, td_errors = td_loss(q_taken, targets, weights)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        self._sync_target()
        metrics = {
            "losses/td_loss": loss.item(),
            "losses/q_values": q_taken.mean().item(),
            "losses/grad_norm": grad_norm.item(),
        }
        return metrics, td_errors.abs().cpu().numpy()

    @torch.no_grad()
    def initial_priorities(self, block: Transitions) -> np.ndarray:
        """|TD error| of fresh transitions under the current networks (an Ape-X actor's priorities)."""
        obs, next_obs = (torch.as_tensor(x, device=self.device) for x in (block.obs, block.next_obs))
        rewards, terminated, discounts = (
            torch.as_tensor(x, device=self.device) for x in (block.rewards, block.terminated, block.discounts)
        )
        actions = torch.as_tensor(block.actions, device=self.device).unsqueeze(1)
        targets = double_dqn_targets(rewards, terminated, discounts, self.online(next_obs), self.target(next_obs))
        q_taken = self.online(obs).gather(1, actions).squeeze(1)
        return (targets - q_taken).abs().cpu().numpy()

    def weights(self) -> dict[str, torch.Tensor]:
        """The online network's parameters on the CPU, ready to ship to other processes."""
        return {name: tensor.detach().cpu() for name, tensor in self.online.state_dict().items()}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load published weights into both networks (actors keep no separate target)."""
        self.online.load_state_dict(weights)
        self.target.load_state_dict(weights)

    def _sync_target(self) -> None:
        if self.config.tau < 1.0:
            with torch.no_grad():
                for target, online in zip(self.target.parameters(), self._parameters):
                    target.lerp_(online, self.config.tau)
        elif self.updates % self.config.target_update_every == 0:
            self.target.load_state_dict(self.online.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run: networks, optimizer, counters, config, RNG."""
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "env_steps": self.env_steps,
            "updates": self.updates,
            "config": config_to_dict(self.config),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` produced."""
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.env_steps = int(state["env_steps"])
        self.updates = int(state["updates"])
        self.rng.bit_generator.state = state["rng"]

    def checkpoint_bytes(self, *, extra: dict[str, Any] | None = None) -> bytes:
        """The checkpoint as bytes (plain tensors and Python values only), ready to ship or store anywhere.

        Args:
            extra: plain values stored beside the state (e.g. the MLflow run id).
        """
        buffer = io.BytesIO()
        torch.save({**self.state_dict(), "extra": dict(extra or {})}, buffer)
        return buffer.getvalue()

    def load_checkpoint_bytes(self, data: bytes) -> dict[str, Any]:
        """Restore what :meth:`checkpoint_bytes` produced; never unpickles arbitrary objects.

        Returns:
            The ``extra`` values saved with it.
        """
        state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        self.load_state_dict(state)
        return state.get("extra", {})

    def save(self, location: str | Path, *, extra: dict[str, Any] | None = None) -> str:
        """Write a checkpoint to a path or storage URI (see :mod:`mlplatform.storage`), whole or not at all.

        Args:
            location: where to write; the previous checkpoint stays intact if writing fails midway.
            extra: plain values stored beside the state (e.g. the MLflow run id).
        """
        storage.write_bytes(str(location), self.checkpoint_bytes(extra=extra))
        return str(location)

    def load(self, location: str | Path) -> dict[str, Any]:
        """Read a checkpoint written by :meth:`save`; returns the ``extra`` values saved with it."""
        return self.load_checkpoint_bytes(storage.read_bytes(str(location)))
