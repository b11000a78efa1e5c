"""The `mlplatform` command line: train models and point at where their runs are tracked."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from mlplatform.config import ConfigError, load_config, parse_overrides

if TYPE_CHECKING:
    from mlplatform.mlops.tracking import ExperimentTracker

app = typer.Typer(
    help="Train, track and serve models on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(help="Train a model; each run is logged to MLflow.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def fail(message: str) -> NoReturn:
    """Print a one-line error and exit with status 2, the usage-error code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def open_tracker(experiment_name: str, run_name: str) -> ExperimentTracker:
    """Start an MLflow run on the default store, or exit with a one-line error."""
    from mlplatform.mlops.tracking import ExperimentTracker, TrackingError

    try:
        return ExperimentTracker(experiment_name, run_name=run_name)
    except TrackingError as e:
        fail(str(e))


ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML file of config fields (see jobs/configs/).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one config field, e.g. --set learning_rate=3e-4 (repeatable)."),
]


@train_app.command("dqn")
def train_dqn_command(
    env: Annotated[str | None, typer.Option("--env", help="Gymnasium environment id, e.g. CartPole-v1.")] = None,
    config: ConfigOption = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    total_steps: Annotated[int | None, typer.Option(help="Environment steps to run.")] = None,
    set_: SetOption = None,
    output_dir: Annotated[Path, typer.Option(help="Folder for the run's checkpoint.")] = Path("runs"),
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress line.")] = True,
) -> None:
    """Train a Dueling Double DQN with prioritized replay in one process (CartPole by default)."""
    # Imported here, not at the top, so `--help` answers without loading torch and MLflow.
    from mlplatform.rl.agent import DQNConfig
    from mlplatform.rl.train import train_dqn

    try:
        overrides = parse_overrides(set_ or [])
        for key, value in (("env_id", env), ("seed", seed), ("total_steps", total_steps)):
            if value is not None:
                overrides[key] = value
        run_config = load_config(DQNConfig, config, overrides)
    except ConfigError as e:
        fail(str(e))

    run_name = f"{run_config.env_id}__dqn__{run_config.seed}__{int(time.time())}"
    run_dir = output_dir / run_name
    tracker = open_tracker(run_config.experiment_name, run_name) if track else None
    try:
        if tracker is None:
            result = train_dqn(run_config, output_dir=run_dir, progress=progress)
        else:
            with tracker:
                result = train_dqn(run_config, tracker, output_dir=run_dir, progress=progress)
    except ConfigError as e:
        fail(str(e))

    solved = f"solved at {result.solved_at_step} steps" if result.solved_at_step else "not solved"
    typer.echo(
        f"{run_config.env_id}: {solved}; final greedy return {result.final_eval_return:.1f} "
        f"after {result.env_steps} steps in {result.seconds:.1f}s"
    )
    typer.echo(f"checkpoint: {result.checkpoint}")
    if tracker is not None:
        typer.echo(tracker.ui_hint())


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mlplatform")


if __name__ == "__main__":
    sys.exit(main())
