"""Background services on this machine, each recorded by pid and start time so that exactly they are stopped.

`mlplatform up` and `mlplatform cluster local up` are built from these: an MLflow tracking server
that proxies artifacts, an S3 API server, Prometheus, a Ray head, and Ray worker nodes that each
run in their own mount namespace, so that they see the driver's disk no more than another machine
would. Services listen on 127.0.0.1; Ray's own gRPC ports follow the node's address (see README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent


class ServiceError(RuntimeError):
    """A service cannot start or did not come up; the message says which and where its log is."""


@dataclasses.dataclass
class ManagedProcess:
    """A background service this machine started, identified by pid and start time (a reused pid is not ours)."""

    name: str
    pid: int
    started: float
    log: str

    def alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM (Ray's ``start --block`` and MLflow stop their children on it), then SIGKILL the group."""
        stop_together([self], timeout_s)

    def kill(self) -> list[int]:
        """SIGKILL the process and every process below it at once, as a machine that loses power; returns their pids."""
        if not self.alive():
            return []
        root = psutil.Process(self.pid)
        tree = [root, *root.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=30)
        return [process.pid for process in tree]


@dataclasses.dataclass
class ServiceState:
    """What runs and where, saved as ``<home>/<name>.json`` after every step, so a half-started set can be stopped."""

    home: str
    processes: list[ManagedProcess] = dataclasses.field(default_factory=list)
    urls: dict[str, str] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """What a client needs in its environment to use these services (tokens are not stored here)."""

    STATE_FILE = "state.json"

    @classmethod
    def path(cls, home: str | Path) -> Path:
        return Path(home).resolve() / cls.STATE_FILE

    @classmethod
    def load(cls, home: str | Path) -> ServiceState | None:
        path = cls.path(home)
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{**saved, "processes": [ManagedProcess(**p) for p in saved["processes"]]})

    def save(self) -> None:
        path = self.path(self.home)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + os.linesep, encoding="utf-8")
        os.replace(scratch, path)

    def running(self) -> list[ManagedProcess]:
        return [p for p in self.processes if p.alive()]

    def process(self, name: str) -> ManagedProcess:
        """The newest process started under ``name``."""
        return next(p for p in reversed(self.processes) if p.name == name)

    def launch(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        """Start ``argv`` in its own session (it outlives this command and the terminal's Ctrl-C), logging to ``logs/<name>.log``."""
        log = Path(self.home) / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            child = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        process = ManagedProcess(name, child.pid, psutil.Process(child.pid).create_time(), str(log))
        self.processes.append(process)
        self.save()
        return process

    def stop_all(self) -> list[str]:
        """Stop every recorded process and forget the state; returns the names stopped, newest first."""
        running = [process for process in reversed(self.processes) if process.alive()]
        stop_together(running)
        self.path(self.home).unlink(missing_ok=True)
        return [process.name for process in running]


def stop_together(processes: list[ManagedProcess], timeout_s: float = 60.0) -> None:
    """SIGTERM each process at once, wait for all together, then SIGKILL the groups of those still up."""
    for process in processes:
        if process.alive():
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(p.alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in processes:
        if process.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def check_ports_free(ports: dict[str, int]) -> None:
    """Raise if any of the named ports already answers on loopback."""
    for field, port in ports.items():
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                raise ServiceError(f"port {port} ({field}) is in use on {LOOPBACK}; free it or set {field} to another port")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_http(url: str, process: ManagedProcess, timeout_s: float) -> None:
    """Return once ``url`` answers 200; raise if ``process`` exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_running(process, deadline, process.name)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)


def check_running(process: ManagedProcess, deadline: float, what: str) -> None:
    if not process.alive():
        raise ServiceError(f"{process.name} exited; see {process.log}")
    if time.monotonic() > deadline:
        raise ServiceError(f"{what} did not come up in time; see {process.log}")


def start_mlflow_server(state: ServiceState, *, port: int, backend_uri: str, artifacts: Path, timeout_s: float) -> str:
    """An MLflow tracking server that stores artifacts itself and proxies them (``--serve-artifacts``); returns its URI.

    Every node then logs runs, models and artifacts over HTTP, and registry URIs resolve anywhere.
    One uvicorn worker and no job runner: a laptop's cores are for training.
    """
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = state.launch("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                                      "--serve-artifacts", "--artifacts-destination", str(artifacts),
                                      "--host", LOOPBACK, "--port", str(port), "--workers", "1"], env)
    uri = f"http://{LOOPBACK}:{port}"
    state.urls["mlflow"] = uri
    wait_http(f"{uri}/health", process, timeout_s)
    state.save()
    return uri


def start_s3(state: ServiceState, *, port: int, bucket: str, timeout_s: float) -> dict[str, str]:
    """A real S3 API server (moto's) on loopback with one bucket; returns the AWS environment that reaches it.

    The credentials are made up here: this server accepts any, and a cloud's come from the user's
    own profile instead.
    """
    process = state.launch("s3", [str(BIN / "moto_server"), "-H", LOOPBACK, "-p", str(port)], dict(os.environ))
    endpoint = f"http://{LOOPBACK}:{port}"
    wait_http(f"{endpoint}/moto-api/", process, timeout_s)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": f"local-{secrets.token_hex(4)}",
           "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16), "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"]).create_bucket(Bucket=bucket)
    state.urls["s3"] = endpoint
    state.save()
    return env


def start_prometheus(state: ServiceState, *, port: int, targets: list[str], timeout_s: float) -> str:
    """Prometheus with the shipped scrape config (``cluster/prometheus.yml``), aimed at ``targets``; returns its URL."""
    import yaml

    from mlplatform.config import read_yaml_mapping

    binary = shutil.which("prometheus")
    if binary is None:
        raise ServiceError("prometheus is not on PATH")
    scrape = read_yaml_mapping("cluster/prometheus.yml")
    for job in scrape["scrape_configs"]:
        job.pop("file_sd_configs", None)
        job["static_configs"] = [{"targets": targets}]
    home = Path(state.home)
    (home / "prometheus.yml").write_text(yaml.safe_dump(scrape, sort_keys=False), encoding="utf-8")
    address = f"{LOOPBACK}:{port}"
    process = state.launch("prometheus", [binary, f"--config.file={home / 'prometheus.yml'}",
                                          f"--storage.tsdb.path={home / 'prometheus'}", f"--web.listen-address={address}"],
                           dict(os.environ))
    state.urls["prometheus"] = f"http://{address}"
    wait_http(f"http://{address}/-/ready", process, timeout_s)
    state.save()
    return state.urls["prometheus"]


RAY_NODE_ENV = {"RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
"""Set for every `ray start` of ours: token auth on, and no drain on SIGTERM. Ray drains a node for up
to 30 s so that Serve can move its replicas elsewhere; our nodes are stopped all together, with
nowhere left to move to, so the wait would only delay ``down``."""


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
