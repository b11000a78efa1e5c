"""Times sample(256) + update_priorities(256) at 1M transitions: ours vs cpprb vs a deque sketch."""

from __future__ import annotations

import json
import statistics
import time
from collections import deque
from collections.abc import Callable

import numpy as np
from cpprb import PrioritizedReplayBuffer as CpprbPER

from mlplatform.rl.replay import PrioritizedReplayBuffer

CAPACITY = 1_000_000
OBS_DIM = 4
BATCH = 256
ALPHA, BETA, EPS = 0.6, 0.4, 1e-6
ROUNDS = 5
ITERS = 2_000
# The sketch is O(N) per draw (tens of ms at 1M), so it gets far fewer timed iterations.
SKETCH_ITERS = 5


class SketchPER:
    """PER the naive way: a deque of tuples, a priority list, np.random.choice over all of it."""

    def __init__(self, capacity: int) -> None:
        self.memory: deque[tuple] = deque(maxlen=capacity)
        self.priorities: list[float] = []
        self.max_priority = 1.0

    def add(self, transition: tuple) -> None:
        self.memory.append(transition)
        self.priorities.append(self.max_priority)
        if len(self.priorities) > self.memory.maxlen:
            self.priorities.pop(0)

    def sample(self, batch_size: int, beta: float) -> tuple:
        probs = np.array(self.priorities) ** ALPHA
        probs /= probs.sum()
        idx = np.random.choice(len(self.memory), batch_size, p=probs)
        obs, act, rew, next_obs, done = zip(*[self.memory[i] for i in idx])
        weights = (len(self.memory) * probs[idx]) ** -beta
        weights /= weights.max()
        return np.stack(obs), np.array(act), np.array(rew), np.stack(next_obs), np.array(done), idx, weights

    def update_priorities(self, idx: np.ndarray, td: np.ndarray) -> None:
        for i, p in zip(idx, td):
            self.priorities[i] = abs(p) + EPS
            self.max_priority = max(self.max_priority, abs(p) + EPS)


def rate(step: Callable[[np.ndarray], None], td: np.ndarray, iters: int) -> float:
    """Iterations per second of ``step`` over ``iters`` calls."""
    start = time.perf_counter()
    for i in range(iters):
        step(td[i % len(td)])
    return iters / (time.perf_counter() - start)


def main() -> None:
    rng = np.random.default_rng(0)
    np.random.seed(0)  # the sketch draws from the global generator, as the original did
    obs = rng.standard_normal((CAPACITY, OBS_DIM), dtype=np.float32)
    next_obs = rng.standard_normal((CAPACITY, OBS_DIM), dtype=np.float32)
    act = rng.integers(0, 2, CAPACITY)
    rew = rng.standard_normal(CAPACITY).astype(np.float32)
    done = np.zeros(CAPACITY, dtype=np.float32)
    td = np.abs(rng.standard_normal((64, BATCH)))

    ours = PrioritizedReplayBuffer(CAPACITY, (OBS_DIM,), alpha=ALPHA, eps=EPS, seed=0)
    ours.add(obs, act, rew, next_obs, done, np.full(CAPACITY, 0.99, dtype=np.float32))
    env_dict = {
        "obs": {"shape": OBS_DIM}, "act": {"dtype": np.int64}, "rew": {}, "next_obs": {"shape": OBS_DIM}, "done": {}
    }
    theirs = CpprbPER(CAPACITY, env_dict, alpha=ALPHA, eps=EPS)
    theirs.add(obs=obs, act=act, rew=rew, next_obs=next_obs, done=done)
    sketch = SketchPER(CAPACITY)
    for transition in zip(obs, act, rew, next_obs, done):
        sketch.add(transition)

    def step_ours(p: np.ndarray) -> None:
        ours.update_priorities(ours.sample(BATCH, beta=BETA).indices, p)

    def step_cpprb(p: np.ndarray) -> None:
        theirs.update_priorities(theirs.sample(BATCH, beta=BETA)["indexes"], p)

    def step_sketch(p: np.ndarray) -> None:
        sketch.update_priorities(sketch.sample(BATCH, BETA)[5], p)

    # Warm-up: page in the arrays and spread the priorities before anything is timed.
    for step, iters in ((step_ours, 500), (step_cpprb, 500), (step_sketch, 1)):
        rate(step, td, iters)
    runs: dict[str, list[float]] = {"ours": [], "cpprb": [], "sketch": []}
    # Rounds alternate between implementations so drift in machine load hits all of them alike.
    for _ in range(ROUNDS):
        runs["ours"].append(rate(step_ours, td, ITERS))
        runs["cpprb"].append(rate(step_cpprb, td, ITERS))
        runs["sketch"].append(rate(step_sketch, td, SKETCH_ITERS))
    med = {name: statistics.median(values) for name, values in runs.items()}
    print(json.dumps({
        "capacity": CAPACITY,
        "sketch_capacity": CAPACITY,
        "obs_shape": [OBS_DIM],
        "batch_size": BATCH,
        "rounds": ROUNDS,
        "iters_per_round": {"ours": ITERS, "cpprb": ITERS, "sketch": SKETCH_ITERS},
        "ours_it_s": round(med["ours"], 1),
        "cpprb_it_s": round(med["cpprb"], 1),
        "sketch_it_s": round(med["sketch"], 2),
        "ratio_vs_cpprb": round(med["ours"] / med["cpprb"], 2),
        "ratio_vs_sketch": round(med["ours"] / med["sketch"], 1),
    }))


if __name__ == "__main__":
    main()
