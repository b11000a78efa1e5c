"""The actors of one Ape-X run: where each is placed, and how a dead one is replaced (the learner from its checkpoint)."""

from __future__ import annotations

import gymnasium as gym
import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mlplatform.rl.apex.config import ApexConfig, apex_epsilons
from mlplatform.rl.apex.learner import LearnerActor
from mlplatform.rl.apex.rollout import RolloutWorkerActor
from mlplatform.rl.apex.shard import ReplayShardActor


LOST_WITH_A_NODE = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
"""What a call raises when its actor, or the answer it had stored, went with a lost node."""


def actor_id(actor: ActorHandle) -> str:
    """The actor's id as hex, to tell a replacement from the actor it replaced."""
    return actor._actor_id.hex()


def round_robin_node(index: int) -> NodeAffinitySchedulingStrategy:
    """The ``index``-th alive node in turn, as a soft preference that moves on when it is full or gone.

    Ray's ``SPREAD`` does not spread actors that reserve no CPU (replay shards, and workers at
    ``worker_num_cpus=0``): they may all land on one node, which then takes the whole replay with it.
    """
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    return NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=True, _spill_on_unavailable=True)


class Fleet:
    """The rollout workers, replay shards and learner of one run.

    Workers and shards take the cluster's nodes in turn (`round_robin_node`; shard k one node on from
    worker k), so losing one node loses only part of the experience and the replay; the learner goes
    where its CPUs and GPU fit. Every actor is named ``apex-<run>-<kind>-<index>.<generation>`` so
    operators (and the fault tests) can find it; a replacement gets the next generation.

    Args:
        config: the run config.
        obs_space: one observation's space, with the wrappers the workers use.
        num_actions: the discrete action count.
        learner_gpus: GPUs the learner reserves (it trains on CUDA when above 0).
        tag: this run's name among the actors of the cluster.
    """

    def __init__(self, config: ApexConfig, obs_space: gym.Space, num_actions: int, learner_gpus: float, tag: str) -> None:
        self.config = config
        self.obs_space = obs_space
        self.num_actions = num_actions
        self.learner_gpus = learner_gpus
        self.tag = tag
        slots = apex_epsilons(config.num_workers * config.num_envs, eps_base=config.eps_base, eps_alpha=config.eps_alpha)
        self.epsilons = slots.reshape(config.num_workers, config.num_envs)
        self.generation = {"worker": [0] * config.num_workers, "shard": [0] * config.num_shards, "learner": [0]}
        self.workers = [self._start_worker(i) for i in range(config.num_workers)]
        self.shards = [self._start_shard(k) for k in range(config.num_shards)]
        self.shard_sizes = [0] * config.num_shards
        self.learner = self._start_learner()

    def _name(self, kind: str, index: int) -> str:
        return f"apex-{self.tag}-{kind}-{index}.{self.generation[kind][index]}"

    def _start_worker(self, index: int) -> ActorHandle:
        options = {"num_cpus": self.config.worker_num_cpus, "name": self._name("worker", index),
                   "scheduling_strategy": round_robin_node(index)}
        return RolloutWorkerActor.options(**options).remote(
            self.config, index, self.epsilons[index], self.generation["worker"][index]
        )

    def _start_shard(self, index: int) -> ActorHandle:
        placement = round_robin_node(index + 1)
        return ReplayShardActor.options(num_cpus=0, name=self._name("shard", index), scheduling_strategy=placement).remote(
            self.config.buffer_size // self.config.num_shards,
            self.obs_space.shape,
            self.obs_space.dtype.str,
            prioritized=self.config.prioritized,
            alpha=self.config.alpha,
            seed=self.config.seed + 7_919 * index + 104_729 * self.generation["shard"][index],
        )

    def _start_learner(self) -> ActorHandle:
        options = {"num_cpus": self.config.learner_num_cpus, "num_gpus": self.learner_gpus, "name": self._name("learner", 0)}
        device = "cuda" if self.learner_gpus > 0 else "cpu"
        return LearnerActor.options(**options).remote(self.obs_space.shape, self.num_actions, self.config, self.shards, device)

    def replace_worker(self, index: int) -> None:
        self.generation["worker"][index] += 1
        self.workers[index] = self._start_worker(index)

    def replace_shard(self, index: int) -> int:
        """Start an empty shard in place of a dead one; returns the transitions lost with it."""
        lost, self.shard_sizes[index] = self.shard_sizes[index], 0
        self.generation["shard"][index] += 1
        self.shards[index] = self._start_shard(index)
        return lost

    def replace_learner(self, checkpoint: bytes | None) -> dict | None:
        """Start a new learner on the current shards, from ``checkpoint`` when there is one.

        Returns:
            The restored counters (``updates``, ``env_steps``, ``extra``), or None for a fresh learner.
        """
        ray.kill(self.learner)  # it may be alive but unreachable; a second learner must never train
        self.generation["learner"][0] += 1
        self.learner = self._start_learner()
        return ray.get(self.learner.restore.remote(checkpoint)) if checkpoint is not None else None

    def all(self) -> list[ActorHandle]:
        return [*self.workers, *self.shards, self.learner]
