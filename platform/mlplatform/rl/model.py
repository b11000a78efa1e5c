"""Dueling Q-networks (Wang et al. 2016, arXiv:1511.06581) with an MLP or Nature-CNN torso."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLPTorso(nn.Module):
    """Fully connected feature extractor for flat vector observations."""

    def __init__(self, obs_dim: int, hidden_sizes: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.flatten(1).float())


class NatureCNNTorso(nn.Module):
    """The Atari torso of Mnih et al. 2015: three convolutions over stacked 84x84 uint8 frames.

    Frames stay uint8 until here (replay stores them that way); scaling to [0, 1] happens inside.
    """

    def __init__(self, obs_shape: Sequence[int]) -> None:
        super().__init__()
        channels = obs_shape[0]
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            self.out_features = self.net(torch.zeros(1, *obs_shape)).shape[1]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float() / 255.0)


class DuelingDQN(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a' A(s, a'), the mean taken per sample.

    The sketch this replaces averaged the advantage over the whole batch, which couples the
    Q-values of unrelated states; here the mean runs over the action axis only.

    Args:
        obs_shape: shape of one observation: ``(d,)`` for vectors, ``(C, H, W)`` for images.
        num_actions: size of the discrete action space.
        hidden_sizes: MLP widths for vector observations (ignored for images).
        head_size: width of the hidden layer in each of the value and advantage streams.
    """

    def __init__(
        self,
        obs_shape: Sequence[int],
        num_actions: int,
        *,
        hidden_sizes: Sequence[int] = (128, 128),
        head_size: int = 128,
    ) -> None:
        super().__init__()
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got num_actions={num_actions}")
        obs_shape = tuple(obs_shape)
        if len(obs_shape) == 3:
            self.torso: nn.Module = NatureCNNTorso(obs_shape)
            head_size = 512
        else:
            self.torso = MLPTorso(int(torch.tensor(obs_shape).prod()), hidden_sizes)
        width = self.torso.out_features
        self.value = nn.Sequential(nn.Linear(width, head_size), nn.ReLU(), nn.Linear(head_size, 1))
        self.advantage = nn.Sequential(
            nn.Linear(width, head_size), nn.ReLU(), nn.Linear(head_size, num_actions)
        )

    def streams(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the value stream (B, 1) and the advantage stream (B, num_actions)."""
        features = self.torso(obs)
        return self.value(features), self.advantage(features)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        value, advantage = self.streams(obs)  # (B, 1), (B, A)
        return value + advantage - advantage.mean(dim=1, keepdim=True)  # (B, A)
