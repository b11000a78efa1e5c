"""Atari environments with the DQN preprocessing of Mnih et al. 2015 and the Ape-X reward clipping."""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

FRAME_SKIP = 4
"""Emulator frames per agent step; the action repeats and the last two frames are max-pooled."""
FRAME_STACK = 4
"""Preprocessed frames per observation, oldest first: observations are ``(4, 84, 84)`` uint8."""
SCREEN_SIZE = 84
"""Side of the square grayscale frame the screen is resized to."""
NOOP_MAX = 30
"""Most no-op actions taken after a reset, so episodes start from varied states."""


def register_atari_envs() -> None:
    """Makes the ALE ids (``ALE/Pong-v5``, ``PongNoFrameskip-v4``, ...) known to gymnasium.

    Every process that builds an Atari env or validates a config naming one has to call this
    first, Ray actors included; calling it again does nothing.

    Raises:
        ImportError: If ale-py is missing (install the ``[atari]`` extra); its wheel ships the ROMs.
    """
    try:
        import ale_py
    except ImportError as e:
        raise ImportError(f"Atari environments need ale-py: pip install 'mlplatform[atari]' ({e})") from e
    gym.register_envs(ale_py)


def is_atari(env_id: str) -> bool:
    """Whether ``env_id`` names an Arcade Learning Environment game.

    ``ALE/...`` ids are recognised by their namespace alone, without ale-py. Older ids such as
    ``PongNoFrameskip-v4`` are recognised by their registry entry point, which needs ale-py's
    registration; an id unknown to the registry is looked up again after registering, when
    ale-py is installed.

    Args:
        env_id: A gymnasium environment id.
    """
    namespace, _, _ = gym.envs.registration.parse_env_id(env_id)
    if namespace == "ALE":
        return True
    if env_id not in gym.registry:
        try:
            register_atari_envs()
        except ImportError:
            return False
    spec = gym.registry.get(env_id)
    return spec is not None and str(spec.entry_point).startswith("ale_py")


def make_atari_env(env_id: str, *, terminal_on_life_loss: bool = False) -> gym.Env:
    """One Atari game as DQN sees it: ``(4, 84, 84)`` uint8 stacks of grayscale frames.

    The emulator runs every frame (``frameskip=1``) and ``AtariPreprocessing`` repeats each action
    for ``FRAME_SKIP`` of them, so the skip happens once, with the max-pool over the last two
    frames that removes sprite flicker. Resets take up to ``NOOP_MAX`` no-ops. The stack pads an
    episode's first observation with copies of its first frame. Rewards are left unclipped, so
    returns summed from this env are game scores; ``clip_rewards`` is for the learning targets.
    The v5 ids keep their sticky actions (repeat probability 0.25, Machado et al. 2018,
    arXiv:1709.06009).

    Args:
        env_id: An ALE id, e.g. ``"ALE/Pong-v5"``.
        terminal_on_life_loss: End the episode when a life is lost (as DQN trained), not only
            at game over.

    Raises:
        ImportError: If ale-py or OpenCV (used for the resize) is missing.
    """
    register_atari_envs()
    env = gym.make(env_id, frameskip=1)
    env = AtariPreprocessing(
        env,
        noop_max=NOOP_MAX,
        frame_skip=FRAME_SKIP,
        screen_size=SCREEN_SIZE,
        terminal_on_life_loss=terminal_on_life_loss,
        grayscale_obs=True,
        scale_obs=False,
    )
    return FrameStackObservation(env, FRAME_STACK)


def make_atari_vector_env(
    env_id: str, num_envs: int, *, terminal_on_life_loss: bool = False
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of :func:`make_atari_env` in a same-step autoreset ``SyncVectorEnv``.

    Args:
        env_id: An ALE id, e.g. ``"ALE/Pong-v5"``.
        num_envs: Number of games stepped together.
        terminal_on_life_loss: Passed on to :func:`make_atari_env`.
    """
    make_one = partial(make_atari_env, env_id, terminal_on_life_loss=terminal_on_life_loss)
    return gym.vector.SyncVectorEnv(
        [make_one] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def clip_rewards(rewards: np.ndarray) -> np.ndarray:
    """Rewards clipped to their sign, as DQN and Ape-X train on Atari (one scale for every game).

    Only the learning targets see clipped rewards; episode returns are logged unclipped.
    """
    return np.sign(rewards).astype(np.float32)
