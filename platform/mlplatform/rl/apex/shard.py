"""ReplayShard: a Ray actor holding one slice of the prioritized replay."""

from __future__ import annotations

import numpy as np
import ray

from mlplatform.rl.frames import FrameBlock, FrameStackStorage, make_replay_buffer
from mlplatform.rl.replay import ReplayBuffer, ReplaySample
from mlplatform.rl.nstep import Transitions


class ReplayShard:
    """Stores blocks from rollout workers and answers the learner's sample requests.

    Every stored transition has an id that counts up forever; its slot is ``id % capacity`` and
    ``id // capacity`` is the slot's generation. The learner sends priorities back with the ids it
    sampled, and an id whose slot has moved on to a newer generation is dropped, so a slot
    overwritten while the learner was training never takes the old sample's priority.

    Args:
        capacity: transitions this shard holds.
        obs_shape: shape of one observation.
        obs_dtype: storage dtype of observations (uint8 frames stay uint8; uint8 frame stacks
            are stored one frame each, see :mod:`mlplatform.rl.frames`).
        prioritized: PER (with ``alpha``) or uniform replay.
        alpha: PER priority exponent.
        seed: sampling seed.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype | str,
        *,
        prioritized: bool = True,
        alpha: float = 0.6,
        seed: int | None = None,
    ) -> None:
        self.buffer: ReplayBuffer = make_replay_buffer(
            capacity, obs_shape, obs_dtype, prioritized=prioritized, alpha=alpha, seed=seed
        )
        self.stale_updates = 0

    def add(self, block: Transitions | FrameBlock, priorities: np.ndarray) -> int:
        """Store a block with the initial priorities its worker computed; returns the stored count."""
        if isinstance(block, FrameBlock):
            self.buffer.add_packed(block, priorities=priorities)
        elif len(block):
            self.buffer.add(*block, priorities=priorities)
        return len(self.buffer)

    def sample(self, batch_size: int, beta: float) -> ReplaySample | None:
        """A batch with IS weights and ids, or None while the shard holds fewer than ``batch_size``."""
        if len(self.buffer) < batch_size:
            return None
        return self.buffer.sample(batch_size, beta=beta)

    def update_priorities(self, ids: np.ndarray, priorities: np.ndarray) -> int:
        """Apply new priorities to ids still stored; returns how many were stale and dropped."""
        applied = self.buffer.update_priorities(ids, priorities)
        self.stale_updates += len(ids) - applied
        return len(ids) - applied

    def stats(self) -> dict[str, int]:
        """Stored transitions, stale priority updates dropped so far and, for frame storage, bytes held."""
        stats = {"size": len(self.buffer), "stale_updates": self.stale_updates}
        if isinstance(self.buffer, FrameStackStorage):
            stats["nbytes"] = self.buffer.nbytes
        return stats


ReplayShardActor = ray.remote(ReplayShard)
