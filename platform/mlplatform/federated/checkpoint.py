"""A federated run's state after each round (global weights, the accountant's ledger, the metrics so far), and what --resume reads."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import torch

from mlplatform import storage
from mlplatform.config import ConfigError
from mlplatform.federated.config import FederatedConfig

CHECKPOINT_NAME = "last_round.pt"


@dataclasses.dataclass
class RoundState:
    """Everything a federation needs to go on after round ``server_round`` as if it had never stopped."""

    server_round: int
    weights: np.ndarray
    """The global model after the round, flat."""
    history: list[dict[str, float]]
    """Each round's logged metrics (``RoundReport.metrics()``: under DP only what the guarantee covers)."""
    start_metrics: dict[str, dict[str, float]]
    """The starting model's scores on each test split, which the final report compares against."""
    accountant: dict[str, object] | None
    """The privacy accountant's ledger (``PrivacyAccountant.state_dict()``); None without DP."""
    mlflow_run_id: str | None
    """The run the rounds so far were logged to, which a resumed run goes on logging to."""


def checkpoint_location(config: FederatedConfig) -> str:
    """``<output_dir>/last_round.pt``, a relative folder under ``$MLPLATFORM_STORAGE`` (see :func:`mlplatform.storage.resolve`)."""
    return storage.join(storage.resolve(config.output_dir), CHECKPOINT_NAME)


def save_round_state(config: FederatedConfig, state: RoundState) -> None:
    """Replace the checkpoint with ``state``, whole or not at all (a crash mid-write keeps the previous round)."""
    buffer = io.BytesIO()
    torch.save({**dataclasses.asdict(state), "weights": torch.from_numpy(np.ascontiguousarray(state.weights))}, buffer)
    storage.write_bytes(checkpoint_location(config), buffer.getvalue())


def load_round_state(config: FederatedConfig, model_size: int) -> RoundState:
    """The last round's state, read with ``torch.load(weights_only=True)``.

    Raises:
        ConfigError: there is no checkpoint, or it holds a model of another size than the config's.
    """
    saved = _read(config)
    weights = saved.pop("weights").numpy()
    if weights.size != model_size:
        raise ConfigError(f"--resume: the checkpoint at {checkpoint_location(config)} holds a model of {weights.size} "
                          f"weights, the config's has {model_size}; resume with the config it was made with")
    return RoundState(weights=weights, **saved)


def resumed_run_id(config: FederatedConfig) -> str | None:
    """The MLflow run of the checkpoint a ``--resume`` continues (None when it was not tracked).

    Raises:
        ConfigError: there is no checkpoint to resume from.
    """
    return _read(config)["mlflow_run_id"]


def _read(config: FederatedConfig) -> dict:
    location = checkpoint_location(config)
    try:
        return torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume found no round checkpoint at {location}") from None
