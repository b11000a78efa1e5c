"""Background services on this machine, each recorded by pid and start time so that exactly they are stopped.

`mlplatform up` and `mlplatform cluster local up` are built from these and from the Ray nodes of
:mod:`mlplatform.raynodes`: an MLflow tracking server that proxies artifacts, an S3 API server and
Prometheus. Services listen on 127.0.0.1; Ray's own gRPC ports follow the node's address (see README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
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


def start_prometheus(state: ServiceState, *, port: int, targets: list[str], timeout_s: float,
                     scrape_interval_s: float | None = None) -> str:
    """Prometheus with the shipped scrape config and alert rules (``cluster/prometheus.yml``), aimed at ``targets``.

    Returns:
        Its URL.
    """
    import yaml

    from mlplatform.config import read_yaml_mapping

    binary = shutil.which("prometheus")
    if binary is None:
        raise ServiceError("prometheus is not on PATH")
    shipped = Path("cluster/prometheus.yml").resolve()
    scrape = read_yaml_mapping(shipped)
    for job in scrape["scrape_configs"]:
        job.pop("file_sd_configs", None)
        job["static_configs"] = [{"targets": targets}]
    scrape["rule_files"] = [str(shipped.parent / rules) for rules in scrape.get("rule_files", [])]  # from beside the copy
    if scrape_interval_s is not None:
        scrape["global"]["scrape_interval"] = f"{scrape_interval_s}s"
    home = Path(state.home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "prometheus.yml").write_text(yaml.safe_dump(scrape, sort_keys=False), encoding="utf-8")
    address = f"{LOOPBACK}:{port}"
    process = state.launch("prometheus", [binary, f"--config.file={home / 'prometheus.yml'}",
                                          f"--storage.tsdb.path={home / 'prometheus'}", f"--web.listen-address={address}"],
                           dict(os.environ))
    state.urls["prometheus"] = f"http://{address}"
    wait_http(f"http://{address}/-/ready", process, timeout_s)
    state.save()
    return state.urls["prometheus"]
