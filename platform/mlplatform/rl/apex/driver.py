"""The Ape-X driver: routes experience between the actors, replaces the dead, evaluates, keeps the checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import ray
from tqdm.auto import tqdm

from mlplatform import storage
from mlplatform.cluster import connect_ray
from mlplatform.config import ConfigError, config_to_dict
from mlplatform.rl.agent import DQNAgent
from mlplatform.rl.apex.checkpoint import checkpoint_uri, read_checkpoint
from mlplatform.rl.apex.config import ApexConfig
from mlplatform.rl.apex.fleet import LOST_WITH_A_NODE, Fleet, actor_id
from mlplatform.rl.losses import linear_schedule
from mlplatform.rl.train import MetricsSink, TrainResult, evaluate, make_vector_env

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ApexResult(TrainResult):
    """How an Ape-X run ended, with the faults it survived."""

    workers_replaced: int = 0
    shards_replaced: int = 0
    learner_restarts: int = 0
    lost_transitions: int = 0
    """Transitions lost with dead shards, and blocks lost with a worker's node before they were stored."""
    lost_updates: int = 0
    """Learner updates made after its last checkpoint and lost with it."""
    learner_wait_fraction: float = 0.0
    resumed_from_update: int | None = None


class _ApexRun:
    """One run's event loop: every finished actor call is handled as it lands.

    The driver owns the checkpoint: the learner hands its state over as bytes, and the driver writes
    them to ``checkpoint_dir`` and keeps the last ones, so the learner's node keeps nothing that
    matters. When the learner dies (its node lost), a new one continues from those bytes: the
    updates since are lost (not made up in a burst), while env steps, the β schedule and the
    replay on the surviving shards carry on, since they live here and on the shards.
    """

    def __init__(self, config: ApexConfig, tracker: MetricsSink | None, resume: bool, progress: bool, extra: dict) -> None:
        probe = make_vector_env(config.env_id, 1)  # with the wrappers the workers use (Atari frames)
        obs_space, action_space = probe.single_observation_space, probe.single_action_space
        probe.close()
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ConfigError(f"DQN needs a discrete action space; {config.env_id} has {action_space}")
        self.latest = checkpoint_uri(config)
        self.last_checkpoint = read_checkpoint(config) if resume else None
        self.config, self.tracker, self.extra = config, tracker, extra
        self.started = time.perf_counter()

        num_gpus = config.learner_num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self.fleet = Fleet(config, obs_space, int(action_space.n), num_gpus, secrets.token_hex(3))
        self.result = ApexResult(
            env_steps=0, updates=0, seconds=0.0, final_eval_return=float("nan"), solved_at_step=None,
            checkpoint=self.latest, eval_history=[],
        )
        if self.last_checkpoint is not None:
            counters = ray.get(self.fleet.learner.restore.remote(self.last_checkpoint))
            self.result.env_steps, self.result.updates = counters["env_steps"], counters["updates"]
            self.result.resumed_from_update = counters["updates"]
            log.warning("resumed from %s at update %d, env step %d", self.latest, counters["updates"], counters["env_steps"])
        if tracker is not None:
            tracker.log_params({**config_to_dict(config), "learner_num_gpus": num_gpus})

        self.eval_agent = DQNAgent(obs_space.shape, int(action_space.n), dataclasses.replace(config, device="cpu"))
        [self.weights] = ray.get(self.fleet.learner.weights.remote())
        self.collecting: dict[ray.ObjectRef, tuple[int, ray.ObjectRef, ray.ObjectRef]] = {}
        self.adding: dict[ray.ObjectRef, tuple[int, str, ray.ObjectRef, ray.ObjectRef, int]] = {}
        self.training: ray.ObjectRef | None = None
        self.idle_workers: list[int] = []
        self.next_shard = 0
        self.next_eval = self.result.env_steps + config.eval_every
        self.next_checkpoint = self.result.updates + config.checkpoint_every
        self.episodes: list[tuple[int, float]] = []
        self.bar = tqdm(total=config.total_steps, initial=self.result.env_steps, unit="step", disable=not progress, mininterval=0.5)
        self.window = (time.perf_counter(), self.result.env_steps, self.result.updates)
        for index in range(config.num_workers):
            self.submit_collect(index)

    # ---- actor calls ----
    def submit_collect(self, index: int) -> None:
        block, priorities, stats = self.fleet.workers[index].collect.remote(self.weights)
        self.collecting[stats] = (index, block, priorities)

    def submit_add(self, block: ray.ObjectRef, priorities: ray.ObjectRef, size: int) -> None:
        index = self.next_shard % self.config.num_shards
        self.next_shard += 1
        shard = self.fleet.shards[index]
        self.adding[shard.add.remote(block, priorities)] = (index, actor_id(shard), block, priorities, size)

    def owed_updates(self) -> int:
        # updates lost with a learner are not made up in a burst (that would overfit the replay the loss thinned)
        due = int((self.result.env_steps - self.config.learning_starts) * self.config.updates_per_step)
        return due - self.result.lost_updates - self.result.updates

    def maybe_train(self) -> None:
        ready = min(self.fleet.shard_sizes) >= self.config.batch_size
        if self.training is None and ready and self.owed_updates() > 0:
            beta = linear_schedule(self.config.beta_start, self.config.beta_end, self.config.total_steps, self.result.env_steps)
            self.training = self.fleet.learner.train.remote(min(self.config.updates_per_call, self.owed_updates()), beta)

    def wake_idle_workers(self) -> None:
        # Backpressure: workers pause while the learner owes more than two calls' worth of updates,
        # unless a shard is too empty to sample from, which only more experience can fix.
        starved = min(self.fleet.shard_sizes) < self.config.batch_size
        while self.idle_workers and (starved or self.owed_updates() <= 2 * self.config.updates_per_call):
            self.submit_collect(self.idle_workers.pop())

    # ---- events ----
    def on_collected(self, ref: ray.ObjectRef) -> None:
        index, block, priorities = self.collecting.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError:
            log.warning("rollout worker %d died; starting a replacement", index)
            self.fleet.replace_worker(index)
            self.result.workers_replaced += 1
            self.log_faults()
            self.submit_collect(index)
            return
        except ray.exceptions.ObjectLostError:  # the weights it was sent were lost with the learner's node
            self.refresh_weights()
            self.submit_collect(index)
            return
        self.result.env_steps += stats["env_steps"]
        self.bar.update(stats["env_steps"])
        returns = stats["episode_returns"]
        self.episodes.extend((self.result.env_steps, value) for value in returns)
        if returns:
            self.bar.set_postfix(ret=f"{np.mean(returns):.0f}", refresh=False)
            self.log({"charts/episodic_return": float(np.mean(returns))})
        self.submit_add(block, priorities, stats["env_steps"])
        self.idle_workers.append(index)
        self.wake_idle_workers()

    def on_added(self, ref: ray.ObjectRef) -> None:
        index, shard_id, block, priorities, size = self.adding.pop(ref)
        try:
            self.fleet.shard_sizes[index] = ray.get(ref)
        except ray.exceptions.RayActorError:
            self.replace_shard(shard_id)
            self.submit_add(block, priorities, size)  # the block itself survived; only the shard's store is lost
        except ray.exceptions.ObjectLostError:  # the block died with its worker's node before a shard stored it
            self.result.lost_transitions += size
            self.log_faults()

    def replace_shard(self, dead_id: str) -> None:
        current = [actor_id(shard) for shard in self.fleet.shards]
        if dead_id not in current:
            return  # already replaced when another call noticed
        index = current.index(dead_id)
        lost = self.fleet.replace_shard(index)
        log.warning("replay shard %d died with %d transitions; starting an empty replacement", index, lost)
        self.result.shards_replaced += 1
        self.result.lost_transitions += lost
        self.fleet.learner.set_shards.remote(self.fleet.shards)
        self.log_faults()

    def on_trained(self, ref: ray.ObjectRef) -> None:
        self.training = None
        try:
            outcome = ray.get(ref)
        except LOST_WITH_A_NODE:
            self.restore_learner()
            return
        self.result.updates = outcome["updates"]
        [self.weights] = outcome["weights"]
        self.result.learner_wait_fraction = outcome["wait_fraction"]
        for dead in outcome["dead_shards"]:
            self.replace_shard(dead)
        if self.result.updates >= self.next_checkpoint:
            self.next_checkpoint += self.config.checkpoint_every
            self.save_checkpoint()
        now = time.perf_counter()
        since, steps, updates = self.window
        if now - since >= 2.0:
            self.window = (now, self.result.env_steps, self.result.updates)
            self.log({
                **outcome["metrics"],
                "charts/env_steps_per_s": (self.result.env_steps - steps) / (now - since),
                "charts/learner_updates_per_s": (self.result.updates - updates) / (now - since),
                "learner/wait_fraction": outcome["wait_fraction"],
            })
        self.wake_idle_workers()

    def maybe_evaluate(self) -> None:
        if self.result.env_steps < self.next_eval:
            return
        try:
            self.eval_agent.set_weights(ray.get(self.weights))
        except ray.exceptions.ObjectLostError:  # lost with the learner; evaluate once a new one publishes
            self.refresh_weights()
            return
        self.next_eval += self.config.eval_every
        returns = evaluate(self.eval_agent, self.config.env_id, self.config.eval_episodes, seed=self.config.seed + 10_000 + self.result.env_steps)
        self.result.eval_history.append((self.result.env_steps, float(returns.mean())))
        self.result.final_eval_return = float(returns.mean())
        self.bar.set_postfix(eval=f"{returns.mean():.0f}")
        self.log({"eval/mean_return": float(returns.mean()), "eval/std_return": float(returns.std())})
        if self.config.stop_at_return is not None and returns.mean() >= self.config.stop_at_return:
            self.result.solved_at_step = self.result.env_steps

    def save_checkpoint(self) -> None:
        try:
            checkpoint = ray.get(self.fleet.learner.checkpoint.remote(self.result.env_steps, self.extra))
        except LOST_WITH_A_NODE:
            self.restore_learner()
            return
        storage.write_bytes(self.latest, checkpoint)
        self.last_checkpoint = checkpoint

    def refresh_weights(self) -> None:
        """Take the learner's newest weights; a learner that cannot answer is restored."""
        try:
            [self.weights] = ray.get(self.fleet.learner.weights.remote())
        except LOST_WITH_A_NODE:
            self.restore_learner()

    def restore_learner(self) -> None:
        """The learner died (its node, most often): a new one continues from the last checkpoint of this run.

        A replacement placed on a node that is dying too (Ray notices a lost node only after a few
        missed heartbeats) dies as well; it is replaced again, up to ``max_restarts`` in all.
        """
        self.training = None
        before = self.result.updates
        while True:
            self.result.learner_restarts += 1
            self.log_faults()
            try:
                counters = self.fleet.replace_learner(self.last_checkpoint)
                [self.weights] = ray.get(self.fleet.learner.weights.remote())
                break
            except LOST_WITH_A_NODE:
                continue
        self.result.updates = counters["updates"] if counters else 0
        self.result.lost_updates += before - self.result.updates
        self.next_checkpoint = self.result.updates + self.config.checkpoint_every
        log.warning("the learner died at update %d; a new one continues from update %d", before, self.result.updates)
        self.log_faults()

    def log(self, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.result.env_steps)

    def log_faults(self) -> None:
        result = self.result
        if result.workers_replaced + result.shards_replaced + result.learner_restarts > self.config.max_restarts:
            raise RuntimeError(f"gave up after {self.config.max_restarts} replaced actors")
        self.log({
            "faults/workers_replaced": result.workers_replaced,
            "faults/shards_replaced": result.shards_replaced,
            "faults/learner_restarts": result.learner_restarts,
            "faults/lost_transitions": result.lost_transitions,
            "faults/lost_updates": result.lost_updates,
        })

    # ---- main loop ----
    def run(self) -> ApexResult:
        try:
            while self.result.env_steps < self.config.total_steps and self.result.solved_at_step is None:
                # after a replacement too: an empty new shard needs experience, a restored learner owes updates
                self.wake_idle_workers()
                self.maybe_train()
                pending = [*self.collecting, *self.adding, *([self.training] if self.training else [])]
                ready, _ = ray.wait(pending, num_returns=1, timeout=10.0)
                for ref in ready:
                    if ref in self.collecting:
                        self.on_collected(ref)
                    elif ref in self.adding:
                        self.on_added(ref)
                    else:
                        self.on_trained(ref)
                self.maybe_evaluate()
            if self.training is not None:
                self.on_trained(self.training)
            self.save_checkpoint()
        finally:
            self.bar.close()
            for actor in self.fleet.all():
                ray.kill(actor)
        self.result.seconds = time.perf_counter() - self.started
        self.finish_tracking()
        return self.result

    def finish_tracking(self) -> None:
        if self.tracker is None:
            return
        self.log({"charts/solved_at_step": self.result.solved_at_step or -1, "learner/updates": self.result.updates})
        if self.episodes:
            steps, values = zip(*self.episodes)
            self.tracker.log_learning_curve(steps, values, name="episodic_return", xlabel="env steps", ylabel="return")
        if self.result.eval_history:
            steps, values = zip(*self.result.eval_history)
            self.tracker.log_learning_curve(steps, values, name="eval_return", xlabel="env steps", ylabel="greedy return")
        if self.last_checkpoint is not None:
            with tempfile.TemporaryDirectory() as folder:
                local = Path(folder) / "latest.pt"
                local.write_bytes(self.last_checkpoint)
                self.tracker.log_checkpoint(local)


def train_apex(
    config: ApexConfig,
    tracker: MetricsSink | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    extra: dict | None = None,
) -> ApexResult:
    """Train Ape-X DQN on the cluster in ``RAY_ADDRESS``, else on a fresh local one (see :func:`~mlplatform.cluster.connect_ray`).

    Experience and updates stay near ``updates_per_step``: workers pause while the learner is
    behind and the learner waits while workers are, so a run learns the same on a slow laptop
    and a fast cluster; only the wall-clock time changes.

    Args:
        config: hyper-parameters and the actor layout.
        tracker: where params, metrics, curves and the checkpoint go (None: nowhere).
        resume: continue from ``<checkpoint_dir>/latest.pt`` (a path or storage URI) with its counters.
        progress: show a progress line.
        extra: plain values saved in every checkpoint (e.g. the MLflow run id, for resuming).

    Returns:
        Counters, timings, the evaluation history and the faults the run survived.

    Raises:
        ConfigError: the action space is not discrete, or ``resume`` finds no checkpoint.
    """
    connect_ray()
    return _ApexRun(config, tracker, resume, progress, dict(extra or {})).run()
