"""Learner: a Ray actor that trains on samples from all shards and publishes its weights."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.actor import ActorHandle

from mlplatform.rl.agent import DQNAgent
from mlplatform.rl.apex.config import ApexConfig
from mlplatform.rl.replay import ReplaySample


class Learner:
    """Keeps several sample requests in flight across shards and learns from whichever lands first.

    New priorities go back to the shard that produced each batch (its ids mean nothing to the
    others), and the weights are put in the object store every ``publish_weights_every``
    updates, where workers pick them up.

    Args:
        obs_shape: shape of one observation.
        num_actions: number of discrete actions.
        config: the run config.
        shards: the replay shard actors.
        device: torch device to train on.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        num_actions: int,
        config: ApexConfig,
        shards: list[ActorHandle],
        device: str = "cpu",
    ) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.agent = DQNAgent(obs_shape, num_actions, dataclasses.replace(config, device=device))
        self.shards = list(shards)
        self.dead: set[int] = set()
        self.next_shard = 0
        self.in_flight: dict[ray.ObjectRef, int] = {}
        self.priority_writes: list[ray.ObjectRef] = []
        self.weights_ref = ray.put(self.agent.weights())
        self.seconds_training = 0.0
        self.seconds_waiting = 0.0

    def set_shards(self, shards: list[ActorHandle]) -> None:
        """Swap in a new shard list (after the driver replaced a dead shard)."""
        self.shards = list(shards)
        self.dead.clear()
        self.in_flight.clear()

    def weights(self) -> list[ray.ObjectRef]:
        """The latest published weights, as a reference (wrapped so Ray does not resolve it)."""
        return [self.weights_ref]

    def train(self, num_updates: int, beta: float) -> dict[str, Any]:
        """Run ``num_updates`` gradient updates on batches drawn from the shards.

        Returns:
            Counters, the last update's metrics, the published weights reference, the share of
            time spent waiting for samples, and the actor ids of shards found dead.
        """
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        done = 0
        while done < num_updates and len(self.dead) < len(self.shards):
            self._request_samples(beta)
            waiting = time.perf_counter()
            [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
            index = self.in_flight.pop(ref)
            try:
                batch = ray.get(ref)
            except ray.exceptions.RayActorError:
                self.dead.add(index)
                batch = None
            self.seconds_waiting += time.perf_counter() - waiting
            if batch is None:
                continue
            # Arrays from the object store are read-only views; torch wants writable memory.
            batch = ReplaySample(*(np.array(column) for column in batch))
            metrics, priorities = self.agent.learn(batch)
            self.priority_writes.append(self.shards[index].update_priorities.remote(batch.indices, priorities))
            done += 1
            if self.agent.updates % self.config.publish_weights_every == 0:
                self.weights_ref = ray.put(self.agent.weights())
        self._collect_priority_writes()
        self.seconds_training += time.perf_counter() - started
        return {
            "updates": self.agent.updates,
            "metrics": metrics,
            "weights": [self.weights_ref],
            "wait_fraction": self.seconds_waiting / max(self.seconds_training, 1e-9),
            "dead_shards": [self.shards[i]._actor_id.hex() for i in sorted(self.dead)],
        }

    def _request_samples(self, beta: float) -> None:
        while len(self.in_flight) < self.config.samples_in_flight:
            index = self.next_shard % len(self.shards)
            self.next_shard += 1
            if index not in self.dead:
                self.in_flight[self.shards[index].sample.remote(self.config.batch_size, beta)] = index

    def _collect_priority_writes(self) -> None:
        # Fire-and-forget writes still have to be collected, or a dead shard's errors pile up.
        ready, self.priority_writes = ray.wait(
            self.priority_writes, num_returns=len(self.priority_writes), timeout=0
        )
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # the shard is gone; the driver replaces it and reports its lost data

    def checkpoint(self, env_steps: int, extra: dict[str, Any]) -> bytes:
        """Networks, optimizer and counters as bytes: the driver stores them, so no path on this node matters."""
        self.agent.env_steps = env_steps
        return self.agent.checkpoint_bytes(extra=extra)

    def restore(self, checkpoint: bytes) -> dict[str, Any]:
        """Continue from :meth:`checkpoint`'s bytes; returns its counters and the extra entries saved with it."""
        extra = self.agent.load_checkpoint_bytes(checkpoint)
        self.weights_ref = ray.put(self.agent.weights())
        return {"updates": self.agent.updates, "env_steps": self.agent.env_steps, "extra": extra}


LearnerActor = ray.remote(Learner)
