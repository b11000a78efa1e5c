"""Typed run configuration: pydantic dataclasses loaded from YAML files and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import ConfigDict

# Shared by every run config: misspelt keys fail instead of being ignored, and the one-line
# docstring under each field becomes its description (shown by `mlplatform ... --help`).
RUN_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what was wrong."""


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ``["lr=0.001", "hidden_sizes=[64, 64]"]`` into a dict, values parsed as YAML.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} must look like key=value")
        overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    return overrides


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or is not a mapping.
    """
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {str(path)!r} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}".splitlines()[0]) from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def build_config(cls: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
    """Validate ``values`` into the pydantic dataclass ``cls``.

    Raises:
        ConfigError: an unknown key (with the closest known key suggested) or a bad value.
    """
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}{hint}")
    try:
        return cls(**values)
    except pydantic.ValidationError as e:
        raise ConfigError(_describe_validation_error(e)) from e


def load_config(
    cls: type[ConfigT],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Build a config from defaults, then a YAML file, then explicit overrides (last wins).

    Args:
        cls: a pydantic dataclass such as ``DQNConfig``.
        path: optional YAML file with a flat mapping of field names to values.
        overrides: values that take precedence over the file (e.g. from ``--set``).

    Returns:
        The validated config.

    Raises:
        ConfigError: the file cannot be read, a key is unknown, or a value is out of range.
    """
    values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    values.update(overrides or {})
    return build_config(cls, values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a config, for logging as parameters and saving in checkpoints."""
    return dataclasses.asdict(config)


def _describe_validation_error(error: pydantic.ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if "input" in item and item["loc"]:
            parts.append(f"{where}: {message} (got {item['input']!r})")
        else:
            parts.append(f"{where}: {message}")
    return "; ".join(parts)
