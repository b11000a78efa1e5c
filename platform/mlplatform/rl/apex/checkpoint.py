"""Where an Ape-X run keeps its latest checkpoint (a path or a storage URI), and what ``--resume`` reads back."""

from __future__ import annotations

import io

import torch

from mlplatform import storage
from mlplatform.config import ConfigError
from mlplatform.rl.apex.config import ApexConfig


def checkpoint_uri(config: ApexConfig) -> str:
    """``<checkpoint_dir>/latest.pt``, with a relative folder under ``$MLPLATFORM_STORAGE`` (see :func:`mlplatform.storage.resolve`)."""
    return storage.join(storage.resolve(config.checkpoint_dir), "latest.pt")


def read_checkpoint(config: ApexConfig) -> bytes:
    """The latest checkpoint's bytes.

    Raises:
        ConfigError: there is none to resume from.
    """
    location = checkpoint_uri(config)
    try:
        return storage.read_bytes(location)
    except FileNotFoundError:
        raise ConfigError(f"--resume found no checkpoint at {location}") from None


def checkpoint_extra(config: ApexConfig) -> dict:
    """The extra values stored with the latest checkpoint (e.g. its MLflow run id).

    Raises:
        ConfigError: there is no checkpoint to resume from.
    """
    return torch.load(io.BytesIO(read_checkpoint(config)), map_location="cpu", weights_only=True).get("extra", {})
