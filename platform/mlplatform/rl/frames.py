"""Replay for stacked image observations that stores each distinct frame once and rebuilds stacks on sample."""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
from numpy.typing import DTypeLike

from mlplatform.rl.nstep import Transitions
from mlplatform.rl.replay import PrioritizedReplayBuffer, ReplayBuffer, ReplaySample

FRAMES_PER_TRANSITION = 1.2
"""Default frame ring size per transition of capacity: blocks of 50 steps per env need about 1.1."""
FRAME_RING_GROWTH = 1.25
"""Factor by which a full frame ring grows when live transitions need more frames than it holds."""


@dataclasses.dataclass(frozen=True)
class FrameBlock:
    """n-step transitions whose stacked observations travel as distinct frames plus indices.

    Transition ``i`` observed ``frames[obs[i]]`` and bootstraps from ``frames[next_obs[i]]``, both
    ``(stack, H, W)``. A frame shared by several stacks (a stack of 4 shares 3 frames with the
    next step's, and an n-step ``next_obs`` is a later transition's ``obs``) is sent once.

    Attributes:
        frames: ``(num_frames, H, W)`` distinct frames.
        obs: ``(batch, stack)`` int32 indices into ``frames``, oldest frame first.
        actions: int64 actions, ``(batch,)``.
        rewards: float32 n-step returns, ``(batch,)``.
        next_obs: ``(batch, stack)`` int32 indices into ``frames``.
        terminated: float32, 1.0 where the episode ended inside the transition, ``(batch,)``.
        discounts: float32 bootstrap factors ``gamma**k``, ``(batch,)``.
    """

    frames: np.ndarray
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    discounts: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


def is_frame_stack(obs_shape: tuple[int, ...], obs_dtype: DTypeLike) -> bool:
    """Whether observations are ``(stack, H, W)`` uint8 image stacks, which frame storage suits."""
    return len(obs_shape) == 3 and np.dtype(obs_dtype) == np.uint8


def pack_transitions(block: Transitions) -> FrameBlock:
    """Packs a block of stacked-frame transitions so each distinct frame appears once.

    Frames are matched by content, so episode starts (whose stacks repeat the first frame, or
    hold zeros), autoresets and n-step flushes need no special handling: whatever the
    environment produced is rebuilt exactly.

    Args:
        block: Transitions with ``(batch, stack, H, W)`` observations.

    Returns:
        The same transitions with frames and index arrays in place of the stacks.

    Raises:
        ValueError: If the observations are not 4-D or ``obs`` and ``next_obs`` differ in shape.
    """
    obs, next_obs = np.asarray(block.obs), np.asarray(block.next_obs)
    if obs.ndim != 4 or next_obs.shape != obs.shape:
        raise ValueError(
            f"obs and next_obs must both be (batch, stack, H, W), got {obs.shape} and {next_obs.shape}"
        )
    deduper = _FrameDeduper({}, 0)
    obs_ids, next_ids = deduper.ids(obs), deduper.ids(next_obs)
    return FrameBlock(
        frames=deduper.fresh_frames(obs.shape[2:], obs.dtype),
        obs=obs_ids.astype(np.int32),
        actions=block.actions,
        rewards=block.rewards,
        next_obs=next_ids.astype(np.int32),
        terminated=block.terminated,
        discounts=block.discounts,
    )


def make_replay_buffer(
    capacity: int,
    obs_shape: tuple[int, ...],
    obs_dtype: DTypeLike,
    *,
    prioritized: bool,
    alpha: float = 0.6,
    seed: int | None = None,
) -> ReplayBuffer:
    """The uniform or prioritized buffer for these observations: per-frame storage for uint8 stacks.

    Args:
        capacity: Maximum number of stored transitions.
        obs_shape: Shape of one observation.
        obs_dtype: Its dtype.
        prioritized: Proportional PER with exponent ``alpha`` instead of uniform replay.
        alpha: PER exponent.
        seed: Sampling seed.
    """
    shape = tuple(int(d) for d in obs_shape)
    if is_frame_stack(shape, obs_dtype):
        if prioritized:
            return PrioritizedFrameStackReplayBuffer(capacity, shape, alpha=alpha, seed=seed)
        return FrameStackReplayBuffer(capacity, shape, seed=seed)
    if prioritized:
        return PrioritizedReplayBuffer(capacity, shape, obs_dtype=obs_dtype, alpha=alpha, seed=seed)
    return ReplayBuffer(capacity, shape, obs_dtype=obs_dtype, seed=seed)


class _FrameDeduper:
    """Gives identical frames one id: the id of a known frame, else the next fresh id."""

    def __init__(self, known: dict[bytes, int], first_fresh_id: int) -> None:
        self.known = known
        self.seen: dict[bytes, int] = {}
        self._fresh: list[np.ndarray] = []
        self._first_fresh_id = first_fresh_id

    def ids(self, stacks: np.ndarray) -> np.ndarray:
        """``(batch, stack)`` int64 frame ids of ``(batch, stack, H, W)`` stacks."""
        flat = stacks.reshape(-1, *stacks.shape[2:])
        ids = np.empty(flat.shape[0], dtype=np.int64)
        # Hashing the raw bytes costs ~3 us per 84x84 frame, a few percent of an Atari env step.
        for i, frame in enumerate(flat):
            key = frame.tobytes()
            frame_id = self.seen.get(key)
            if frame_id is None:
                frame_id = self.known.get(key)
                if frame_id is None:
                    frame_id = self._first_fresh_id + len(self._fresh)
                    self._fresh.append(frame)
                self.seen[key] = frame_id
            ids[i] = frame_id
        return ids.reshape(stacks.shape[:2])

    def fresh_frames(self, frame_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The frames that got fresh ids, in id order."""
        if not self._fresh:
            return np.zeros((0, *frame_shape), dtype=dtype)
        return np.stack(self._fresh)


class FrameStackStorage:
    """Frame storage shared by the uniform and prioritized buffers below.

    The base buffer stores, where it would store an observation, the ``stack`` global ids of its
    frames; the frames themselves sit in a ring here, frame ``g`` in slot ``g % len(ring)``. Blocks
    add their frames in order, so the frames a live transition needs are the ids from the lowest
    one it references up to the newest. Each add records that lowest id, and a window minimum over
    the adds whose transitions are still live gives the oldest frame to keep. When the new frames
    would overwrite it, the ring grows first, so no transition ever reads a recycled frame.
    """

    _capacity: int
    _next_id: int
    _obs: np.ndarray
    _scalars: np.ndarray

    def _init_frames(self, obs_shape: tuple[int, ...], obs_dtype: DTypeLike, frames_per_transition: float) -> None:
        if not frames_per_transition > 0.0:
            raise ValueError(f"frames_per_transition must be > 0, got {frames_per_transition}")
        self._frame_shape = obs_shape[1:]
        self._frame_dtype = np.dtype(obs_dtype)
        # np.zeros maps pages lazily: until the ring first wraps, memory follows the frames written.
        ring = max(1, math.ceil(self._capacity * frames_per_transition))
        self._frames = np.zeros((ring, *self._frame_shape), dtype=self._frame_dtype)
        self._frames_written = 0
        # (end id of an add, lowest frame id it references), lowest ids increasing left to right.
        self._floors: collections.deque[tuple[int, int]] = collections.deque()
        # Frames the previous full-stack add referenced, by content: the next add's stacks share them.
        self._recent: dict[bytes, int] = {}

    @property
    def frame_capacity(self) -> int:
        """Frames the ring holds now; it grows when live transitions need more."""
        return self._frames.shape[0]

    @property
    def frames_written(self) -> int:
        """Distinct frames stored since the buffer was created."""
        return self._frames_written

    @property
    def nbytes(self) -> int:
        """Bytes in use: the frames written (at most the ring), plus frame ids and scalars per transition."""
        frame_bytes = min(self._frames_written, self.frame_capacity) * self._frames[0].nbytes
        return frame_bytes + len(self) * (2 * self._obs[0].nbytes + self._scalars.itemsize)

    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        discounts: np.ndarray,
        *,
        priorities: np.ndarray | None = None,
    ) -> np.ndarray:
        """``ReplayBuffer.add`` for full ``(batch, stack, H, W)`` stacks, stored one frame each.

        Frames already referenced by the previous call are reused, so a loop adding a few
        transitions per step still stores about one new frame per transition.
        """
        obs = self._check_stacks("obs", obs)
        next_obs = self._check_stacks("next_obs", next_obs)
        deduper = _FrameDeduper(self._recent, self._frames_written)
        obs_ids, next_ids = deduper.ids(obs), deduper.ids(next_obs)
        frames = deduper.fresh_frames(self._frame_shape, self._frame_dtype)
        ids = self._store(frames, obs_ids, actions, rewards, next_ids, terminated, discounts, priorities)
        self._recent = deduper.seen
        return ids

    def add_packed(self, block: FrameBlock, *, priorities: np.ndarray | None = None) -> np.ndarray:
        """Appends a :class:`FrameBlock`; otherwise the same as ``add``.

        Raises:
            ValueError: If the frames do not match ``obs_shape[1:]``, an index array is not
                integer or points outside ``frames``, or a column does not match.
        """
        frames = np.asarray(block.frames)
        if frames.ndim != 1 + len(self._frame_shape) or frames.shape[1:] != self._frame_shape:
            raise ValueError(f"frames must have shape (num_frames, *{self._frame_shape}), got {frames.shape}")
        if not np.can_cast(frames.dtype, self._frame_dtype, "same_kind"):
            raise ValueError(f"frames of dtype {frames.dtype} cannot be stored safely as {self._frame_dtype}")
        indices = {"obs": np.asarray(block.obs), "next_obs": np.asarray(block.next_obs)}
        for name, index in indices.items():
            if index.dtype.kind not in "iu":
                raise ValueError(f"{name} must hold integer frame indices, got dtype {index.dtype}")
            if index.size and (index.min() < 0 or index.max() >= frames.shape[0]):
                bad = index[(index < 0) | (index >= frames.shape[0])][0]
                raise ValueError(f"{name} frame index {bad} is outside [0, {frames.shape[0]})")
        # Frames this block writes may land on the ones the previous full-stack add remembered.
        self._recent = {}
        first = self._frames_written
        obs_ids, next_ids = (index.astype(np.int64) + first for index in indices.values())
        return self._store(
            frames, obs_ids, block.actions, block.rewards, next_ids, block.terminated, block.discounts, priorities
        )

    def sample(self, batch_size: int, *, beta: float = 0.4) -> ReplaySample:
        """``ReplayBuffer.sample``, with ``obs`` and ``next_obs`` rebuilt as ``(batch, stack, H, W)`` stacks."""
        batch = super().sample(batch_size, beta=beta)  # type: ignore[misc]
        return batch._replace(obs=self._gather(batch.obs), next_obs=self._gather(batch.next_obs))

    def _store(
        self,
        frames: np.ndarray,
        obs_ids: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_ids: np.ndarray,
        terminated: np.ndarray,
        discounts: np.ndarray,
        priorities: np.ndarray | None,
    ) -> np.ndarray:
        # The base add checks every column before writing any, so a bad column leaves no trace.
        ids = super().add(  # type: ignore[misc]
            obs_ids, actions, rewards, next_ids, terminated, discounts, priorities=priorities
        )
        if ids.shape[0] == 0:
            return ids
        lowest = int(min(obs_ids.min(), next_ids.min()))
        live_from = self._next_id - self._capacity
        while self._floors and self._floors[0][0] <= live_from:
            self._floors.popleft()
        while self._floors and self._floors[-1][1] >= lowest:
            self._floors.pop()
        self._floors.append((self._next_id, lowest))
        oldest = self._floors[0][1]
        assert oldest >= self._frames_written - self.frame_capacity, "a live frame was overwritten"
        needed = self._frames_written + frames.shape[0] - oldest
        if needed > self.frame_capacity:
            self._grow(oldest, max(needed, math.ceil(self.frame_capacity * FRAME_RING_GROWTH)))
        slots = np.arange(self._frames_written, self._frames_written + frames.shape[0]) % self.frame_capacity
        self._frames[slots] = frames
        self._frames_written += frames.shape[0]
        return ids

    def _grow(self, oldest: int, size: int) -> None:
        """Moves the live frames (ids ``oldest`` up to the newest) into a ring of ``size`` frames."""
        grown = np.zeros((size, *self._frame_shape), dtype=self._frame_dtype)
        live = np.arange(oldest, self._frames_written)
        grown[live % size] = self._frames[live % self.frame_capacity]
        self._frames = grown

    def _gather(self, frame_ids: np.ndarray) -> np.ndarray:
        slots = frame_ids.reshape(-1) % self.frame_capacity
        return np.take(self._frames, slots, axis=0).reshape(*frame_ids.shape, *self._frame_shape)

    def _check_stacks(self, name: str, value: np.ndarray) -> np.ndarray:
        arr = np.asarray(value)
        stack_shape = (self._obs.shape[1], *self._frame_shape)
        if arr.ndim != 1 + len(stack_shape) or arr.shape[1:] != stack_shape:
            raise ValueError(f"{name} must have shape (batch, *{stack_shape}), got {arr.shape}")
        if not np.can_cast(arr.dtype, self._frame_dtype, "same_kind"):
            raise ValueError(f"{name} of dtype {arr.dtype} cannot be stored safely as {self._frame_dtype}")
        return arr


def _frame_id_shape(obs_shape: tuple[int, ...]) -> tuple[int]:
    shape = tuple(int(d) for d in obs_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"obs_shape must be (stack, H, W) with positive sizes, got obs_shape={shape}")
    return (shape[0],)


class FrameStackReplayBuffer(FrameStackStorage, ReplayBuffer):
    """Uniform replay over ``(stack, H, W)`` frame stacks that keeps each distinct frame once.

    Samples hold the full stacks, exactly as added; ids, weights and ``update_priorities`` work
    as in :class:`ReplayBuffer`. A transition costs ``frames_per_transition`` frames once the ring
    has wrapped (plus 84 bytes of ids and scalars) instead of ``2 * stack`` frames.

    Args:
        capacity: Maximum number of stored transitions, at least 1.
        obs_shape: ``(stack, H, W)``.
        obs_dtype: Frame dtype.
        frames_per_transition: Initial frame ring size per transition of capacity. Blocks of
            T steps per env need about ``1 + (stack + n - 2) / T`` (1.1 for 50-step blocks);
            the ring grows by ``FRAME_RING_GROWTH`` if that falls short.
        seed: Seed for the sampling generator.

    Raises:
        ValueError: If ``obs_shape`` is not three positive sizes, or a base argument is invalid.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        *,
        obs_dtype: DTypeLike = np.uint8,
        frames_per_transition: float = FRAMES_PER_TRANSITION,
        seed: int | None = None,
    ) -> None:
        ReplayBuffer.__init__(self, capacity, _frame_id_shape(obs_shape), obs_dtype=np.int64, seed=seed)
        self._init_frames(tuple(obs_shape), obs_dtype, frames_per_transition)


class PrioritizedFrameStackReplayBuffer(FrameStackStorage, PrioritizedReplayBuffer):
    """:class:`PrioritizedReplayBuffer` over frame stacks, with the storage of :class:`FrameStackReplayBuffer`."""

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        *,
        obs_dtype: DTypeLike = np.uint8,
        frames_per_transition: float = FRAMES_PER_TRANSITION,
        alpha: float = 0.6,
        eps: float = 1e-6,
        seed: int | None = None,
    ) -> None:
        PrioritizedReplayBuffer.__init__(
            self, capacity, _frame_id_shape(obs_shape), obs_dtype=np.int64, alpha=alpha, eps=eps, seed=seed
        )
        self._init_frames(tuple(obs_shape), obs_dtype, frames_per_transition)
