"""What every `mlplatform` command shares: the config options, loading a run config, and the one-line error exit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from mlplatform.config import ConfigError, load_config, parse_overrides

ConfigT = TypeVar("ConfigT")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML file of config fields (see jobs/configs/).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one config field, e.g. --set learning_rate=3e-4 (repeatable)."),
]


def fail(message: str) -> NoReturn:
    """Print a one-line error and exit with status 2, the usage-error code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def load_run_config(cls: type[ConfigT], path: Path | None, pairs: list[str] | None, **options: Any) -> ConfigT:
    """Defaults, then the YAML file, then ``--set`` pairs, then named options; or a one-line exit."""
    try:
        overrides = parse_overrides(pairs or [])
        overrides.update({key: value for key, value in options.items() if value is not None})
        return load_config(cls, path, overrides)
    except ConfigError as e:
        fail(str(e))
