"""The local platform behind `mlplatform up` and `down`: the cluster of :mod:`mlplatform.localcluster`, the pipeline as Ray jobs, Serve."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic.dataclasses import dataclass

from mlplatform import localcluster
from mlplatform.config import RUN_CONFIG, read_yaml_mapping
from mlplatform.localcluster import ClusterConfig, ClusterState
from mlplatform.services import BIN, LOOPBACK, ServiceError, check_running

JOB_EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlruns.db*", "bench/.peers", "**/__pycache__"]
JOB_END_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
SAMPLE_TEXT = "明日は友達と旅行に行くので楽しみ"

Echo = Callable[[str], None]


class StackError(ServiceError):
    """The stack cannot start or a step of its pipeline failed; the message says which and where to look."""


@dataclass(config=RUN_CONFIG)
class StackConfig(ClusterConfig):
    """What `mlplatform up` starts and runs; every field can be set from YAML or ``--set key=value``.

    The cluster fields (ports, CPUs, ``workers``) are :class:`~mlplatform.localcluster.ClusterConfig`'s;
    the demo runs on the head alone unless ``workers`` asks for isolated worker nodes.
    """

    home: str = "runs/stack"
    """Folder for the stack's state file, logs, outputs, the MLflow store's artifacts and the Serve config it deployed (made absolute)."""
    workers: int = pydantic.Field(0, ge=0)
    """Worker nodes beside the head, each in its own mount namespace (then checkpoints go to the S3 API server)."""
    serve_port: int = pydantic.Field(8000, ge=1, le=65535)
    """Ray Serve's HTTP proxy, on loopback."""
    apex_config: str = "jobs/configs/apex_cartpole.yaml"
    """Ape-X DQN job config."""
    apex: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fields set on top of apex_config."""
    tune_config: str = "jobs/configs/emotion_tune.yaml"
    """Emotion Tune search base config."""
    tune: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epochs": 4, "cpus_per_worker": 1})
    """Fields set on top of tune_config: a short search by default (an epoch is the labelled texts and the teacher-labelled unlabelled corpus), its trials side by side on one CPU each."""
    tune_samples: int = pydantic.Field(2, ge=1)
    """Trials of the emotion search."""
    tune_grace_period: int = pydantic.Field(2, ge=1)
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

    def ports(self) -> dict[str, int]:
        return super().ports() | {"serve_port": self.serve_port}


@dataclasses.dataclass
class StackState(ClusterState):
    """The cluster plus what the pipeline did: each job's id, status and log, and each model's registered version."""

    jobs: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    STATE_FILE = "stack.json"
    STOP_COMMAND = "mlplatform down"


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
    """Ape-X on CartPole, the emotion search, then DP federated fine-tuning of the model the search registered.

    The Tune study goes to the stack's folder on one node; with worker nodes it goes under the S3
    server's ``MLPLATFORM_STORAGE`` (a relative folder), since trials on other nodes must reach it.
    """
    tune_output = "stack/emotion-tune" if config.wants_s3() else str(home / "emotion-tune")
    return [
        PipelineJob(config.policy_name, "jobs/train_dqn.py",
                    ["--config", config.apex_config, "--no-progress",
                     *settings({"checkpoint_dir": str(home / "checkpoints" / "apex"), **config.apex})],
                    "Ape-X DQN", ("eval/mean_return",)),
        PipelineJob(config.emotion_name, "jobs/tune_emotion.py",
                    ["--config", config.tune_config, "--num-samples", str(config.tune_samples),
                     "--grace-period", str(config.tune_grace_period), "--output-dir", tune_output,
                     *settings({"writers": "public", **config.tune})],  # so that DP fine-tuning protects the private
                    "emotion classifier, best of a Tune search", ("test_macro_f1", "teacher_test_macro_f1")),
        PipelineJob(config.private_name, "jobs/train_federated.py",
                    ["--config", config.federated_config, "--no-progress",
                     *settings({"model": f"models:/{config.emotion_name}@{config.alias}",
                                "output_dir": str(home / "emotion-dp"), **config.federated})],
                    "emotion classifier fine-tuned by writer with DP-FedAvg",
                    ("test/macro_f1", "test/start_macro_f1", "test_private/macro_f1", "test_private/start_macro_f1",
                     "privacy/epsilon")),
    ]


def up(config: StackConfig, echo: Echo) -> StackState:
    """Start the cluster (MLflow server, Prometheus, a Ray head, any worker nodes); run the pipeline as Ray jobs; serve its models.

    Raises:
        StackError: not run from the repository root, or a job that does not succeed.
        ServiceError: already up, a port taken, or a service that does not come up.
    """
    started = time.monotonic()
    home = Path(config.home).resolve()
    _check_can_start(config)
    state = localcluster.up(config, echo, state_class=StackState)

    from ray.job_submission import JobSubmissionClient

    # Ray logs each file it leaves out of a job's upload, and that .git and .venv are left out by default
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    client = JobSubmissionClient(state.urls["dashboard"])
    from mlplatform.mlops.tracking import tracking_env_vars

    env_vars = {**tracking_env_vars(), **state.env}
    for job in pipeline(config, home):
        _run_and_register(client, job, env_vars, config, state, echo)
    _audit_privacy(config, echo)
    _deploy_serve(state, config, state.env["MLFLOW_TRACKING_URI"], echo)
    echo(f"up in {time.monotonic() - started:.0f}s")
    return state


def down(home: str | Path, echo: Echo) -> list[str]:
    """Stop what `up` started from ``home`` (Ray nodes, and with them Serve and the jobs; MLflow; Prometheus).

    Returns:
        The names of the services that were running and are now stopped.
    """
    return localcluster.down(home, echo, state_class=StackState)


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


def _check_can_start(config: StackConfig) -> None:
    if not (Path("jobs").is_dir() and Path(config.serve_config).is_file()):
        raise StackError(f"run `mlplatform up` from the repository root (no jobs/ or {config.serve_config} in {Path.cwd()})")
    for field in ("apex_config", "tune_config", "federated_config"):
        read_yaml_mapping(getattr(config, field))  # a missing or broken file fails here, not minutes later in a job


def _run_and_register(client: Any, job: PipelineJob, env_vars: dict[str, str], config: StackConfig, state: StackState,
                      echo: Echo) -> None:
    """Submit ``job``, follow it to the end, keep its logs, and register its run's model with the alias."""
    from mlplatform.mlops.registry import ModelRegistry
    from mlplatform.mlops.tracking import job_runs
    from mlplatform.serving.pyfunc import register_servable

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
    version = register_servable(registry, job.model_name, run_id=runs[-1], description=f"{job.summary}; Ray job {submission_id}",
                                tags={"ray.job_submission_id": submission_id, **metrics})
    registry.set_alias(job.model_name, config.alias, version.version)
    shown = ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
    state.models[job.model_name] = f"v{version.version} @{config.alias}  {shown}  (run {version.run_id})"
    state.save()
    echo(f"{job.model_name}: registered v{version.version} @{config.alias}")


def _audit_privacy(config: StackConfig, echo: Echo) -> None:
    """Measure a lower bound on the DP job's ε per round (`mlplatform audit dp`) and show it beside the accounted one."""
    from mlplatform.config import load_config
    from mlplatform.federated.audit import audit_config
    from mlplatform.federated.config import FederatedConfig

    federated = load_config(FederatedConfig, config.federated_config, config.federated)
    if not federated.dp:
        echo(f"{config.private_name}: trained without DP (dp: false), so there is no privacy claim to audit")
        return
    _, result = audit_config(federated)
    echo(f"{config.private_name}: privacy audit of its DP-FedAvg round: ε ≥ {result.epsilon_lower_bound:.2f} measured "
         f"({result.trials:,} rounds with and without a canary writer), {result.epsilon_accounted:.2f} accounted"
         + (": VIOLATION" if result.violation else ""))


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
    ray_head = state.process("ray")
    deadline = time.monotonic() + config.ready_timeout_s
    expected = {config.private_name, config.emotion_name, config.policy_name}
    while (served := _served_models(serve)) != expected:
        check_running(ray_head, deadline, f"the Serve app (serving {sorted(served)} of {sorted(expected)})")
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
