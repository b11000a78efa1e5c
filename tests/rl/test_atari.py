"""Atari plumbing that needs no ROMs: per-frame replay against a full-stack oracle, packing, ids, clipping."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import FrameStackObservation

from mlplatform.rl.apex.config import ApexConfig
from mlplatform.rl.apex.rollout import RolloutWorker
from mlplatform.rl.apex.shard import ReplayShard
from mlplatform.rl.atari import clip_rewards, is_atari
from mlplatform.rl.frames import (
    FrameBlock,
    FrameStackReplayBuffer,
    PrioritizedFrameStackReplayBuffer,
    make_replay_buffer,
    pack_transitions,
)
from mlplatform.rl.nstep import NStepAccumulator, Transitions
from mlplatform.rl.replay import PrioritizedReplayBuffer, ReplayBuffer
from mlplatform.rl.train import true_next_obs

STACK = 4


class RandomFrames(gym.Env):
    """Random uint8 frames; episodes end (terminated or truncated) after 1 to ``max_len`` steps."""

    def __init__(self, size: int = 12, max_len: int = 12, seed: int = 0) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self.size, self.max_len = size, max_len
        self.frames = np.random.default_rng(seed)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left = int(self.np_random.integers(1, self.max_len + 1))
        return self._frame(), {}

    def step(self, action):
        self.left -= 1
        ended = self.left <= 0
        terminated = ended and bool(self.np_random.random() < 0.5)
        return self._frame(), float(action) - 1.0, terminated, ended and not terminated, {}

    def _frame(self) -> np.ndarray:
        return self.frames.integers(0, 256, (self.size, self.size), dtype=np.uint8)


def stacked(padding: str, **kwargs) -> gym.Env:
    return FrameStackObservation(RandomFrames(**kwargs), STACK, padding_type=padding)


def rollout(steps: int, *, num_envs: int = 3, n_steps: int = 3, padding: str = "reset", **kwargs) -> list[Transitions]:
    """Per-step n-step transitions, produced the way a rollout worker produces them."""
    envs = gym.vector.SyncVectorEnv(
        [lambda i=i: stacked(padding, seed=i, **kwargs) for i in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    space = envs.single_observation_space
    nstep = NStepAccumulator(num_envs, space.shape, space.dtype, n_steps=n_steps, gamma=0.9)
    rng = np.random.default_rng(0)
    obs, _ = envs.reset(seed=0)
    steps_out = []
    for _ in range(steps):
        actions = rng.integers(0, 3, size=num_envs)
        next_obs, rewards, terminated, truncated, info = envs.step(actions)
        reached = true_next_obs(next_obs, terminated | truncated, info)
        steps_out.append(nstep.push(obs, actions, rewards, reached, terminated, truncated))
        obs = next_obs
    return steps_out


def blocks(per_step: list[Transitions], steps_per_block: int) -> list[Transitions]:
    return [
        Transitions(*(np.concatenate(field) for field in zip(*per_step[i : i + steps_per_block])))
        for i in range(0, len(per_step), steps_per_block)
    ]


def assert_same_sample(ours, oracle) -> None:
    for name, got, want in zip(ours._fields, ours, oracle):
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert ours.obs.dtype == np.uint8 and ours.next_obs.dtype == np.uint8


# ---- per-frame replay against a buffer of full stacks ----


@pytest.mark.parametrize("prioritized", [False, True])
@pytest.mark.parametrize("padding", ["reset", "zero"])
@pytest.mark.parametrize(
    ("mode", "steps_per_block", "frames_per_transition"),
    [("add", 1, 1.25), ("add", 10, 1.25), ("packed", 10, 1.25), ("packed", 7, 0.3), ("add", 1, 0.2)],
)
def test_samples_equal_a_full_stack_buffer_across_episode_ends_and_ring_wraps(
    prioritized, padding, mode, steps_per_block, frames_per_transition
):
    """Both buffers see the same adds and draw with the same seed, so every sample must match.

    Episodes of 1-12 steps put stack padding, autoresets and n-step flushes in most blocks; 400
    steps of 3 envs wrap the 64-transition ring ~18 times, and the small frame rings must grow.
    """
    capacity, shape = 64, (STACK, 12, 12)
    if prioritized:
        ours = PrioritizedFrameStackReplayBuffer(capacity, shape, frames_per_transition=frames_per_transition, seed=3)
        oracle = PrioritizedReplayBuffer(capacity, shape, obs_dtype=np.uint8, seed=3)
    else:
        ours = FrameStackReplayBuffer(capacity, shape, frames_per_transition=frames_per_transition, seed=3)
        oracle = ReplayBuffer(capacity, shape, obs_dtype=np.uint8, seed=3)
    rng, added = np.random.default_rng(1), 0
    for block in blocks(rollout(400, padding=padding), steps_per_block):
        added += len(block)
        priorities = rng.uniform(0.1, 2.0, size=len(block))
        if mode == "packed":
            ids = ours.add_packed(pack_transitions(block), priorities=priorities)
        else:
            ids = ours.add(*block, priorities=priorities)
        np.testing.assert_array_equal(ids, oracle.add(*block, priorities=priorities))
        if len(oracle) >= 8:
            sample = ours.sample(len(oracle), beta=0.5)
            assert_same_sample(sample, oracle.sample(len(oracle), beta=0.5))
            new = rng.uniform(0.0, 3.0, size=len(sample.indices))
            assert ours.update_priorities(sample.indices, new) == oracle.update_priorities(sample.indices, new)
    assert ours.frames_written < 2 * added  # a full-stack buffer copies 2 * 4 frames per transition


def test_pack_transitions_rebuilds_every_stack_from_distinct_frames():
    block = blocks(rollout(60, padding="zero"), 60)[0]
    packed = pack_transitions(block)
    np.testing.assert_array_equal(packed.frames[packed.obs], block.obs)
    np.testing.assert_array_equal(packed.frames[packed.next_obs], block.next_obs)
    assert len(np.unique(packed.frames.reshape(len(packed.frames), -1), axis=0)) == len(packed.frames)
    assert packed.obs.dtype == np.int32 and len(packed) == len(block)
    for name in ("actions", "rewards", "terminated", "discounts"):
        np.testing.assert_array_equal(getattr(packed, name), getattr(block, name))


@pytest.mark.parametrize(("mode", "steps_per_block"), [("packed", 50), ("add", 1)])
def test_a_transition_costs_about_one_84x84_frame(mode, steps_per_block):
    """Naive storage keeps 2 * 4 frames per transition; here about one frame plus 84 bytes remain."""
    capacity, shape, added = 4_000, (STACK, 84, 84), 0
    buffer = FrameStackReplayBuffer(capacity, shape)
    for block in blocks(rollout(2_400, num_envs=4, size=84, max_len=300), steps_per_block):
        added += len(block)
        if mode == "packed":
            buffer.add_packed(pack_transitions(block))
        else:
            buffer.add(*block)
    frame = 84 * 84
    naive = 2 * STACK * frame + 20
    per_transition = buffer.nbytes / len(buffer)
    assert len(buffer) == capacity and buffer.frames_written > buffer.frame_capacity  # the ring has wrapped
    assert buffer.frames_written < 1.15 * added
    # The ring kept its initial 1.2 frames per transition: enough, so it never grew.
    assert buffer.frame_capacity == 4_800
    assert per_transition == pytest.approx(1.2 * frame + 84)
    assert per_transition < naive / 6


def test_make_replay_buffer_stores_frames_only_for_uint8_image_stacks():
    assert isinstance(make_replay_buffer(8, (4, 84, 84), np.uint8, prioritized=True), PrioritizedFrameStackReplayBuffer)
    assert isinstance(make_replay_buffer(8, (4, 84, 84), np.uint8, prioritized=False), FrameStackReplayBuffer)
    vector = make_replay_buffer(8, (4,), np.float32, prioritized=True)
    assert type(vector) is PrioritizedReplayBuffer
    assert type(make_replay_buffer(8, (3, 8, 8), np.float32, prioritized=False)) is ReplayBuffer


def packed_block(n: int = 2, frames: int = 3) -> FrameBlock:
    return FrameBlock(
        frames=np.zeros((frames, 12, 12), np.uint8),
        obs=np.zeros((n, STACK), np.int32),
        actions=np.zeros(n, np.int64),
        rewards=np.zeros(n, np.float32),
        next_obs=np.ones((n, STACK), np.int32),
        terminated=np.zeros(n, np.float32),
        discounts=np.ones(n, np.float32),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frames": np.zeros((3, 12, 13), np.uint8)}, "frames must have shape"),
        ({"frames": np.zeros((3, 12, 12), np.float32)}, "cannot be stored safely"),
        ({"obs": np.full((2, STACK), 3, np.int32)}, "obs frame index 3 is outside \\[0, 3\\)"),
        ({"next_obs": np.full((2, STACK), -1, np.int64)}, "next_obs frame index -1"),
        ({"obs": np.zeros((2, STACK), np.float32)}, "obs must hold integer frame indices"),
        ({"actions": np.zeros(3, np.int64)}, "actions must have shape \\(2,\\)"),
    ],
)
def test_bad_packed_blocks_are_refused_and_leave_the_buffer_unchanged(change, message):
    buffer = FrameStackReplayBuffer(8, (STACK, 12, 12))
    with pytest.raises(ValueError, match=message):
        buffer.add_packed(dataclasses.replace(packed_block(), **change))
    assert len(buffer) == 0 and buffer.frames_written == 0


@pytest.mark.parametrize(
    ("shape", "obs", "message"),
    [
        ((STACK, 12), None, "obs_shape must be \\(stack, H, W\\)"),
        ((STACK, 12, 12), np.zeros((2, 3, 12, 12), np.uint8), "obs must have shape \\(batch, \\*\\(4, 12, 12\\)\\)"),
        ((STACK, 12, 12), np.zeros((2, STACK, 12, 12), np.float64), "cannot be stored safely as uint8"),
    ],
)
def test_bad_stacks_are_refused(shape, obs, message):
    with pytest.raises(ValueError, match=message):
        buffer = FrameStackReplayBuffer(8, shape)
        buffer.add(obs, np.zeros(2, np.int64), np.zeros(2), obs, np.zeros(2), np.ones(2))


# ---- the Ape-X path: worker packs, shard stores, learner gets full stacks ----


def test_rollout_worker_sends_packed_frames_that_the_shard_turns_back_into_stacks():
    env_id = "MlplatformTest/StackedRandomFrames-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda: stacked("reset", size=36, max_len=30))
    config = ApexConfig(env_id=env_id, num_envs=2, rollout_steps=20, n_steps=3, batch_size=8, learning_starts=16)
    worker = RolloutWorker(config, 0, np.array([1.0, 0.5]))
    block, priorities, stats = worker.collect(worker.agent.weights())
    assert isinstance(block, FrameBlock) and block.frames.dtype == np.uint8
    assert priorities.shape == (len(block),) and stats["env_steps"] == 40
    assert len(block.frames) < 2 * STACK * len(block) / 3

    shard = ReplayShard(1_000, (STACK, 36, 36), "|u1", seed=0)
    assert shard.add(block, priorities) == len(block)
    sample = shard.sample(8, beta=0.4)
    np.testing.assert_array_equal(sample.obs, block.frames[block.obs[sample.indices]])
    np.testing.assert_array_equal(sample.next_obs, block.frames[block.next_obs[sample.indices]])
    assert shard.stats()["nbytes"] == shard.buffer.nbytes
    # What the learner would train on has the shape the Nature CNN expects.
    assert worker.agent.online(torch.as_tensor(sample.obs)).shape == (8, 3)


# ---- Atari ids and rewards (no ROMs needed) ----


@pytest.mark.parametrize(("env_id", "expected"), [("ALE/Pong-v5", True), ("ALE/Breakout-v5", True), ("CartPole-v1", False)])
def test_ale_ids_are_recognised_by_namespace(env_id, expected):
    assert is_atari(env_id) is expected


def test_rewards_are_clipped_to_their_sign():
    clipped = clip_rewards(np.array([-7.0, -0.5, 0.0, 0.2, 30.0]))
    np.testing.assert_array_equal(clipped, [-1.0, -1.0, 0.0, 1.0, 1.0])
    assert clipped.dtype == np.float32
