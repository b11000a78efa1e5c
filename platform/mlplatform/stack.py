"""The local platform behind `mlplatform up` and `down`: Ray head, MLflow UI, Prometheus, the pipeline as Ray jobs, Serve."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pydantic
import yaml
from pydantic.dataclasses import dataclass

from mlplatform.config import RUN_CONFIG, read_yaml_mapping

JOB_EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlruns.db*", "bench/.peers", "**/__pycache__"]
JOB_END_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
SAMPLE_TEXT = "明日は友達と旅行に行くので楽しみ"
LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent

Echo = Callable[[str], None]


class StackError(RuntimeError):
    """The stack cannot start or a step of its pipeline failed; the message says which and where to look."""


@dataclass(config=RUN_CONFIG)
class StackConfig:
    """What `mlplatform up` starts and runs; every field can be set from YAML or ``--set key=value``."""

    home: str = "runs/stack"
    """Folder for the stack's state file, logs, outputs and the Serve config it deployed (made absolute)."""
    num_cpus: int | None = pydantic.Field(None, ge=1)
    """CPUs the Ray head offers to jobs and replicas; None offers every core."""
    ray_port: int = pydantic.Field(6379, ge=1, le=65535)
    """The head's GCS port (the address workers and `ray.init` join)."""
    dashboard_port: int = pydantic.Field(8265, ge=1, le=65535)
    """Ray dashboard and job API, on loopback."""
    metrics_port: int = pydantic.Field(8080, ge=1, le=65535)
    """Where the head exports Prometheus metrics (Ray's and the models')."""
    serve_port: int = pydantic.Field(8000, ge=1, le=65535)
    """Ray Serve's HTTP proxy, on loopback."""
    mlflow_port: int = pydantic.Field(5000, ge=1, le=65535)
    """MLflow UI, on loopback (started when the store is a local SQLite file)."""
    prometheus_port: int = pydantic.Field(9090, ge=1, le=65535)
    """Prometheus, on loopback (started when a `prometheus` binary is on PATH)."""
    apex_config: str = "jobs/configs/apex_cartpole.yaml"
    """Ape-X DQN job config."""
    apex: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fields set on top of apex_config."""
    tune_config: str = "jobs/configs/emotion_tune.yaml"
    """Emotion Tune search base config."""
    tune: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epochs": 12})
    """Fields set on top of tune_config: a short search by default."""
    tune_samples: int = pydantic.Field(4, ge=1)
    """Trials of the emotion search."""
    tune_grace_period: int = pydantic.Field(3, ge=1)
    """Epochs each trial gets before ASHA may stop it."""
    federated_config: str = "jobs/configs/federated_emotion_dp.yaml"
    """DP federated fine-tuning config; its starting model is the emotion model the search registered."""
    federated: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fields set on top of federated_config."""
    serve_config: str = "serve/config.yaml"
    """The Serve app deployed at the end, pointed at this stack's store, port and models."""
    model_cpus: float = pydantic.Field(0.5, gt=0.0)
    """CPUs reserved per model replica, so three models fit a two-core laptop."""
    policy_name: str = "cartpole"
    """Registered name of the Ape-X policy."""
    emotion_name: str = "emotion"
    """Registered name of the emotion model the search found."""
    private_name: str = "emotion-dp"
    """Registered name of the emotion model fine-tuned across writers under differential privacy."""
    alias: str = "champion"
    """Alias set on each new version, which the Serve app follows."""
    job_timeout_s: float = pydantic.Field(1800.0, gt=0.0)
    """Seconds a pipeline job may run before the stack gives up on it."""
    ready_timeout_s: float = pydantic.Field(300.0, gt=0.0)
    """Seconds each service (and the Serve app) gets to answer."""


@dataclasses.dataclass
class ManagedProcess:
    """A background service the stack started, identified by pid and start time (a reused pid is not ours)."""

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
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)


@dataclasses.dataclass
class StackState:
    """What is running and where, saved as ``<home>/stack.json`` after every step so `down` can stop a half-started stack."""

    home: str
    processes: list[ManagedProcess] = dataclasses.field(default_factory=list)
    urls: dict[str, str] = dataclasses.field(default_factory=dict)
    jobs: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    models: dict[str, str] = dataclasses.field(default_factory=dict)

    @staticmethod
    def path(home: str | Path) -> Path:
        return Path(home).resolve() / "stack.json"

    @classmethod
    def load(cls, home: str | Path) -> StackState | None:
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


@dataclasses.dataclass(frozen=True)
class PipelineJob:
    """One step of the pipeline: a job entrypoint and its arguments, and the name its model is registered under."""

    model_name: str
    script: str
    arguments: list[str]
    summary: str
    headline: tuple[str, ...]
    """The run's metrics shown beside the model and kept as tags of its version."""

    @property
    def entrypoint(self) -> str:
        return shlex.join(["python", self.script, *self.arguments])


def job_runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    """This folder as the job's working dir (without local runs and environments) and ``env_vars``."""
    return {"working_dir": ".", "excludes": JOB_EXCLUDES, "env_vars": env_vars}


def settings(overrides: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments; values as JSON, which the config loader reads as YAML."""
    return [item for key, value in overrides.items() for item in ("--set", f"{key}={json.dumps(value, ensure_ascii=False)}")]


def pipeline(config: StackConfig, home: Path) -> list[PipelineJob]:
    """Ape-X on CartPole, the emotion search, then DP federated fine-tuning of the model the search registered."""
    return [
        PipelineJob(config.policy_name, "jobs/train_dqn.py",
                    ["--config", config.apex_config, "--no-progress",
                     *settings({"checkpoint_dir": str(home / "checkpoints" / "apex"), **config.apex})],
                    "Ape-X DQN", ("eval/mean_return",)),
        PipelineJob(config.emotion_name, "jobs/tune_emotion.py",
                    ["--config", config.tune_config, "--num-samples", str(config.tune_samples),
                     "--grace-period", str(config.tune_grace_period), "--output-dir", str(home / "emotion-tune"),
                     *settings(config.tune)],
                    "emotion classifier, best of a Tune search", ("test_macro_f1",)),
        PipelineJob(config.private_name, "jobs/train_federated.py",
                    ["--config", config.federated_config, "--no-progress",
                     *settings({"model": f"models:/{config.emotion_name}@{config.alias}",
                                "output_dir": str(home / "emotion-dp"), **config.federated})],
                    "emotion classifier fine-tuned by writer with DP-FedAvg", ("test/macro_f1", "privacy/epsilon")),
    ]


def up(config: StackConfig, echo: Echo) -> StackState:
    """Start Prometheus, the MLflow UI and a Ray head; run the pipeline as Ray jobs; register and serve its models.

    Raises:
        StackError: not run from the repository root, already up, a port taken, a service that does
            not come up, or a job that does not succeed.
    """
    from mlplatform.mlops.tracking import default_tracking_uri, tracking_env_vars

    started = time.monotonic()
    home = Path(config.home).resolve()
    _check_can_start(config, home)
    tracking_uri = default_tracking_uri()
    state = StackState(str(home))
    state.save()
    os.environ["RAY_AUTH_MODE"] = "token"  # before any Ray client is made in this process
    _ensure_token()

    head_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": tracking_uri}
    if prometheus := shutil.which("prometheus"):
        _start_prometheus(state, config, prometheus, echo)
        head_env["RAY_PROMETHEUS_HOST"] = state.urls["prometheus"]
    else:
        echo(f"prometheus not on PATH: metrics stay at http://{LOOPBACK}:{config.metrics_port}/metrics for your own server")
    if tracking_uri.startswith("sqlite:"):  # a server store has its own UI
        _start_mlflow_ui(state, config, tracking_uri, echo)
    else:
        state.urls["mlflow"] = tracking_uri
    _start_ray_head(state, config, head_env, echo)

    from ray.job_submission import JobSubmissionClient

    # Ray logs each file it leaves out of a job's upload, and that .git and .venv are left out by default
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    client = JobSubmissionClient(state.urls["dashboard"])
    env_vars = tracking_env_vars()
    for job in pipeline(config, home):
        _run_and_register(client, job, env_vars, config, state, echo)
    _deploy_serve(state, config, tracking_uri, echo)
    echo(f"up in {time.monotonic() - started:.0f}s")
    return state


def down(home: str | Path, echo: Echo) -> list[str]:
    """Stop what `up` started from ``home`` (Ray head, and with it Serve and the jobs; MLflow UI; Prometheus).

    Returns:
        The names of the services that were running and are now stopped.
    """
    state = StackState.load(home)
    if state is None:
        return []
    stopped = []
    for process in reversed(state.processes):
        if process.alive():
            echo(f"stopping {process.name} (pid {process.pid})")
            process.stop()
            stopped.append(process.name)
    StackState.path(home).unlink()
    return stopped


def summary(state: StackState, config: StackConfig) -> list[str]:
    """What to open and what to try, for a person at the terminal."""
    serve = state.urls["serve"]
    lines = [
        f"Ray dashboard  {state.urls['dashboard']}   (sign in with the token from `{BIN / 'ray'} get-auth-token`)",
        f"MLflow         {state.urls['mlflow']}",
    ]
    if "prometheus" in state.urls:
        lines.append(f"Prometheus     {state.urls['prometheus']}   (try model_requests_total)")
    lines += [
        f"Serve API      {serve}/docs",
        "models:",
        *(f"  {name:<12} {version}" for name, version in state.models.items()),
        "try:",
        f"  curl -s -X POST {serve}/v1/emotion/{config.private_name} -H 'Content-Type: application/json' "
        f"-d '{{\"text\": \"{SAMPLE_TEXT}\"}}'",
        f"  curl -s -X POST {serve}/v1/policy/{config.policy_name} -H 'Content-Type: application/json' "
        "-d '{\"observation\": [0.0, 0.1, 0.0, -0.1]}'",
        f"submit jobs from any shell: export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS={state.urls['dashboard']}",
        f"stop everything: {BIN / 'mlplatform'} down" + ("" if config.home == "runs/stack" else f" --home {config.home}"),
    ]
    return lines


def _check_can_start(config: StackConfig, home: Path) -> None:
    if not (Path("jobs").is_dir() and Path(config.serve_config).is_file()):
        raise StackError(f"run `mlplatform up` from the repository root (no jobs/ or {config.serve_config} in {Path.cwd()})")
    for field in ("apex_config", "tune_config", "federated_config"):
        read_yaml_mapping(getattr(config, field))  # a missing or broken file fails here, not minutes later in a job
    previous = StackState.load(home)
    if previous is not None and any(p.alive() for p in previous.processes):
        raise StackError(f"the stack in {home} is already up; stop it with `mlplatform down` first")
    for field in ("ray_port", "dashboard_port", "metrics_port", "serve_port", "mlflow_port", "prometheus_port"):
        port = getattr(config, field)
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                raise StackError(f"port {port} ({field}) is in use on {LOOPBACK}; free it or set {field} to another port")


def _ensure_token() -> None:
    """Ray's token authentication stays on: reuse RAY_AUTH_TOKEN or ~/.ray/auth_token, else let Ray generate the file."""
    if not os.environ.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)


def _start_prometheus(state: StackState, config: StackConfig, binary: str, echo: Echo) -> None:
    """Prometheus with the shipped scrape config, aimed at this head's metrics port."""
    scrape = read_yaml_mapping("cluster/prometheus.yml")
    for job in scrape["scrape_configs"]:
        job.pop("file_sd_configs", None)
        job["static_configs"] = [{"targets": [f"{LOOPBACK}:{config.metrics_port}"]}]
    home = Path(state.home)
    (home / "prometheus.yml").write_text(yaml.safe_dump(scrape, sort_keys=False), encoding="utf-8")
    address = f"{LOOPBACK}:{config.prometheus_port}"
    process = state.launch("prometheus", [binary, f"--config.file={home / 'prometheus.yml'}",
                                          f"--storage.tsdb.path={home / 'prometheus'}", f"--web.listen-address={address}"],
                           dict(os.environ))
    state.urls["prometheus"] = f"http://{address}"
    _wait_http(f"http://{address}/-/ready", process, config.ready_timeout_s)
    state.save()
    echo(f"prometheus up at http://{address}")


def _start_mlflow_ui(state: StackState, config: StackConfig, tracking_uri: str, echo: Echo) -> None:
    """One uvicorn worker and no MLflow job runner: a laptop's two cores are for training."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = state.launch("mlflow", [str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking_uri, "--host", LOOPBACK,
                                      "--port", str(config.mlflow_port), "--workers", "1"], env)
    state.urls["mlflow"] = f"http://{LOOPBACK}:{config.mlflow_port}"
    _wait_http(f"{state.urls['mlflow']}/health", process, config.ready_timeout_s)
    state.save()
    echo(f"mlflow ui up at {state.urls['mlflow']} ({tracking_uri})")


def _start_ray_head(state: StackState, config: StackConfig, env: dict[str, str], echo: Echo) -> None:
    """`ray start --head --block`, dashboard on loopback, token auth on; ready once its job API takes a job."""
    from ray.job_submission import JobSubmissionClient

    argv = [str(BIN / "ray"), "start", "--head", "--block", f"--port={config.ray_port}",
            f"--dashboard-host={LOOPBACK}", f"--dashboard-port={config.dashboard_port}",
            f"--metrics-export-port={config.metrics_port}", "--disable-usage-stats"]
    if config.num_cpus is not None:
        argv.append(f"--num-cpus={config.num_cpus}")
    process = state.launch("ray", argv, env)
    dashboard = f"http://{LOOPBACK}:{config.dashboard_port}"
    state.urls["dashboard"] = dashboard
    state.save()
    deadline = time.monotonic() + config.ready_timeout_s
    while True:  # the job API answers a few seconds before its agent takes jobs
        _check_running(process, deadline, "the Ray head")
        try:
            probe = JobSubmissionClient(dashboard).submit_job(entrypoint="python -c pass")
            break
        except (OSError, RuntimeError):  # refused, or "No available agent to submit job"
            time.sleep(2)
    echo(f"ray head up: dashboard {dashboard}, jobs probed with {probe}")


def _run_and_register(client: Any, job: PipelineJob, env_vars: dict[str, str], config: StackConfig, state: StackState,
                      echo: Echo) -> None:
    """Submit ``job``, follow it to the end, keep its logs, and register its run's model with the alias."""
    from mlplatform.mlops.registry import ModelRegistry
    from mlplatform.mlops.tracking import job_runs

    submission_id = client.submit_job(entrypoint=job.entrypoint, runtime_env=job_runtime_env(env_vars))
    echo(f"{job.model_name}: submitted {submission_id}: {job.entrypoint}")
    started = time.monotonic()
    while (status := str(client.get_job_status(submission_id).value)) not in JOB_END_STATES:
        if time.monotonic() - started > config.job_timeout_s:
            client.stop_job(submission_id)
            status = "TIMED OUT"
            break
        time.sleep(2)
    log = Path(state.home) / "logs" / f"job-{job.model_name}.log"
    log.write_text(client.get_job_logs(submission_id), encoding="utf-8")
    state.jobs[job.model_name] = {"submission_id": submission_id, "status": status, "log": str(log)}
    state.save()
    echo(f"{job.model_name}: {status} in {time.monotonic() - started:.0f}s (log: {log})")
    if status != "SUCCEEDED":
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-20:])
        raise StackError(f"job {submission_id} ({job.summary}) ended {status}; the end of its log:\n{tail}")
    store = env_vars["MLFLOW_TRACKING_URI"]
    runs = job_runs(submission_id, store)
    if not runs:
        raise StackError(f"job {submission_id} ({job.summary}) logged no MLflow run to {store}")
    registry = ModelRegistry(store)
    logged = registry.run_metrics(runs[-1])
    metrics = {name: logged[name] for name in job.headline if name in logged}
    version = registry.register_model(job.model_name, run_id=runs[-1], description=f"{job.summary}; Ray job {submission_id}",
                                      tags={"ray.job_submission_id": submission_id, **metrics})
    registry.set_alias(job.model_name, config.alias, version.version)
    shown = ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
    state.models[job.model_name] = f"v{version.version} @{config.alias}  {shown}  (run {version.run_id})"
    state.save()
    echo(f"{job.model_name}: registered v{version.version} @{config.alias}")


def serve_app_config(config: StackConfig, tracking_uri: str) -> dict[str, Any]:
    """The shipped Serve config, pointed at this stack's store, port and three models (one deployment per model)."""
    app_config = read_yaml_mapping(config.serve_config)
    app_config["http_options"] = {**app_config.get("http_options", {}), "host": LOOPBACK, "port": config.serve_port}
    app = app_config["applications"][0]
    app.setdefault("runtime_env", {}).setdefault("env_vars", {})["MLFLOW_TRACKING_URI"] = tracking_uri
    app["args"] = {**app.get("args", {}), "emotion_models": [config.private_name, config.emotion_name],
                   "policies": [config.policy_name], "ref": config.alias}
    templates = {kind: next(d for d in app["deployments"] if d["name"].startswith(f"{kind}-")) for kind in ("Emotion", "Policy")}
    models = [("Emotion", config.private_name), ("Emotion", config.emotion_name), ("Policy", config.policy_name)]
    app["deployments"] = [d for d in app["deployments"] if d not in templates.values()] + [
        {**copy.deepcopy(templates[kind]), "name": f"{kind}-{name}",
         "ray_actor_options": {**templates[kind].get("ray_actor_options", {}), "num_cpus": config.model_cpus}}
        for kind, name in models
    ]
    for deployment in app["deployments"]:
        if "autoscaling_config" in deployment:  # one replica each on a laptop
            deployment["autoscaling_config"] |= {"min_replicas": 1, "max_replicas": 1}
    return app_config


def _deploy_serve(state: StackState, config: StackConfig, tracking_uri: str, echo: Echo) -> None:
    """Deploy the Serve app through the dashboard (as `serve deploy` does) and wait until every model answers."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    app_config = serve_app_config(config, tracking_uri)
    deployed = Path(state.home) / "serve.yaml"
    deployed.write_text(yaml.safe_dump(app_config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    ServeSubmissionClient(state.urls["dashboard"]).deploy_applications(app_config)
    serve = f"http://{LOOPBACK}:{config.serve_port}"
    state.urls["serve"] = serve
    state.save()
    echo(f"serve: deployed {deployed}; waiting for {serve}")
    ray_head = next(p for p in state.processes if p.name == "ray")
    deadline = time.monotonic() + config.ready_timeout_s
    expected = {config.private_name, config.emotion_name, config.policy_name}
    while (served := _served_models(serve)) != expected:
        _check_running(ray_head, deadline, f"the Serve app (serving {sorted(served)} of {sorted(expected)})")
        time.sleep(2)
    for name in (config.private_name, config.emotion_name):
        answer = _post(f"{serve}/v1/emotion/{name}", {"text": SAMPLE_TEXT})
        echo(f"serve: /v1/emotion/{name} v{answer['version']} says {answer['predictions'][0]['label']} for {SAMPLE_TEXT!r}")
    answer = _post(f"{serve}/v1/policy/{config.policy_name}", {"observation": [0.0, 0.1, 0.0, -0.1]})
    echo(f"serve: /v1/policy/{config.policy_name} v{answer['version']} acts {answer['action']}")


def _served_models(serve: str) -> set[str]:
    try:
        with urllib.request.urlopen(f"{serve}/v1/models", timeout=10) as response:
            return {m["name"] for m in json.loads(response.read())["models"]}
    except (OSError, ValueError, KeyError):  # refused, 404 or 503 while the app comes up
        return set()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise StackError(f"POST {url} answered {e.code}: {e.read()[:300]!r}") from e


def _wait_http(url: str, process: ManagedProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        _check_running(process, deadline, process.name)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)


def _check_running(process: ManagedProcess, deadline: float, what: str) -> None:
    if not process.alive():
        raise StackError(f"{process.name} exited; see {process.log}")
    if time.monotonic() > deadline:
        raise StackError(f"{what} did not come up in time; see {process.log}")
