"""``FederatedClient``: local training on one client's partition, returning (update, example count, metrics)."""

from __future__ import annotations

import time
import numpy as np
import torch

from mlplatform.federated.config import ClientConfig
from mlplatform.federated.strategy import FitResult
from mlplatform.federated.task import FederatedTask


class RoundDeadline(Exception):
    """The round's deadline passed while this client was still working; its update is not wanted any more."""


def flat_weights(model: torch.nn.Module) -> np.ndarray:
    """All trainable parameters of ``model`` as one float32 vector (the unit the server aggregates)."""
    return torch.nn.utils.parameters_to_vector([p for p in model.parameters() if p.requires_grad]).detach().numpy().copy()


def load_flat_weights(model: torch.nn.Module, weights: np.ndarray) -> None:
    """Copy a vector from :func:`flat_weights` into ``model``'s parameters.

    A copy, not ``vector_to_parameters``: that makes the parameters views of the vector, so training
    would write into the caller's array (or into Ray's read-only shared copy of the global weights).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in parameters)
    if len(weights) != size:
        raise ValueError(f"the model has {size} trainable weights, the vector {len(weights)}")
    vector = torch.tensor(weights, dtype=torch.float32)
    with torch.no_grad():
        for parameter, chunk in zip(parameters, vector.split([p.numel() for p in parameters])):
            parameter.copy_(chunk.view_as(parameter))


class FederatedClient:
    """Trains the task's model on one partition at a time; one instance serves many virtual clients.

    The sketch's client returned its full weights for an unweighted mean; this one returns its update
    (local minus global) and its example count, so the server can weight, clip and noise it.

    Args:
        task: the model and data.
        config: local training settings.
    """

    def __init__(self, task: FederatedTask, config: ClientConfig) -> None:
        self.task = task
        self.config = config
        self.model = task.build_model()

    def fit(
        self,
        client_id: int,
        global_weights: np.ndarray,
        indices: np.ndarray,
        *,
        seed: int,
        proximal_mu: float = 0.0,
        deadline: float | None = None,
        slowdown_s: float = 0.0,
    ) -> FitResult:
        """Train from ``global_weights`` on the examples at ``indices`` for E local epochs.

        Args:
            client_id: which virtual client this is (echoed in the result).
            global_weights: the flat global model.
            indices: this client's examples in the task's training split.
            seed: shuffling seed (the server derives it from the round and client, so results are reproducible).
            proximal_mu: FedProx's μ; the loss gains (μ/2)·||w - w_global||².
            deadline: ``time.time()`` after which the update is not wanted (raises :class:`RoundDeadline`).
            slowdown_s: injected straggling: sleep this long first (still honouring the deadline).

        Raises:
            RoundDeadline: the deadline passed before training finished.
        """
        _sleep_until(slowdown_s, deadline)
        torch.manual_seed(seed)
        load_flat_weights(self.model, global_weights)
        anchor = [p.detach().clone() for p in self.model.parameters() if p.requires_grad] if proximal_mu > 0 else []
        optimizer = self._optimizer()
        loader = self.task.loader(self.task.dataset("train", indices), batch_size=self.config.batch_size, seed=seed)
        self.model.train()
        total_loss, seen = 0.0, 0
        for _ in range(self.config.local_epochs):
            for batch in loader:
                if deadline is not None and time.time() > deadline:
                    raise RoundDeadline(f"client {client_id} passed the round deadline")
                loss = self.model(**batch).loss
                total_loss += loss.item() * len(batch["labels"])
                seen += len(batch["labels"])
                if anchor:
                    trainable = [p for p in self.model.parameters() if p.requires_grad]
                    loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
                optimizer.step()
        delta = flat_weights(self.model) - np.asarray(global_weights, dtype=np.float32)
        return FitResult(client_id, delta, len(indices), {"train_loss": total_loss / max(seen, 1)})

    def _optimizer(self) -> torch.optim.Optimizer:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        if self.config.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)
        return torch.optim.SGD(parameters, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)


def _sleep_until(seconds: float, deadline: float | None) -> None:
    """Sleep ``seconds``, but wake at the deadline and say so."""
    if seconds <= 0:
        return
    wake = time.time() + seconds
    if deadline is not None and deadline < wake:
        time.sleep(max(deadline - time.time(), 0.0))
        raise RoundDeadline("the injected slowdown outlasted the round deadline")
    time.sleep(seconds)
