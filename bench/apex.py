"""Benchmark: Ape-X throughput at 1 and 2 workers, and CartPole-v1 solve cost vs single-process DQN and RLlib DQN, as one JSON line."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import ray
import torch

from mlplatform.rl.agent import DQNConfig
from mlplatform.rl.apex.config import ApexConfig
from mlplatform.rl.apex.driver import train_apex
from mlplatform.rl.train import evaluate, train_dqn

ENV = "CartPole-v1"
SOLVED = 475.0
EVAL_EVERY = 2_000
EVAL_EPISODES = 20
THROUGHPUT_STEPS = 20_000
COLLECT_BOUND_UPDATES_PER_STEP = 0.01
DEFAULT_UPDATES_PER_STEP = ApexConfig().updates_per_step
RLLIB_MAX_STEPS = 100_000
TIME_LIMIT_S = 300.0
PEER_NOTES = (
    "RLlib 2.60 DQN, new API stack, one local EnvRunner with 4 envs (num_env_runners=0), local learner, "
    "torch 1 thread. Matched: dueling, double Q, MLP 128-128 ReLU + 128-unit value/advantage heads, "
    "PER alpha 0.6 over a 50k buffer, 3-step returns, Adam lr 1e-3, gamma 0.99, batch 64, Huber loss, "
    "grad-norm clip 10, learning starts at 1k steps, 0.5 updates per env step (training_intensity=32 with "
    "rollout_fragment_length=4 x 4 envs gives 8 updates per 16 steps), hard target sync every 500 env steps "
    "(= our 250 updates; RLlib counts env steps). Differs: PER beta fixed at 0.4 (ours anneals 0.4->1.0), "
    "RLlib's PER eps and n-step sampling over episodes (n drawn per sample from stored episodes, bootstraps "
    "truncations its own way), epsilon 1.0->0.02 over 10k steps as our single-process agent (Ape-X instead "
    "uses fixed per-env eps_i = 0.4^(1+7i/(N-1))). Greedy evaluation is the same function for all three "
    "(mlplatform.rl.train.evaluate: 20 parallel episodes, seed + 10000 + env_steps) run every 2k env steps; "
    "RLlib checks after the first train() iteration that crosses each 2k boundary (iterations are ~1k steps). "
    "Seconds exclude ray.init, include actor/algorithm construction and evaluation. A run slower than "
    f"{TIME_LIMIT_S:.0f} s counts as unsolved."
)


def log(message: str) -> None:
    print(f"[apex-bench] {message} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


def throughput(num_workers: int, updates_per_step: float) -> dict[str, float]:
    """One fixed-budget Ape-X run without evaluation; rates over the whole run, startup included."""
    with tempfile.TemporaryDirectory() as tmp:
        config = ApexConfig(
            num_workers=num_workers,
            total_steps=THROUGHPUT_STEPS,
            updates_per_step=updates_per_step,
            stop_at_return=None,
            eval_every=10**9,
            checkpoint_dir=tmp,
            worker_num_cpus=0.5,
            learner_num_cpus=1.0,
        )
        result = train_apex(config, progress=False)
    return {
        "frames_per_s": result.env_steps / result.seconds,
        "updates_per_s": result.updates / result.seconds,
        "learner_wait_fraction": result.learner_wait_fraction,
    }


def solve_apex(seed: int) -> tuple[int | None, float]:
    with tempfile.TemporaryDirectory() as tmp:
        result = train_apex(ApexConfig(seed=seed, checkpoint_dir=tmp), progress=False)
    return result.solved_at_step, result.seconds


def solve_single(seed: int) -> tuple[int | None, float]:
    with tempfile.TemporaryDirectory() as tmp:
        result = train_dqn(DQNConfig(seed=seed), tracker=None, output_dir=tmp, progress=False)
    return result.solved_at_step, result.seconds


class RLlibGreedy:
    """Gives an RLlib module the ``greedy_actions`` our evaluator calls."""

    def __init__(self, module: Any) -> None:
        self.module = module

    @torch.no_grad()
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.module.forward_inference({"obs": torch.as_tensor(obs)})["actions"].numpy()


def rllib_config(seed: int) -> Any:
    from ray.rllib.algorithms.dqn import DQNConfig as RLlibDQNConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    return (
        RLlibDQNConfig()
        .environment(ENV)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=4, rollout_fragment_length=4)
        .training(
            lr=1e-3,
            gamma=0.99,
            train_batch_size=64,
            n_step=3,
            dueling=True,
            double_q=True,
            replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": 50_000, "alpha": 0.6, "beta": 0.4},
            target_network_update_freq=500,
            num_steps_sampled_before_learning_starts=1_000,
            training_intensity=32,
            epsilon=[(0, 1.0), (10_000, 0.02)],
            grad_clip=10.0,
            grad_clip_by="global_norm",
            td_error_loss_fn="huber",
        )
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[128, 128], fcnet_activation="relu", head_fcnet_hiddens=[128]))
        .debugging(seed=seed)
    )


def solve_rllib(seed: int) -> tuple[int | None, float]:
    torch.set_num_threads(1)
    started = time.perf_counter()
    algo = rllib_config(seed).build_algo()
    greedy = RLlibGreedy(algo.get_module())
    steps, next_eval, solved_at = 0, EVAL_EVERY, None
    try:
        while solved_at is None and steps < RLLIB_MAX_STEPS and time.perf_counter() - started < TIME_LIMIT_S:
            steps = int(algo.train()["env_runners"]["num_env_steps_sampled_lifetime"])
            if steps >= next_eval:
                next_eval = (steps // EVAL_EVERY + 1) * EVAL_EVERY
                mean = float(evaluate(greedy, ENV, EVAL_EPISODES, seed=seed + 10_000 + steps).mean())
                log(f"rllib seed {seed}: {steps} steps, greedy mean {mean:.1f}")
                if mean >= SOLVED:
                    solved_at = steps
    finally:
        algo.stop()
    return solved_at, time.perf_counter() - started


def summarize(name: str, solve: Any, seeds: list[int]) -> dict[str, Any]:
    """Per-seed results; medians count an unsolved seed as infinitely slow (null when most fail)."""
    per_seed: dict[str, dict[str, float | None]] = {}
    for seed in seeds:
        log(f"{name} seed {seed}: start")
        steps, seconds = solve(seed)
        if steps is not None and seconds > TIME_LIMIT_S:
            steps = None
        per_seed[str(seed)] = {"steps": steps, "seconds": round(seconds, 1) if steps is not None else None}
        log(f"{name} seed {seed}: solved at {steps} in {seconds:.1f} s")

    def median(key: str) -> float | None:
        value = statistics.median(math.inf if r[key] is None else r[key] for r in per_seed.values())
        return None if math.isinf(value) else value

    solved = sum(r["steps"] is not None for r in per_seed.values())
    return {"per_seed": per_seed, "median_steps": median("steps"), "median_seconds": median("seconds"), "solved": f"{solved}/{len(seeds)}"}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else round(numerator / denominator, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="solve runs per agent, seeds 1..N")
    parser.add_argument("--skip-rllib", action="store_true", help="leave RLlib's DQN out")
    args = parser.parse_args()
    seeds = list(range(1, args.seeds + 1))
    cpus = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)

    rates: dict[str, dict[str, float]] = {}
    for workers in (1, 2):
        learning = throughput(workers, DEFAULT_UPDATES_PER_STEP)
        collect = throughput(workers, COLLECT_BOUND_UPDATES_PER_STEP)
        rates[str(workers)] = {
            "frames_per_s_with_learning": round(learning["frames_per_s"]),
            "updates_per_s_with_learning": round(learning["updates_per_s"]),
            "learner_wait_fraction": round(learning["learner_wait_fraction"], 3),
            "frames_per_s_collect_bound": round(collect["frames_per_s"]),
        }
        log(f"throughput, {workers} worker(s): {rates[str(workers)]}")

    solve = {"apex": summarize("apex", solve_apex, seeds), "single_process": summarize("single", solve_single, seeds)}
    if not args.skip_rllib:
        solve["rllib_dqn"] = summarize("rllib", solve_rllib, seeds)
    apex, single, rllib = solve["apex"], solve["single_process"], solve.get("rllib_dqn", {})
    print(json.dumps({
        "bench": "apex",
        "env": ENV,
        "cpus": cpus,
        "throughput_steps": THROUGHPUT_STEPS,
        "throughput": rates,
        "scaling_2_vs_1": ratio(rates["2"]["frames_per_s_collect_bound"], rates["1"]["frames_per_s_collect_bound"]),
        "scaling_2_vs_1_with_learning": ratio(rates["2"]["frames_per_s_with_learning"], rates["1"]["frames_per_s_with_learning"]),
        "learner_wait_fraction": rates["2"]["learner_wait_fraction"],
        "solve": solve,
        "ratios": {
            "rllib_steps_over_apex": ratio(rllib.get("median_steps"), apex["median_steps"]),
            "rllib_seconds_over_apex": ratio(rllib.get("median_seconds"), apex["median_seconds"]),
            "single_steps_over_apex": ratio(single["median_steps"], apex["median_steps"]),
            "single_seconds_over_apex": ratio(single["median_seconds"], apex["median_seconds"]),
        },
        "peer_notes": PEER_NOTES,
    }))


if __name__ == "__main__":
    main()
