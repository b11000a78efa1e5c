"""The Ape-X run config and the per-actor exploration rates of the paper."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic
from pydantic.dataclasses import dataclass

from mlplatform.config import RUN_CONFIG
from mlplatform.rl.agent import QLearningConfig


@dataclass(config=RUN_CONFIG)
class ApexConfig(QLearningConfig):
    """One Ape-X run: rollout workers fill replay shards, one learner trains, a driver watches."""

    algorithm: Literal["apex"] = "apex"
    """Which trainer reads this config; job entrypoints dispatch on it."""
    total_steps: int = pydantic.Field(100_000, ge=1)
    """Environment steps to run, summed over all workers."""
    num_workers: int = pydantic.Field(2, ge=1)
    """Rollout worker actors."""
    num_shards: int = pydantic.Field(2, ge=1)
    """Replay shard actors; ``buffer_size`` is split evenly between them."""
    eps_base: float = pydantic.Field(0.4, gt=0.0, lt=1.0)
    """Ape-X ε: env slot i of N gets ``eps_base ** (1 + eps_alpha * i / (N - 1))``."""
    eps_alpha: float = pydantic.Field(7.0, ge=0.0)
    """Ape-X exponent spreading ε across the env slots."""
    rollout_steps: int = pydantic.Field(50, ge=1)
    """Vector steps per worker call; a worker takes the newest weights before each call."""
    updates_per_call: int = pydantic.Field(50, ge=1)
    """Learner updates per call; the driver checks on the actors between calls."""
    samples_in_flight: int = pydantic.Field(4, ge=2)
    """Sample requests the learner keeps outstanding across shards, hiding their latency."""
    publish_weights_every: int = pydantic.Field(50, ge=1)
    """Learner updates between weight publications to the object store."""
    checkpoint_every: int = pydantic.Field(2_000, ge=1)
    """Learner updates between checkpoints (model, optimizer, counters)."""
    checkpoint_dir: str = "checkpoints/apex"
    """Folder or storage URI for ``latest.pt``, written by the driver; a relative one goes under $MLPLATFORM_STORAGE, else the working folder."""
    worker_num_cpus: float = pydantic.Field(0.5, ge=0.0)
    """CPUs reserved per rollout worker."""
    learner_num_cpus: float = pydantic.Field(1.0, ge=0.0)
    """CPUs reserved for the learner."""
    learner_num_gpus: float | None = None
    """GPUs for the learner; None takes one when the cluster has any, else trains on CPU."""
    experiment_name: str = "apex"
    """MLflow experiment the run is logged under."""
    max_restarts: int = pydantic.Field(10, ge=0)
    """Dead workers, shards and learners replaced before the run gives up."""

    @pydantic.model_validator(mode="after")
    def _enough_warmup(self) -> ApexConfig:
        if self.buffer_size // self.num_shards < self.batch_size:
            raise ValueError(
                f"each of the {self.num_shards} shards holds {self.buffer_size // self.num_shards} "
                f"transitions, fewer than batch_size ({self.batch_size})"
            )
        if self.learning_starts < self.num_shards * self.batch_size:
            raise ValueError(
                f"learning_starts ({self.learning_starts}) must be at least num_shards * batch_size "
                f"({self.num_shards * self.batch_size}) so every shard can fill a batch"
            )
        return self


def apex_epsilons(num_slots: int, *, eps_base: float, eps_alpha: float) -> np.ndarray:
    """ε_i = eps_base ** (1 + eps_alpha * i / (N - 1)) for i = 0..N-1 (Ape-X, section 4).

    A single slot gets ``eps_base``. Slots are the envs of all workers together, so with one env
    per worker this is the paper's per-actor ε; with several each env explores at its own rate.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got num_slots={num_slots}")
    if num_slots == 1:
        return np.array([eps_base])
    exponents = 1.0 + eps_alpha * np.arange(num_slots) / (num_slots - 1)
    return eps_base**exponents
