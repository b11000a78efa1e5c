"""A multi-node Ray cluster on one machine (`mlplatform cluster local up`): nodes that share no disk, storage they all reach.

The head runs here; each worker node runs in its own mount namespace with the driver's temporary
folders, the repository's run outputs and the user's caches hidden under empty tmpfs mounts, so a
workload that hands an actor a driver-local path fails here as it would on a second machine.
What every node does reach, as on a real cluster: Ray's object store, the job's working dir, an
MLflow tracking server with proxied artifacts, and an S3 API server (``$MLPLATFORM_STORAGE``).
The tests run on the same code (``tests/cluster/conftest.py``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydantic
from pydantic.dataclasses import dataclass

from mlplatform.config import RUN_CONFIG
from mlplatform.raynodes import ray_node_argv, start_ray_head, start_ray_worker
from mlplatform.services import (
    BIN, LOOPBACK, ServiceError, ServiceState, check_ports_free, free_port, start_mlflow_server, start_prometheus, start_s3,
)
from mlplatform.storage import STORAGE_ENV

Echo = Callable[[str], None]
HEAD_RESOURCE = "head"
NODE_DEATH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
"""How the head notices a lost node: three failed checks a second apart (Ray's defaults, five 3 s
apart, allow for a network). The nodes share this machine's loopback, where a dead raylet refuses
at once while a busy one still answers within the check's 10 s timeout, so a lost node's work is
rescheduled about ten seconds sooner."""
"""A custom resource only the head has, so an actor can be pinned to the node that is never lost."""


@dataclass(config=RUN_CONFIG)
class ClusterConfig:
    """The services and nodes of a cluster on this machine; every field can be set from YAML or ``--set key=value``."""

    home: str = "runs/cluster"
    """Folder for the state file, logs, the MLflow store and its artifacts (made absolute)."""
    workers: int = pydantic.Field(2, ge=0)
    """Worker nodes, named w1, w2, ...; each has the custom resource {"w<i>": 1} and its own mount namespace."""
    num_cpus: int | None = pydantic.Field(None, ge=0)
    """CPUs the head offers; None offers every core (the demo's single node), 0 keeps work off the head."""
    worker_cpus: int = pydantic.Field(2, ge=1)
    """CPUs each worker node offers (logical: several nodes may share this machine's cores)."""
    object_store_mb: int | None = pydantic.Field(None, ge=100)
    """Object store per node in MiB; None lets Ray size it (30% of memory, for each node)."""
    s3: bool | None = None
    """Start an S3 API server and set MLPLATFORM_STORAGE to its bucket; None starts one when there are worker nodes."""
    bucket: str = "mlplatform"
    """The bucket MLPLATFORM_STORAGE points at."""
    ray_port: int = pydantic.Field(6379, ge=1, le=65535)
    """The head's GCS port (the address worker nodes join)."""
    dashboard_port: int = pydantic.Field(8265, ge=1, le=65535)
    """Ray dashboard and job API, on loopback."""
    client_port: int = pydantic.Field(10001, ge=1, le=65535)
    """The Ray Client server (``ray.init("ray://...")``)."""
    metrics_port: int = pydantic.Field(8080, ge=1, le=65535)
    """Where the head exports Prometheus metrics (worker nodes get free ports of their own)."""
    mlflow_port: int = pydantic.Field(5000, ge=1, le=65535)
    """MLflow tracking server, on loopback (started unless MLFLOW_TRACKING_URI names a server already)."""
    s3_port: int = pydantic.Field(9000, ge=1, le=65535)
    """S3 API server, on loopback."""
    prometheus_port: int | None = pydantic.Field(None, ge=1, le=65535)
    """Prometheus, on loopback; None draws a free port at start (never the packaged service's 9090 by default)."""
    prometheus: bool = True
    """Start Prometheus, scraping every node's metrics port, when a `prometheus` binary is on PATH."""
    ready_timeout_s: float = pydantic.Field(300.0, gt=0.0)
    """Seconds each service gets to answer."""

    def ports(self) -> dict[str, int]:
        ports = {"ray_port": self.ray_port, "dashboard_port": self.dashboard_port, "client_port": self.client_port,
                 "metrics_port": self.metrics_port, "mlflow_port": self.mlflow_port}
        return ports | ({"s3_port": self.s3_port} if self.wants_s3() else {}) | (
            {"prometheus_port": self.prometheus_port} if self.prometheus and self.prometheus_port is not None else {})

    def wants_s3(self) -> bool:
        return self.s3 if self.s3 is not None else self.workers > 0


@dataclasses.dataclass
class ClusterState(ServiceState):
    """The running cluster: its processes, addresses, the environment clients need, and how each worker node was started."""

    gcs_address: str = ""
    """The head's GCS address, which worker nodes join."""
    nodes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Each worker node's `ray start` options, to start it again after it was lost."""
    STATE_FILE = "cluster.json"
    STOP_COMMAND = "mlplatform cluster local down"

    def node_env(self, token: str) -> dict[str, str]:
        """The environment every node is started with: the project's Python first, the stores, the token."""
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **self.env, "RAY_AUTH_TOKEN": token}
        if "prometheus" in self.urls:  # the dashboard draws its time-series from it
            env["RAY_PROMETHEUS_HOST"] = self.urls["prometheus"]
        return env

    def client_env(self) -> dict[str, str]:
        """What a fresh shell exports to submit jobs and reach the stores (the token comes from ~/.ray/auth_token)."""
        return {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.urls["dashboard"], **self.env}


def auth_token() -> str:
    """Ray's token: ``RAY_AUTH_TOKEN``, else ``~/.ray/auth_token``, which Ray generates when it is missing."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path.home() / ".ray" / "auth_token"
    if not path.is_file():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    return path.read_text(encoding="utf-8").strip()


def up(config: ClusterConfig, echo: Echo, *, state_class: type[ClusterState] = ClusterState,
       repository: Path | None = None) -> ClusterState:
    """Start the stores, the Ray head and ``config.workers`` isolated worker nodes; each is recorded before the next starts.

    Raises:
        ServiceError: the cluster is already up, a port is taken, or a service does not come up.
    """
    from mlplatform.mlops.tracking import default_tracking_uri

    home = Path(config.home).resolve()
    repository = (repository or Path.cwd()).resolve()
    previous = state_class.load(home)
    if previous is not None and previous.running():
        raise ServiceError(f"the cluster in {home} is already up; stop it with `{state_class.STOP_COMMAND}` first")
    check_ports_free(config.ports())
    tracking_uri = default_tracking_uri()
    state = state_class(str(home))
    state.save()
    os.environ["RAY_AUTH_MODE"] = "token"  # before any Ray client is made in this process
    token = auth_token()

    metrics_ports = [config.metrics_port] + [free_port() for _ in range(config.workers)]
    if config.prometheus and shutil.which("prometheus"):
        prometheus = start_prometheus(state, port=config.prometheus_port or free_port(), targets=[f"{LOOPBACK}:{p}" for p in metrics_ports],
                                      timeout_s=config.ready_timeout_s)
        echo(f"prometheus up at {prometheus}")
    elif config.prometheus:
        echo(f"prometheus not on PATH: metrics stay at http://{LOOPBACK}:{config.metrics_port}/metrics for your own server")
    if tracking_uri.startswith(("http://", "https://")):
        state.urls["mlflow"] = tracking_uri
    else:  # a local store becomes a server's backend, so every node logs over HTTP
        tracking_uri = start_mlflow_server(state, port=config.mlflow_port, backend_uri=tracking_uri,
                                           artifacts=home / "mlflow-artifacts", timeout_s=config.ready_timeout_s)
        echo(f"mlflow server up at {tracking_uri} (artifacts proxied by it)")
    state.env["MLFLOW_TRACKING_URI"] = tracking_uri
    if config.wants_s3():
        state.env |= start_s3(state, port=config.s3_port, bucket=config.bucket, timeout_s=config.ready_timeout_s)
        state.env[STORAGE_ENV] = f"s3://{config.bucket}"
        echo(f"s3 up at {state.urls['s3']}: {STORAGE_ENV}={state.env[STORAGE_ENV]}")
    state.save()

    env = state.node_env(token)
    object_store = config.object_store_mb * 2**20 if config.object_store_mb else None
    head_argv = ray_node_argv(num_cpus=config.num_cpus, resources={HEAD_RESOURCE: 1}, object_store_bytes=object_store,
                              metrics_port=config.metrics_port)
    dashboard = start_ray_head(state, port=config.ray_port, dashboard_port=config.dashboard_port, client_port=config.client_port,
                               node_argv=head_argv, env=env | NODE_DEATH_CHECKS, timeout_s=config.ready_timeout_s)
    state.gcs_address = f"{LOOPBACK}:{config.ray_port}"
    echo(f"ray head up: dashboard and job API at {dashboard}")
    for index, metrics_port in enumerate(metrics_ports[1:], start=1):
        name = f"w{index}"
        state.nodes[name] = ray_node_argv(num_cpus=config.worker_cpus, resources={name: 1}, object_store_bytes=object_store,
                                          metrics_port=metrics_port)
        start_node(state, name, token, repository=repository)
    wait_for_nodes(state, 1 + config.workers, config.ready_timeout_s,
                   restart=lambda name: start_node(state, name, token, repository=repository))
    if config.workers:
        echo(f"{config.workers} worker nodes joined, each in its own mount namespace")
    return state


def start_node(state: ClusterState, name: str, token: str, *, repository: Path | None = None) -> None:
    """Start worker node ``name`` (again), isolated, joining the head."""
    _check_node(state, name)
    if any(p.name == f"ray-{name}" and p.alive() for p in state.processes):
        raise ServiceError(f"worker node {name} is running already")
    start_ray_worker(state, f"ray-{name}", address=state.gcs_address, node_argv=state.nodes[name], env=state.node_env(token),
                     repository=(repository or Path.cwd()).resolve())
    state.save()


def kill_node(state: ClusterState, name: str) -> list[int]:
    """Lose worker node ``name``: SIGKILL its `ray start`, raylet and every worker process at once; returns their pids."""
    _check_node(state, name)
    return state.process(f"ray-{name}").kill()


def _check_node(state: ClusterState, name: str) -> None:
    if name not in state.nodes:
        raise ServiceError(f"no worker node named {name!r}; the cluster has {sorted(state.nodes) or 'none'}")


NODE_START_ATTEMPTS = 3
"""Starts of a worker node before `up` gives up: Ray gives a new raylet a fixed 30 s to register with the
head, which a loaded machine can miss, and the node's `ray start` then exits."""


def wait_for_nodes(state: ClusterState, count: int, timeout_s: float, *,
                   restart: Callable[[str], None] | None = None) -> None:
    """Wait until ``count`` nodes are alive, as the head's state API reports them.

    A worker node whose `ray start` exits before it joins is started again by ``restart`` (given
    the node's name), up to :data:`NODE_START_ATTEMPTS` starts in all.
    """
    from ray.util.state import list_nodes

    def alive_nodes() -> int:  # the dead nodes a lost node leaves behind stay listed: not a truncated answer
        return len(list_nodes(address=state.urls["dashboard"], filters=[("state", "=", "ALIVE")], limit=10_000,
                              raise_on_missing_output=False))

    deadline = time.monotonic() + timeout_s
    starts = dict.fromkeys(state.nodes, 1)
    while (alive := alive_nodes()) < count:
        for name in ("ray", *(f"ray-{node}" for node in state.nodes)):
            process = state.process(name)
            if process.alive():
                continue
            node = name.removeprefix("ray-")
            if restart is None or node not in starts or starts[node] >= NODE_START_ATTEMPTS:
                raise ServiceError(f"{name} exited; see {process.log}")
            starts[node] += 1
            restart(node)
        if time.monotonic() > deadline:
            raise ServiceError(f"only {alive} of {count} Ray nodes joined in {timeout_s:.0f}s; see {state.home}/logs")
        time.sleep(1)


def down(home: str | Path, echo: Echo, *, state_class: type[ClusterState] = ClusterState) -> list[str]:
    """Stop what `up` started from ``home``, worker nodes first; returns the names of what was running."""
    state = state_class.load(home)
    if state is None:
        return []
    for process in reversed(state.processes):
        if process.alive():
            echo(f"stopping {process.name} (pid {process.pid})")
    return state.stop_all()


def summary(state: ClusterState) -> list[str]:
    """Where everything is, and what to export in another shell (credentials stay in the state file)."""
    exports = " ".join(f"{key}={value}" for key, value in state.client_env().items() if not key.startswith("AWS_"))
    lines = [f"{name:<11}{url}" for name, url in state.urls.items()]
    lines += [f"nodes      head + {', '.join(state.nodes) or 'no worker nodes'}",
              f"in another shell: export {exports}",
              f"then: {BIN / 'ray'} job submit --working-dir . -- python jobs/train_dqn.py --config jobs/configs/apex_cartpole.yaml"]
    if "s3" in state.urls:
        lines.append(f"the S3 server's AWS_* settings, for your own clients: {state.path(state.home)}")
    return lines


__all__ = ["ClusterConfig", "ClusterState", "HEAD_RESOURCE", "ServiceError", "down", "kill_node", "start_node", "summary", "up"]
