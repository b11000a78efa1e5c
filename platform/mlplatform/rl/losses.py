"""Pure DQN maths: Double DQN targets, importance-weighted Huber TD loss and linear schedules."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def double_dqn_targets(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    discounts: torch.Tensor,
    next_q_online: torch.Tensor,
    next_q_target: torch.Tensor,
) -> torch.Tensor:
    """Double DQN targets (van Hasselt et al. 2016, arXiv:1509.06461) for n-step transitions.

    ``y = R + discount * (1 - terminated) * Q_target(s', argmax_a Q_online(s', a))``: the online
    network chooses the next action and the target network values it, which removes the
    max-operator's overestimation. ``discount`` is gamma^k for a k-step return, so a transition
    cut short by an episode end still bootstraps with the right power; ``terminated`` (not
    ``truncated``) is the only thing that stops bootstrapping.

    Args:
        rewards: (B,) discounted k-step returns.
        terminated: (B,) 1.0 where s' is a terminal state, else 0.0.
        discounts: (B,) gamma^k for each transition.
        next_q_online: (B, A) online-network Q-values at s'.
        next_q_target: (B, A) target-network Q-values at s'.

    Returns:
        (B,) regression targets, with no gradient.
    """
    best_actions = next_q_online.argmax(dim=1, keepdim=True)  # (B, 1)
    next_values = next_q_target.gather(1, best_actions).squeeze(1)  # (B,)
    return (rewards + discounts * (1.0 - terminated) * next_values).detach()


def td_loss(
    q_taken: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *, huber_delta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted Huber loss and the TD errors that become new priorities.

    Args:
        q_taken: (B,) online Q-values of the actions taken.
        targets: (B,) targets from :func:`double_dqn_targets`.
        weights: (B,) importance-sampling weights (ones for uniform replay).
        huber_delta: where the loss turns from quadratic to linear.

    Returns:
        The scalar loss and the (B,) TD errors ``targets - q_taken`` (detached).
    """
    per_sample = F.huber_loss(q_taken, targets, reduction="none", delta=huber_delta)
    return (weights * per_sample).mean(), (targets - q_taken).detach()


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Value moving linearly from ``start`` to ``end`` over ``duration`` steps, then held at ``end``."""
    if duration <= 0:
        return end
    fraction = min(max(step, 0) / duration, 1.0)
    return start + fraction * (end - start)
