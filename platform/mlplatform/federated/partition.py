"""Seeded client partitions of a dataset: IID, Dirichlet label skew, or one client per writer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iid_partition(num_examples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle the indices and deal them into ``num_clients`` near-equal shares."""
    _check_clients(num_examples, num_clients)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(share) for share in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, *, alpha: float, seed: int, min_examples: int = 1
) -> list[np.ndarray]:
    """Label skew after Hsu et al. 2019 (arXiv:1909.06335): each class is split across clients by Dir(alpha).

    Small ``alpha`` (0.1) gives most clients a few classes; large ``alpha`` (100) approaches IID.
    Draws are repeated (same generator, so still seeded) until every client holds ``min_examples``.

    Raises:
        ValueError: alpha not positive, or too few examples for ``min_examples`` per client.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got alpha={alpha}")
    labels = np.asarray(labels)
    _check_clients(len(labels), num_clients * min_examples)
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].append(part)
        partition = [np.sort(np.concatenate(parts)) for parts in shares]
        if min(len(p) for p in partition) >= min_examples:
            return partition
    raise ValueError(f"could not give each of {num_clients} clients {min_examples} examples with alpha={alpha}; "
                     "use fewer clients or a larger alpha")


def writer_partition(writers: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """One client per writer (the natural non-IID split of WRIME-style data); returns shares and writer ids."""
    names = sorted(set(writers))
    column = np.asarray(writers)
    return [np.flatnonzero(column == name) for name in names], names


def _check_clients(num_examples: int, needed: int) -> None:
    if needed < 1:
        raise ValueError(f"need at least one client, got {needed}")
    if num_examples < needed:
        raise ValueError(f"{num_examples} examples cannot fill {needed} client slots")
