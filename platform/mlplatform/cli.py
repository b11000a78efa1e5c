"""The `mlplatform` command line: train models and point at where their runs are tracked."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from mlplatform.cli_audit import audit_app
from mlplatform.cli_cluster import cluster_app, down_command, up_command
from mlplatform.cli_options import ConfigOption, SetOption, fail, load_run_config
from mlplatform.config import ConfigError

if TYPE_CHECKING:
    from mlplatform.mlops.tracking import ExperimentTracker

ResultT = TypeVar("ResultT")

app = typer.Typer(
    help="Train, track and serve models on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(help="Train a model; each run is logged to MLflow.", no_args_is_help=True)
app.add_typer(train_app, name="train")
tune_app = typer.Typer(help="Search hyper-parameters with Ray Tune; the study is one MLflow run.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")
predict_app = typer.Typer(help="Answer inputs with a trained model.", no_args_is_help=True)
app.add_typer(predict_app, name="predict")
models_app = typer.Typer(help="The model registry (MLflow's, in the same store as the runs).", no_args_is_help=True)
app.add_typer(models_app, name="models")
jobs_app = typer.Typer(help="Ray jobs on a cluster (Ray's Job SDK): submit, status, logs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")
app.add_typer(audit_app, name="audit")
app.command("up")(up_command)
app.command("down")(down_command)


def open_tracker(experiment_name: str, run_name: str, run_id: str | None = None) -> ExperimentTracker:
    """Start (or resume) an MLflow run on the default store, or exit with a one-line error."""
    from mlplatform.mlops.tracking import ExperimentTracker, TrackingError

    try:
        return ExperimentTracker(experiment_name, run_name=run_name, run_id=run_id)
    except TrackingError as e:
        fail(str(e))


EnvOption = Annotated[str | None, typer.Option("--env", help="Gymnasium environment id, e.g. CartPole-v1.")]
SeedOption = Annotated[int | None, typer.Option(help="Random seed.")]
StepsOption = Annotated[int | None, typer.Option(help="Environment steps to run.")]
TrackOption = Annotated[bool, typer.Option(help="Log the run to MLflow.")]
ProgressOption = Annotated[bool, typer.Option(help="Show a progress line.")]


def run_tracked(
    job: Callable[[ExperimentTracker | None], ResultT],
    *,
    track: bool,
    experiment_name: str,
    run_name: str,
    run_id: str | None = None,
    user_errors: tuple[type[Exception], ...] = (ConfigError,),
) -> tuple[ResultT, ExperimentTracker | None]:
    """Run ``job`` inside an MLflow run (or none); errors caused by the user's input exit in one line."""
    try:
        tracker = open_tracker(experiment_name, run_name, run_id) if track else None
        with tracker or contextlib.nullcontext():
            return job(tracker), tracker
    except user_errors as e:
        fail(str(e))


def report(config: Any, result: Any, tracker: ExperimentTracker | None) -> None:
    """Print how the run ended and where to look at it."""
    solved = f"solved at {result.solved_at_step} steps" if result.solved_at_step else "not solved"
    typer.echo(
        f"{config.env_id}: {solved}; final greedy return {result.final_eval_return:.1f} "
        f"after {result.env_steps} steps in {result.seconds:.1f}s"
    )
    typer.echo(f"checkpoint: {result.checkpoint}")
    if tracker is not None:
        typer.echo(tracker.ui_hint())


@train_app.command("dqn")
def train_dqn_command(
    env: EnvOption = None,
    config: ConfigOption = None,
    seed: SeedOption = None,
    total_steps: StepsOption = None,
    set_: SetOption = None,
    output_dir: Annotated[Path, typer.Option(help="Folder for the run's checkpoint.")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue the newest run of this env in --output-dir from its latest.pt.")] = False,
    track: TrackOption = True,
    progress: ProgressOption = True,
) -> None:
    """Train a Dueling Double DQN with prioritized replay in one process (CartPole by default)."""
    # Imported here, not at the top, so `--help` answers without loading torch and MLflow.
    from mlplatform.rl.agent import DQNConfig
    from mlplatform.rl.train import newest_resumable, train_dqn

    run_config = load_run_config(DQNConfig, config, set_, env_id=env, seed=seed, total_steps=total_steps)
    run_name, previous_run = f"{run_config.env_id}__dqn__{run_config.seed}__{int(time.time())}", None
    if resume:
        try:
            folder, saved = newest_resumable(output_dir, run_config.env_id)
        except ConfigError as e:
            fail(str(e))
        run_name, previous_run = str(folder.relative_to(output_dir)), saved.get("mlflow_run_id")
    result, tracker = run_tracked(
        lambda tracker: train_dqn(run_config, tracker, output_dir=output_dir / run_name, progress=progress, resume=resume),
        track=track, experiment_name=run_config.experiment_name, run_name=run_name, run_id=previous_run,
    )
    report(run_config, result, tracker)


@train_app.command("apex")
def train_apex_command(
    env: EnvOption = None,
    config: ConfigOption = None,
    seed: SeedOption = None,
    total_steps: StepsOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from <checkpoint_dir>/latest.pt, counters intact.")] = False,
    track: TrackOption = True,
    progress: ProgressOption = True,
) -> None:
    """Train Ape-X DQN on Ray: rollout workers, replay shards and one learner as actors.

    Connects to the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local one.
    """
    from mlplatform.rl.apex.config import ApexConfig
    from mlplatform.rl.apex.checkpoint import checkpoint_extra
    from mlplatform.rl.apex.driver import train_apex

    run_config = load_run_config(ApexConfig, config, set_, env_id=env, seed=seed, total_steps=total_steps)
    run_name = f"{run_config.env_id}__apex__{run_config.seed}__{int(time.time())}"
    try:
        previous_run = checkpoint_extra(run_config).get("mlflow_run_id") if resume else None
    except ConfigError as e:
        fail(str(e))

    def job(tracker: ExperimentTracker | None) -> Any:
        extra = {"mlflow_run_id": tracker.run_id} if tracker is not None else {}
        return train_apex(run_config, tracker, resume=resume, progress=progress, extra=extra)

    result, tracker = run_tracked(job, track=track, experiment_name=run_config.experiment_name, run_name=run_name, run_id=previous_run)
    report(run_config, result, tracker)
    typer.echo(
        f"learner updates: {result.updates} (resumed from {result.resumed_from_update}); "
        f"replaced workers: {result.workers_replaced}, shards: {result.shards_replaced} "
        f"({result.lost_transitions} transitions lost)"
    )


EmotionOutputOption = Annotated[Path, typer.Option(help="Folder for Ray's results and the best model.")]


def quiet_unless(progress: bool, config: Any) -> Any:
    """The emotion config, its progress lines switched off by ``--no-progress``."""
    return config if progress else dataclasses.replace(config, progress_interval_s=0.0)


@train_app.command("emotion")
def train_emotion_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    output_dir: EmotionOutputOption = Path("runs/emotion"),
    track: TrackOption = True,
    progress: ProgressOption = True,
) -> None:
    """Fine-tune the Japanese emotion classifier under Ray Train (bundled corpus and small BERT by default)."""
    from mlplatform.emotion.tokenizer import TokenizerSetupError
    from mlplatform.emotion.train import EmotionConfig
    from mlplatform.emotion.wordvectors import WordVectorsError
    from mlplatform.emotion.trainer import fit_emotion_model

    from mlplatform.storage import StorageError

    run_config = quiet_unless(progress, load_run_config(EmotionConfig, config, set_))
    result, tracker = run_tracked(
        lambda tracker: fit_emotion_model(run_config, tracker, output_dir=output_dir),
        track=track, experiment_name=run_config.experiment_name, run_name=f"emotion__{run_config.target}__{int(time.time())}",
        user_errors=(TokenizerSetupError, WordVectorsError, FileNotFoundError, ValueError, StorageError),
    )
    typer.echo(f"best dev macro-F1 {result.dev_metrics['macro_f1']:.3f} at epoch {result.best_epoch}; "
               f"test {', '.join(f'{k} {v:.3f}' for k, v in result.test_metrics.items())}; {result.seconds:.0f}s")
    typer.echo(f"model: {result.checkpoint}")
    if tracker is not None:
        typer.echo(tracker.ui_hint())


@train_app.command("federated")
def train_federated_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    seed: SeedOption = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds to run (in all, with --resume).")] = None,
    resume: Annotated[bool, typer.Option(help="Go on from <output_dir>/last_round.pt: weights, ε ledger, MLflow run.")] = False,
    track: TrackOption = True,
    progress: ProgressOption = True,
) -> None:
    """Federated training on Ray: virtual clients on an actor pool, FedAvg/FedProx/robust rules, optional DP-FedAvg.

    Connects to the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local one.
    """
    from mlplatform.federated.config import FederatedConfig

    run_config = load_run_config(FederatedConfig, config, set_, seed=seed, rounds=rounds)  # before torch and Ray load
    from mlplatform.emotion.tokenizer import TokenizerSetupError
    from mlplatform.federated.checkpoint import resumed_run_id
    from mlplatform.federated.simulation import run_federated
    from mlplatform.mlops.registry import RegistryError

    try:
        previous_run = resumed_run_id(run_config) if resume else None
    except ConfigError as e:
        fail(str(e))
    privacy = "dp" if run_config.dp else "nodp"
    result, tracker = run_tracked(
        lambda tracker: run_federated(run_config, tracker, progress=progress, resume=resume),
        track=track, experiment_name=run_config.experiment_name, run_id=previous_run,
        run_name=f"{run_config.task}__{run_config.strategy}__{privacy}__{run_config.seed}__{int(time.time())}",
        user_errors=(ConfigError, TokenizerSetupError, FileNotFoundError, RegistryError),
    )
    last = result.history[-1] if result.history and result.epsilon is None else None  # under DP, client counts stay private
    typer.echo(f"{result.rounds} rounds in {result.seconds:.1f}s; test accuracy {result.test_metrics['accuracy']:.3f}, "
               f"macro-F1 {result.test_metrics['macro_f1']:.3f}"
               + (f"; last round used {last.used} of {last.sampled} sampled clients" if last else ""))
    if result.epsilon is not None:
        stop = " (stopped: the next round would pass the target)" if result.stopped_by_budget else ""
        typer.echo(f"privacy: (ε = {result.epsilon:.3f}, δ = {run_config.delta:g}) with noise multiplier "
                   f"{result.noise_multiplier:.3f}, {run_config.accountant.upper()} accountant{stop}")
    if result.private_test_metrics:
        typer.echo(f"private writers' test (a measurement outside any guarantee): macro-F1 "
                   f"{result.private_test_metrics['macro_f1']:.3f}, from {result.private_test_metrics['start_macro_f1']:.3f} "
                   f"at the start; public test from {result.test_metrics['start_macro_f1']:.3f}")
    typer.echo(f"model: {result.model_dir}")
    if tracker is not None:
        typer.echo(tracker.ui_hint())


@tune_app.command("emotion")
def tune_emotion_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Trials to start.")] = 8,
    grace_period: Annotated[int, typer.Option(min=1, help="Epochs each trial gets before ASHA may stop it.")] = 2,
    output_dir: EmotionOutputOption = Path("runs/emotion-tune"),
    resume: Annotated[bool, typer.Option(help="Continue the newest study in --output-dir (its driver died or was stopped).")] = False,
    track: TrackOption = True,
    progress: ProgressOption = True,
) -> None:
    """Search learning rate, batch size, warmup and dropout with Ray Tune and ASHA."""
    from mlplatform.emotion.tokenizer import TokenizerSetupError
    from mlplatform.emotion.train import EmotionConfig
    from mlplatform.emotion.wordvectors import WordVectorsError
    from mlplatform.emotion.tune import latest_study, tune_emotion
    from mlplatform.storage import StorageError

    run_config = quiet_unless(progress, load_run_config(EmotionConfig, config, set_))
    try:
        previous = latest_study(output_dir) if resume else {}
    except (ConfigError, StorageError) as e:
        fail(str(e))
    study, tracker = run_tracked(
        lambda tracker: tune_emotion(run_config, tracker, num_samples=num_samples, grace_period=grace_period,
                                     output_dir=output_dir, resume=previous.get("name")),
        track=track, experiment_name=previous.get("experiment_name", run_config.experiment_name),
        run_name=f"emotion-study__{int(time.time())}", run_id=previous.get("mlflow_run_id"),
        user_errors=(TokenizerSetupError, WordVectorsError, FileNotFoundError, ValueError, StorageError),
    )
    if resume:
        typer.echo(f"resumed study {previous['name']}")
    typer.echo(f"{study.trials} trials, {study.stopped_early} stopped early by ASHA; best dev macro-F1 "
               f"{study.best_dev_macro_f1:.3f} with {study.best_config}")
    typer.echo(f"test {', '.join(f'{k} {v:.3f}' for k, v in study.test_metrics.items())}; {study.seconds:.0f}s")
    typer.echo(f"model: {study.checkpoint}")
    if tracker is not None:
        typer.echo(tracker.ui_hint())


@predict_app.command("emotion")
def predict_emotion_command(
    texts: Annotated[list[str], typer.Argument(help="One or more Japanese texts.")],
    model: Annotated[Path, typer.Option(help="Model folder written by `mlplatform train emotion`.")] = Path("runs/emotion/best"),
) -> None:
    """Print the strongest emotion and the eight scores for each text."""
    from mlplatform.emotion.labels import EMOTIONS_JA
    from mlplatform.emotion.predict import EmotionPredictor
    from mlplatform.emotion.tokenizer import TokenizerSetupError

    try:
        predictions = EmotionPredictor(model).predict(texts)
    except (TokenizerSetupError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    for text, prediction in zip(texts, predictions):
        typer.echo(f"{text}\n  -> {prediction.label} ({EMOTIONS_JA[prediction.label]})")
        for emotion, score in prediction.scores.items():
            typer.echo(f"     {emotion:<13}{EMOTIONS_JA[emotion]:<4} {score:.3f}")


def open_registry() -> Any:
    """The registry on the default store, or a one-line exit."""
    from mlplatform.mlops.registry import ModelRegistry, RegistryError

    try:
        return ModelRegistry()
    except RegistryError as e:
        fail(str(e))


def show_version(version: Any) -> None:
    """One line per version: name, number, aliases, kind and source run."""
    aliases = ", ".join(f"@{a}" for a in version.aliases) or "-"
    typer.echo(f"{version.name:<16} v{version.version:<4} {aliases:<24} {version.kind:<8} run {version.run_id}  {version.artifact_path}")


@models_app.command("list")
def models_list_command(name: Annotated[str | None, typer.Argument(help="Only this model's versions.")] = None) -> None:
    """List registered model versions, newest first, with their aliases."""
    from mlplatform.mlops.registry import RegistryError

    try:
        versions = open_registry().search_model_versions(name)
    except RegistryError as e:
        fail(str(e))
    for version in versions:
        show_version(version)
    if not versions:
        typer.echo("no registered models" if name is None else f"no versions of {name!r}")


@models_app.command("register")
def models_register_command(
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. emotion or cartpole.")],
    run_id: Annotated[str, typer.Option("--run-id", help="The MLflow run that produced the model.")],
    artifact_path: Annotated[str | None, typer.Option(help="The model inside the run's artifacts (found when omitted).")] = None,
    alias: Annotated[str | None, typer.Option(help="Point this alias at the new version, e.g. champion.")] = None,
    description: Annotated[str, typer.Option(help="Shown with the version.")] = "",
) -> None:
    """Register a run's model as a new version, loadable by Serve and by MLflow (`mlflow.pyfunc.load_model`)."""
    from mlplatform.mlops.registry import RegistryError
    from mlplatform.serving.pyfunc import register_servable

    registry = open_registry()
    try:
        version = register_servable(registry, name, run_id=run_id, artifact_path=artifact_path, description=description)
        if alias is not None:
            version = registry.set_alias(name, alias, version.version)
    except RegistryError as e:
        fail(str(e))
    show_version(version)


@models_app.command("promote")
def models_promote_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version number to promote.")],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "champion",
) -> None:
    """Move an alias (champion by default) to a version; deployments that follow the alias pick it up."""
    from mlplatform.mlops.registry import RegistryError

    try:
        show_version(open_registry().set_alias(name, alias, version))
    except RegistryError as e:
        fail(str(e))


@models_app.command("show")
def models_show_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    ref: Annotated[str, typer.Argument(help="Version number or alias.")] = "champion",
) -> None:
    """Show one version (by number or alias) with its metadata."""
    from mlplatform.mlops.registry import RegistryError

    try:
        version = open_registry().get_model_version(name, ref)
    except RegistryError as e:
        fail(str(e))
    show_version(version)
    for key, value in sorted(version.tags.items()):
        typer.echo(f"  {key}: {value}")
    if version.description:
        typer.echo(f"  {version.description}")


AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Dashboard address, e.g. http://127.0.0.1:8265; else RAY_API_SERVER_ADDRESS or RAY_ADDRESS."),
]


def job_client(address: str | None) -> Any:
    """Ray's Job SDK client (the token comes from RAY_AUTH_TOKEN), or a one-line exit."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        fail(f"cannot reach the Ray job API at {address or 'RAY_API_SERVER_ADDRESS/RAY_ADDRESS'}: {str(e).splitlines()[0]}")


@jobs_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def jobs_submit_command(
    context: typer.Context,
    script: Annotated[Path, typer.Argument(help="A job entrypoint, e.g. jobs/train_dqn.py; what follows -- goes to it.")],
    address: AddressOption = None,
    wait: Annotated[bool, typer.Option(help="Follow the logs until the job ends; exit 1 unless it SUCCEEDED.")] = False,
) -> None:
    """Submit a job with this folder as its working dir and this side's MLflow store, storage root and commit.

    Example: mlplatform jobs submit jobs/train_dqn.py -- --config jobs/configs/apex_cartpole.yaml
    """
    import shlex

    from mlplatform.mlops.tracking import TrackingError, tracking_env_vars
    from mlplatform.stack import job_runtime_env

    if not script.is_file():
        fail(f"no job entrypoint at {str(script)!r}")
    from mlplatform.storage import STORAGE_ENV, storage_root

    try:
        env_vars = tracking_env_vars()
    except TrackingError as e:
        fail(str(e))
    if root := storage_root():  # where relative checkpoint folders go; credentials stay with the nodes
        env_vars[STORAGE_ENV] = root
    client = job_client(address)
    entrypoint = shlex.join(["python", script.as_posix(), *context.args])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(env_vars))
    typer.echo(f"submitted {job_id}: {entrypoint}")
    if wait:
        status = follow_job(client, job_id)
        typer.echo(f"{job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(code=1)


def follow_job(client: Any, job_id: str) -> str:
    """Print a job's logs as they come until it ends; its final status."""
    import asyncio

    from mlplatform.stack import JOB_END_STATES

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            typer.echo(lines, nl=False)

    asyncio.run(tail())
    while (status := str(client.get_job_status(job_id).value)) not in JOB_END_STATES:
        time.sleep(1)
    return status


@jobs_app.command("status")
def jobs_status_command(job_id: Annotated[str, typer.Argument(help="The submission id.")], address: AddressOption = None) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    client = job_client(address)
    try:
        typer.echo(client.get_job_status(job_id).value)
    except RuntimeError as e:
        fail(f"job {job_id!r}: {str(e).splitlines()[0]}")


@jobs_app.command("logs")
def jobs_logs_command(
    job_id: Annotated[str, typer.Argument(help="The submission id.")],
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a job's logs."""
    client = job_client(address)
    try:
        if follow:
            follow_job(client, job_id)
        else:
            typer.echo(client.get_job_logs(job_id), nl=False)
    except RuntimeError as e:
        fail(f"job {job_id!r}: {str(e).splitlines()[0]}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mlplatform")


if __name__ == "__main__":
    sys.exit(main())
