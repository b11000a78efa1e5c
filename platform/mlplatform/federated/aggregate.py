"""Aggregation maths over flat update vectors: weighted mean, coordinate-wise median, trimmed mean, clipping."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629): the mean of updates weighted by example counts."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(updates) == 0 or weights.sum() <= 0:
        raise ValueError(f"need at least one update with positive weight, got {len(updates)} updates")
    stacked = np.stack(updates).astype(np.float64)
    return (weights @ stacked / weights.sum()).astype(np.float32)


def coordinate_median(updates: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498); robust to a minority of arbitrary updates."""
    return np.median(np.stack(updates), axis=0).astype(np.float32)


def trimmed_mean(updates: Sequence[np.ndarray], *, beta: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``beta`` share of largest and of smallest values per coordinate."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got beta={beta}")
    stacked = np.sort(np.stack(updates), axis=0)
    cut = int(beta * len(stacked))
    return stacked[cut: len(stacked) - cut].mean(axis=0).astype(np.float32)


def clip_to_norm(update: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale ``update`` down so its L2 norm is at most ``max_norm`` (unchanged when already inside)."""
    norm = float(np.linalg.norm(update))
    return update if norm <= max_norm else (update * (max_norm / norm)).astype(update.dtype)


def update_problem(update: np.ndarray, *, max_norm: float | None) -> str | None:
    """Why an update must be rejected (non-finite values, or a norm beyond ``max_norm``), or None when it is fine."""
    if not np.isfinite(update).all():
        return "non-finite"
    if max_norm is not None and float(np.linalg.norm(update)) > max_norm:
        return "norm"
    return None
