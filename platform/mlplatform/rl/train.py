"""The single-process DQN training loop: vector envs → n-step → replay → Double DQN updates."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from mlplatform.config import ConfigError, config_to_dict
from mlplatform.rl.agent import DQNAgent, DQNConfig
from mlplatform.rl.atari import clip_rewards, is_atari, make_atari_vector_env
from mlplatform.rl.losses import linear_schedule
from mlplatform.rl.frames import make_replay_buffer
from mlplatform.rl.nstep import NStepAccumulator

LOG_EVERY_UPDATES = 100


class MetricsSink(Protocol):
    """What the loop needs from a tracker (``mlplatform.mlops.tracking.ExperimentTracker`` fits)."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_learning_curve(self, steps: Any, values: Any, *, name: str, xlabel: str, ylabel: str) -> Any: ...
    def log_checkpoint(self, path: str | Path) -> Any: ...
    def flush(self) -> None: ...


@dataclasses.dataclass
class TrainResult:
    """How a run ended."""

    env_steps: int
    updates: int
    seconds: float
    final_eval_return: float
    solved_at_step: int | None
    checkpoint: str
    """Where the final checkpoint is: a local path or a storage URI."""
    eval_history: list[tuple[int, float]]


def make_vector_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """Synchronous vector env whose finished episodes reset within the same step.

    Same-step autoreset hands back the true last observation in ``info["final_obs"]``, which a
    truncated episode needs for its bootstrap target. Atari ids (``ALE/Pong-v5``) get the DQN
    preprocessing of :mod:`mlplatform.rl.atari`: ``(4, 84, 84)`` uint8 frame stacks.
    """
    if is_atari(env_id):
        return make_atari_vector_env(env_id, num_envs)
    return gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
    )


def true_next_obs(next_obs: np.ndarray, done: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The observation each env actually reached, before any automatic reset replaced it."""
    if not done.any():
        return next_obs
    reached = next_obs.copy()
    finished = np.flatnonzero(done)
    reached[finished] = np.stack(info["final_obs"][finished])
    return reached


def evaluate(agent: DQNAgent, env_id: str, episodes: int, seed: int) -> np.ndarray:
    """Greedy returns of ``episodes`` episodes played in parallel, one per env."""
    envs = make_vector_env(env_id, episodes)
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    running = np.ones(episodes, dtype=bool)
    while running.any():
        obs, rewards, terminated, truncated, _ = envs.step(agent.greedy_actions(obs))
        returns += rewards * running
        running &= ~(terminated | truncated)
    envs.close()
    return returns


RESUME_CHECKPOINT = "latest.pt"


def newest_resumable(output_dir: str | Path, env_id: str) -> tuple[Path, dict[str, Any]]:
    """The newest run folder of ``env_id``'s DQN under ``output_dir`` that holds a resume checkpoint, and the
    values saved with it (its MLflow run id among them).

    Raises:
        ConfigError: there is none.
    """
    folders = [f for f in Path(output_dir).glob(f"{env_id}__dqn__*") if (f / RESUME_CHECKPOINT).is_file()]
    if not folders:
        raise ConfigError(f"--resume found no {env_id} run with a {RESUME_CHECKPOINT} under {output_dir}")
    newest = max(folders, key=lambda folder: (folder / RESUME_CHECKPOINT).stat().st_mtime)
    return newest, torch.load(newest / RESUME_CHECKPOINT, map_location="cpu", weights_only=True).get("extra", {})


def train_dqn(
    config: DQNConfig,
    tracker: MetricsSink | None = None,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> TrainResult:
    """Train a Dueling Double DQN with n-step prioritized replay until solved or out of steps.

    Every ``config.checkpoint_every`` env steps the run saves ``<output_dir>/latest.pt``, which ``resume``
    continues from: counters, networks, optimizer and curves intact, ε and β on their schedules; the
    episodes under way and the replay buffer are lost (it refills before learning goes on).

    Args:
        config: hyper-parameters.
        tracker: where params, metrics, the learning curve and the checkpoint go (None: nowhere); on resume,
            the run the checkpoint names (``newest_resumable``).
        output_dir: folder for the checkpoints (a temporary one when None).
        progress: show a progress line with steps, episode return and steps/s.
        resume: continue from ``<output_dir>/latest.pt``.

    Returns:
        Counters, timings and the evaluation history of the run.

    Raises:
        ConfigError: the environment's action space is not discrete, or ``resume`` finds no checkpoint.
    """
    started = time.perf_counter()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    envs = make_vector_env(config.env_id, config.num_envs)
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        raise ConfigError(f"DQN needs a discrete action space; {config.env_id} has {envs.single_action_space}")
    obs_space = envs.single_observation_space
    agent = DQNAgent(obs_space.shape, int(envs.single_action_space.n), config)
    replay = make_replay_buffer(
        config.buffer_size, obs_space.shape, obs_space.dtype, prioritized=config.prioritized, alpha=config.alpha, seed=config.seed
    )
    atari = is_atari(config.env_id)
    nstep = NStepAccumulator(
        config.num_envs, obs_space.shape, obs_space.dtype, n_steps=config.n_steps, gamma=config.gamma
    )
    folder = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="dqn-"))
    latest = folder / RESUME_CHECKPOINT
    if resume and not latest.is_file():
        raise ConfigError(f"--resume found no checkpoint at {latest}")
    try:
        saved = agent.load(latest) if resume else {}
    except RuntimeError as e:  # torch's size mismatch: another network than the config's
        raise ConfigError(f"--resume: {latest} does not fit this config: {str(e).splitlines()[0]}") from None
    if tracker is not None and not resume:  # a resumed run has its parameters logged already
        tracker.log_params(config_to_dict(config))

    episode_returns = np.zeros(config.num_envs)
    finished_episodes: list[tuple[int, float]] = [tuple(pair) for pair in saved.get("finished_episodes", [])]
    eval_history: list[tuple[int, float]] = [tuple(pair) for pair in saved.get("eval_history", [])]
    solved_at: int | None = None
    update_credit = float(saved.get("update_credit", 0.0))
    next_eval = int(saved.get("next_eval", config.eval_every))
    next_checkpoint = agent.env_steps + config.checkpoint_every
    run_id = getattr(tracker, "run_id", None)

    def resume_values() -> dict[str, Any]:  # what the loop needs besides the agent to go on where it stopped
        return {"mlflow_run_id": run_id, "finished_episodes": finished_episodes, "eval_history": eval_history,
                "update_credit": update_credit, "next_eval": next_eval}

    bar = tqdm(total=config.total_steps, initial=agent.env_steps, unit="step", disable=not progress, mininterval=0.5,
               dynamic_ncols=True)

    obs, _ = envs.reset(seed=config.seed + agent.env_steps)  # a resumed run starts fresh episodes
    while agent.env_steps < config.total_steps:
        epsilon = linear_schedule(config.eps_start, config.eps_end, config.eps_decay_steps, agent.env_steps)
        actions = agent.act(obs, epsilon)
        next_obs, rewards, terminated, truncated, info = envs.step(actions)
        done = terminated | truncated
        # Atari learns from rewards clipped to their sign; returns are logged unclipped.
        learned = clip_rewards(rewards) if atari else rewards
        transitions = nstep.push(obs, actions, learned, true_next_obs(next_obs, done, info), terminated, truncated)
        if len(transitions):
            replay.add(*transitions)
        obs = next_obs  # easy to miss: finished envs already hold their reset observation here
        agent.env_steps += config.num_envs
        bar.update(config.num_envs)

        episode_returns += rewards
        for env in np.flatnonzero(done):
            finished_episodes.append((agent.env_steps, float(episode_returns[env])))
            if tracker is not None:
                tracker.log_metrics({"charts/episodic_return": episode_returns[env]}, step=agent.env_steps)
            bar.set_postfix(ret=f"{episode_returns[env]:.0f}", eps=f"{epsilon:.2f}", refresh=False)
        episode_returns[done] = 0.0

        # ---- learning: a fixed ratio of gradient updates to environment steps ----
        if agent.env_steps >= config.learning_starts and len(replay) >= config.batch_size:
            update_credit += config.num_envs * config.updates_per_step
            beta = linear_schedule(config.beta_start, config.beta_end, config.total_steps, agent.env_steps)
            while update_credit >= 1.0:
                update_credit -= 1.0
                batch = replay.sample(config.batch_size, beta=beta)
                metrics, priorities = agent.learn(batch)
                replay.update_priorities(batch.indices, priorities)
                if tracker is not None and agent.updates % LOG_EVERY_UPDATES == 0:
                    sps = agent.env_steps / (time.perf_counter() - started)
                    metrics |= {"charts/epsilon": epsilon, "charts/beta": beta, "charts/SPS": sps}
                    tracker.log_metrics(metrics, step=agent.env_steps)

        # ---- periodic greedy evaluation, with early stop once solved ----
        if agent.env_steps >= next_eval or agent.env_steps >= config.total_steps:
            next_eval += config.eval_every
            returns = evaluate(agent, config.env_id, config.eval_episodes, seed=config.seed + 10_000 + agent.env_steps)
            eval_history.append((agent.env_steps, float(returns.mean())))
            if tracker is not None:
                tracker.log_metrics(
                    {"eval/mean_return": returns.mean(), "eval/std_return": returns.std()}, step=agent.env_steps
                )
            bar.set_postfix(eval=f"{returns.mean():.0f}", eps=f"{epsilon:.2f}")
            if config.stop_at_return is not None and returns.mean() >= config.stop_at_return:
                solved_at = agent.env_steps
                break

        if agent.env_steps >= next_checkpoint:
            next_checkpoint += config.checkpoint_every
            if tracker is not None:  # what was logged up to the checkpoint outlives a crash, as the checkpoint does
                tracker.flush()
            agent.save(latest, extra=resume_values())
    bar.close()
    envs.close()

    agent.save(latest, extra=resume_values())  # a finished run goes on too, given more steps
    checkpoint = agent.save(folder / "checkpoint.pt", extra=resume_values())
    if tracker is not None:
        tracker.log_metrics({"charts/solved_at_step": solved_at or -1}, step=agent.env_steps)
        if finished_episodes:
            steps, values = zip(*finished_episodes)
            tracker.log_learning_curve(steps, values, name="episodic_return", xlabel="env steps", ylabel="return")
        if eval_history:
            steps, values = zip(*eval_history)
            tracker.log_learning_curve(steps, values, name="eval_return", xlabel="env steps", ylabel="greedy return")
        tracker.log_checkpoint(checkpoint)
    return TrainResult(
        env_steps=agent.env_steps,
        updates=agent.updates,
        seconds=time.perf_counter() - started,
        final_eval_return=eval_history[-1][1] if eval_history else float("nan"),
        solved_at_step=solved_at,
        checkpoint=checkpoint,
        eval_history=eval_history,
    )
