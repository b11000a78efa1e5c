"""Ray nodes of ours: a head on loopback with token auth, and worker nodes each in a mount namespace of its own.

A worker node sees the driver's disk no more than another machine would (see :func:`isolated`).
Each node is a :class:`~mlplatform.services.ManagedProcess` of a ``ServiceState``, stopped by its pid.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

from mlplatform.services import BIN, LOOPBACK, ManagedProcess, ServiceError, ServiceState, check_running, free_port


RAY_NODE_ENV = {"RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_EXPORT_COUNTER_AS_GAUGE": "0"}
"""Set for every `ray start` of ours: token auth on, no drain on SIGTERM, and each counter exported once.
Ray drains a node for up to 30 s so that Serve can move its replicas elsewhere; our nodes are stopped
all together, with nowhere left to move to, so the wait would only delay ``down``. Ray also exports
every counter as a gauge of the same name by default, which dashboards then mistake for the counter."""


def ray_node_argv(*, num_cpus: int | None, resources: dict[str, float], object_store_bytes: int | None,
                  metrics_port: int | None = None) -> list[str]:
    """The `ray start` options that make a node of ours what it is: its size, custom resources, metrics port."""
    argv = ["--block", "--disable-usage-stats"]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if resources:
        argv.append(f"--resources={json.dumps(resources)}")
    if object_store_bytes is not None:
        argv.append(f"--object-store-memory={object_store_bytes}")
    if metrics_port is not None:
        argv.append(f"--metrics-export-port={metrics_port}")
    return argv


def agent_port_argv() -> list[str]:
    """Free ports for a node's agents, drawn at each start.

    Several nodes on one machine share its ports: Ray's defaults (the dashboard agent's 52365)
    would clash with the next node, and ports drawn once could be taken by the time a lost node
    starts again.
    """
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]


def start_ray_head(state: ServiceState, *, port: int, dashboard_port: int, client_port: int, node_argv: list[str],
                   env: dict[str, str], timeout_s: float) -> str:
    """`ray start --head`, dashboard and job API on loopback, token auth on; ready once the job API takes a job.

    Returns:
        The dashboard (job API) address.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    argv = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}", *node_argv, *agent_port_argv()]
    process = state.launch("ray", argv, env | RAY_NODE_ENV)
    dashboard = f"http://{LOOPBACK}:{dashboard_port}"
    state.urls["dashboard"] = dashboard
    state.save()
    deadline = time.monotonic() + timeout_s
    while True:  # the job API answers a few seconds before its agent takes jobs
        check_running(process, deadline, "the Ray head")
        try:
            JobSubmissionClient(dashboard).submit_job(entrypoint="python -c pass")
            return dashboard
        except AuthenticationError:  # the port was free when checked, and another Ray's dashboard took it since
            raise ServiceError(f"port {dashboard_port} answers for another Ray cluster (its token differs); "
                               "choose a free dashboard port") from None
        except (OSError, RuntimeError):  # refused, or "No available agent to submit job"
            time.sleep(2)


def hidden_paths(repository: Path) -> tuple[list[Path], list[Path]]:
    """What a worker node must not see of this machine: (folders, files).

    The driver's temporary folders (all of ``/tmp``), the repository's run outputs, checkpoints and
    local MLflow stores, and the user's caches and Ray folder. The repository's code and the virtual
    environment stay visible, as a cluster image would have them installed (see :func:`isolated`).
    """
    home = Path.home()
    folders = [Path("/tmp"), *(repository / name for name in ("runs", "checkpoints", "mlruns")),
               home / ".cache", home / ".ray"]
    if os.environ.get("MLPLATFORM_HOME"):
        folders.append(Path(os.environ["MLPLATFORM_HOME"]).resolve())
    # a folder inside another hidden one is hidden already (and could not be a mount point on the empty tmpfs);
    # the repository is shown again inside a hidden folder, so what is hidden within it counts on its own
    inside = lambda path: path.is_relative_to(repository)  # noqa: E731
    outermost = [f for f in folders if not any(other != f and f.is_relative_to(other) and inside(f) == inside(other)
                                               for other in folders)]
    files = [f for f in sorted(repository.glob("mlruns.db*")) if not any(f.is_relative_to(folder) for folder in outermost
                                                                         if inside(folder))]
    return list(dict.fromkeys(outermost)), files


def isolated(argv: list[str], *, folders: list[Path], files: list[Path], repository: Path) -> list[str]:
    """``argv`` run in a mount namespace of its own, with an empty tmpfs over each folder and each file emptied.

    The repository (the code and its virtual environment) stays visible even when it lies inside a
    hidden folder, as a fresh clone under ``/tmp`` does: the shell keeps it open as its working
    folder while the tmpfs covers it, then binds it back at its own path. The node gets its own
    HOME on its own ``/tmp``. Mounts made inside the namespace are private to it: the rest of the
    machine never sees them, and they vanish with the node's last process.
    """
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)  # a mount point must exist
    covering = [f for f in folders if not f.is_relative_to(repository)]
    within = [f for f in folders if f.is_relative_to(repository)]
    quoted = shlex.quote(str(repository))
    mounts = [f"cd {quoted}", *(f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}" for folder in covering)]
    if any(repository.is_relative_to(folder) for folder in covering):
        # "." as given, the folder the shell still holds: made canonical, it would name the empty tmpfs over it
        mounts += [f"mkdir -p {quoted}", f"mount --no-canonicalize --bind . {quoted}", f"cd {quoted}"]
    mounts += [f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}" for folder in within]
    mounts += [f"mount --bind /dev/null {shlex.quote(str(file))}" for file in files]
    script = "set -e; " + "; ".join(mounts) + '; mkdir -p /tmp/home; export HOME=/tmp/home; exec "$@"'
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.insert(1, "--map-root-user")  # an unprivileged user can still own a mount namespace
    return [*unshare, "sh", "-c", script, "sh", *argv]


def start_ray_worker(state: ServiceState, name: str, *, address: str, node_argv: list[str], env: dict[str, str],
                     repository: Path) -> ManagedProcess:
    """A Ray worker node joining ``address`` from its own mount namespace (see :func:`isolated`)."""
    folders, files = hidden_paths(repository)
    for folder in folders:
        if BIN.is_relative_to(folder) and not BIN.is_relative_to(repository):
            raise ServiceError(f"the Python environment {BIN.parent} lies in {folder}, which a worker node hides; "
                               f"install it inside the repository (as `make` does) or outside {folder}")
    argv = isolated([str(BIN / "ray"), "start", f"--address={address}", *node_argv, *agent_port_argv()], folders=folders,
                    files=files, repository=repository)
    return state.launch(name, argv, env | RAY_NODE_ENV)
