"""Benchmark: env steps and seconds to solve CartPole-v1, our DQN vs CleanRL's dqn.py, as one JSON line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from pathlib import Path
from typing import Any

import torch

from mlplatform.rl.agent import DQNConfig
from mlplatform.rl.train import train_dqn

SOLVED = 475.0
WINDOW = 100
PEERS = Path(__file__).resolve().parent / ".peers"
CLEANRL = "cleanrl==1.2.0"  # PyPI's newest; same dqn.py algorithm and defaults as cleanrl master
PEER_SCRIPT = PEERS / "cleanrl-1.2.0" / "dqn.py"
PEER_NOTES = (
    f"{CLEANRL} wheel's cleanrl/dqn.py run unmodified with its defaults (500k steps, stable-baselines3 "
    "ReplayBuffer, tensorboard logging on). Launcher shim for gymnasium 1.x: SyncVectorEnv forced to "
    "autoreset_mode=SAME_STEP (gymnasium 0.29's behaviour) and its step() infos given the 0.29 keys the "
    "script reads: 'final_observation' (= 'final_obs') and 'final_info' as a list of per-env dicts. "
    "Seconds count from after the imports of torch, gymnasium, stable_baselines3 and tensorboard; "
    "env steps = global_step + 1 of the episode end that completed the window."
)
# Runs in the peer's subprocess as `python -c SHIM dqn.py ARGS...`.
SHIM = """
import runpy, sys
import gymnasium as gym, numpy as np, stable_baselines3, torch, torch.utils.tensorboard

def unbatch(info, i):
    return {k: unbatch(v, i) if isinstance(v, dict) else v[i] for k, v in info.items()
            if not k.startswith("_") and info.get("_" + k, np.ones(i + 1, bool))[i]}

class SyncVectorEnv(gym.vector.SyncVectorEnv):
    def __init__(self, env_fns):
        super().__init__(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    def step(self, actions):
        obs, rewards, terminated, truncated, infos = super().step(actions)
        if "final_obs" in infos:
            infos["final_observation"] = infos["final_obs"]
            infos["final_info"] = [unbatch(infos["final_info"], i) if infos["_final_obs"][i] else {}
                                   for i in range(self.num_envs)]
        return obs, rewards, terminated, truncated, infos

gym.vector.SyncVectorEnv = SyncVectorEnv
print("PEER_READY", flush=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
EPISODE = re.compile(r"global_step=(\d+), episodic_return=\[?([-\d.eE+]+)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_or_none(values: list[float]) -> float | None:
    """Median over all seeds, an unsolved seed counting as never solved (None when most never did)."""
    middle = statistics.median(values)
    return None if math.isinf(middle) else round(middle, 2)


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [math.inf if r["steps_to_solve"] is None else r["steps_to_solve"] for r in per_seed]
    seconds = [math.inf if r["seconds_to_solve"] is None else r["seconds_to_solve"] for r in per_seed]
    return {
        "per_seed": per_seed,
        "solved": sum(r["steps_to_solve"] is not None for r in per_seed),
        "seeds": len(per_seed),
        "median_steps": median_or_none(steps),
        "median_seconds": median_or_none(seconds),
    }


def run_ours(seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result = train_dqn(DQNConfig(seed=seed), tracker=None, output_dir=folder, progress=False)
    solved = result.solved_at_step is not None
    return {
        "seed": seed,
        "steps_to_solve": result.solved_at_step,
        "seconds_to_solve": round(result.seconds, 2) if solved else None,
        "env_steps": result.env_steps,
        "final_eval_return": result.final_eval_return,
        "best_eval_return": max(value for _, value in result.eval_history),
    }


def ensure_peer() -> Path:
    """CleanRL's dqn.py under bench/.peers/, downloaded from PyPI on first use."""
    missing = [name for name in ("stable_baselines3", "tensorboard") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"cartpole.py: the peer needs {missing}: pip install --constraint constraints.txt "
                 "stable-baselines3 tensorboard (or pass --skip-peer)")
    if PEER_SCRIPT.exists():
        return PEER_SCRIPT
    download = [sys.executable, "-m", "pip", "download", CLEANRL, "--no-deps", "--only-binary=:all:",
                "--python-version", "3.10", "--dest", str(PEERS / "dl")]  # the wheel declares python < 3.11
    if subprocess.run(download, stdout=sys.stderr, stderr=sys.stderr).returncode != 0:
        sys.exit(f"cartpole.py: could not download {CLEANRL} from PyPI into {PEERS} (or pass --skip-peer)")
    with zipfile.ZipFile(next((PEERS / "dl").glob("cleanrl-1.2.0-*.whl"))) as wheel:
        PEER_SCRIPT.parent.mkdir(parents=True, exist_ok=True)
        PEER_SCRIPT.write_bytes(wheel.read("cleanrl/dqn.py"))
    return PEER_SCRIPT


def run_peer(script: Path, seed: int) -> dict[str, Any]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", SHIM, str(script), "--seed", str(seed), "--cuda", "False"]
    returns: deque[float] = deque(maxlen=WINDOW)
    started, step, episodes, solved_at, seconds = math.nan, 0, 0, None, None
    with tempfile.TemporaryDirectory() as folder:  # its tensorboard runs/ go here
        with subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if line.startswith("PEER_READY"):
                    started = time.perf_counter()
                elif match := EPISODE.match(line):
                    step, episodes = int(match[1]) + 1, episodes + 1
                    returns.append(float(match[2]))
                    if len(returns) == WINDOW and sum(returns) / WINDOW >= SOLVED:
                        solved_at, seconds = step, round(time.perf_counter() - started, 2)
                        proc.terminate()
                        break
            if proc.wait() not in (0, -15) or not episodes:
                sys.exit(f"cartpole.py: CleanRL dqn.py failed for seed {seed} (exit {proc.returncode})")
    return {"seed": seed, "steps_to_solve": solved_at, "seconds_to_solve": seconds, "env_steps": step,
            "episodes": episodes, "last_rolling_mean": round(sum(returns) / len(returns), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="our DQN runs seeds 1..N")
    parser.add_argument("--peer-seeds", type=int, default=3, help="CleanRL's dqn.py runs seeds 1..N")
    parser.add_argument("--skip-peer", action="store_true", help="measure ours only")
    args = parser.parse_args()
    peer_script = None if args.skip_peer else ensure_peer()
    torch.set_num_threads(1)

    ours = []
    for seed in range(1, args.seeds + 1):
        ours.append(run_ours(seed))
        log(f"ours seed {seed}: {ours[-1]}")
    report: dict[str, Any] = {
        "bench": "cartpole_dqn",
        "env": "CartPole-v1",
        "ours": summarize(ours),
        "ours_criterion": f"greedy eval mean of 20 episodes >= {SOLVED:g} (eval every 2000 steps, 50k-step budget)",
        "torch_threads": 1,
    }
    if peer_script is not None:
        peer = []
        for seed in range(1, args.peer_seeds + 1):
            peer.append(run_peer(peer_script, seed))
            log(f"peer seed {seed}: {peer[-1]}")
        summary = report["peer"] = {"name": "cleanrl dqn.py", **summarize(peer)}
        summary["criterion"] = f"rolling mean of {WINDOW} training returns >= {SOLVED:g} (500k-step budget)"
        for key in ("steps", "seconds"):
            ours_median, peer_median = report["ours"][f"median_{key}"], summary[f"median_{key}"]
            report[f"{key}_ratio"] = round(peer_median / ours_median, 2) if ours_median and peer_median else None
        report["peer_notes"] = PEER_NOTES
    print(json.dumps(report))


if __name__ == "__main__":
    main()
