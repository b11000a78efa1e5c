"""The commands that run the platform on this machine: `mlplatform up|down` and `mlplatform cluster local ...`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlplatform.cli_options import ConfigOption, SetOption, fail, load_run_config

if TYPE_CHECKING:
    from mlplatform.localcluster import ClusterState

cluster_app = typer.Typer(help="Ray clusters for mlplatform's workloads.", no_args_is_help=True)
local_app = typer.Typer(
    help="A multi-node Ray cluster on this machine whose worker nodes share no disk with the driver.", no_args_is_help=True
)
cluster_app.add_typer(local_app, name="local")

HomeOption = Annotated[Path, typer.Option("--home", help="The folder of its state, logs and stores.")]
NodeArgument = Annotated[str, typer.Argument(help="A worker node's name: w1, w2, ...")]


def up_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Start Ray, MLflow and Prometheus here, train, register and serve three models as Ray jobs, then print the URLs.

    The jobs: Ape-X DQN on CartPole, an emotion Tune search, and DP federated fine-tuning of its best model by writer.

    Run it from the repository root; `mlplatform down` stops it all.
    """
    from mlplatform.services import ServiceError
    from mlplatform.stack import StackConfig, StackState, summary, up

    stack_config = load_run_config(StackConfig, config, set_)
    from mlplatform.mlops.tracking import TrackingError  # after the settings are checked: MLflow takes seconds to import
    try:
        state = up(stack_config, typer.echo)
    except (ServiceError, TrackingError, ValueError, KeyboardInterrupt) as e:
        _left_running(f"error: {e}" if str(e) else "interrupted", StackState.load(stack_config.home), stack_config.home, "down")
    for line in summary(state, stack_config):
        typer.echo(line)


def down_command(home: HomeOption = Path("runs/stack")) -> None:
    """Stop what `mlplatform up` started (by the pids it recorded): the Ray nodes with their jobs and Serve, MLflow, Prometheus."""
    from mlplatform.stack import down

    stopped = down(home, typer.echo)
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else f"nothing of the stack in {home} is running")


@local_app.command("up")
def local_up_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Start a Ray head and worker nodes here (token auth on), an MLflow server and an S3 API server they all reach.

    Each worker node runs in its own mount namespace: it sees the repository's code and the virtual
    environment, but not the driver's temporary folders, runs/, checkpoints/, MLflow stores or caches.
    """
    from mlplatform.localcluster import ClusterConfig, ClusterState, summary, up
    from mlplatform.services import ServiceError

    cluster_config = load_run_config(ClusterConfig, config, set_)
    from mlplatform.mlops.tracking import TrackingError  # after the settings are checked: MLflow takes seconds to import
    try:
        state = up(cluster_config, typer.echo)
    except (ServiceError, TrackingError, KeyboardInterrupt) as e:
        _left_running(f"error: {e}" if str(e) else "interrupted", ClusterState.load(cluster_config.home),
                      cluster_config.home, "cluster local down")
    for line in summary(state):
        typer.echo(line)


@local_app.command("down")
def local_down_command(home: HomeOption = Path("runs/cluster")) -> None:
    """Stop every node and store `mlplatform cluster local up` started, by the pids it recorded."""
    from mlplatform.localcluster import down

    stopped = down(home, typer.echo)
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else f"nothing of the cluster in {home} is running")


@local_app.command("kill-node")
def local_kill_node_command(name: NodeArgument, home: HomeOption = Path("runs/cluster")) -> None:
    """Lose a worker node: SIGKILL its Ray processes at once, as a machine that loses power (try a running job)."""
    from mlplatform.localcluster import kill_node
    from mlplatform.services import ServiceError

    state = _state(home)
    try:
        killed = kill_node(state, name)
    except ServiceError as e:
        fail(str(e))
    typer.echo(f"killed {name}: {len(killed)} processes" if killed else f"{name} was not running")


@local_app.command("start-node")
def local_start_node_command(name: NodeArgument, home: HomeOption = Path("runs/cluster")) -> None:
    """Start a worker node again (after `kill-node`), isolated as before."""
    from mlplatform.localcluster import auth_token, start_node
    from mlplatform.services import ServiceError

    state = _state(home)
    try:
        start_node(state, name, auth_token())
    except ServiceError as e:
        fail(str(e))
    typer.echo(f"started {name}")


def _state(home: Path) -> ClusterState:
    from mlplatform.localcluster import ClusterState

    state = ClusterState.load(home)
    if state is None or not state.running():
        fail(f"no cluster is running from {home}; start one with `mlplatform cluster local up`")
    return state


def _left_running(message: str, state: ClusterState | None, home: str, stop: str) -> None:
    """Report a failed start in one line and what is still running, then exit 1."""
    typer.echo(message, err=True)
    if state is not None and state.running():
        typer.echo(f"still running: {', '.join(p.name for p in state.running())}; "
                   f"`mlplatform {stop} --home {home}` stops them", err=True)
    raise typer.Exit(code=1)
