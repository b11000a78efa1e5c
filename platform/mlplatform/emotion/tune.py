"""Hyper-parameter search for the emotion classifier: Ray Tune with ASHA, one MLflow parent run per study, resumable."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from mlplatform import storage
from mlplatform.cluster import connect_ray
from mlplatform.config import ConfigError, config_to_dict
from mlplatform.emotion.train import EmotionConfig, TrainingInputs, log_resumed, prepare_inputs, train_emotion_model
from mlplatform.emotion.trainer import best_model_folder, log_training_figures, score_checkpoint, served_teacher_share
from mlplatform.emotion.writers import provenance_tags

STUDY_FILE = "mlplatform-study.json"
"""Beside Tune's own files in a study's folder: the study's MLflow parent run, so a resumed study keeps logging to it."""
SEARCH_SPACE_DOC = "learning_rate log-uniform 1e-4..3e-3, batch_size 16/32/64, warmup_ratio 0..0.2, dropout 0..0.3"


@dataclasses.dataclass
class StudyResult:
    """The best trial of a study and how the study went."""

    best_config: dict[str, Any]
    best_dev_macro_f1: float
    test_metrics: dict[str, float]
    checkpoint: Path
    trials: int
    stopped_early: int
    seconds: float


def search_space() -> dict[str, Any]:
    """What ASHA explores around the base config."""
    from ray import tune

    return {
        "learning_rate": tune.loguniform(1e-4, 3e-3),
        "batch_size": tune.choice([16, 32, 64]),
        "warmup_ratio": tune.uniform(0.0, 0.2),
        "dropout": tune.uniform(0.0, 0.3),
    }


def _trial_run_id(config: dict[str, Any], trial_id: str) -> str | None:
    """The MLflow run a restarted trial already has, so it resumes instead of duplicating."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config["tracking_uri"])
    experiment = client.get_experiment_by_name(config["experiment_name"])
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`ray.trial_id` = '{trial_id}'")
    return runs[0].info.run_id if runs else None


def _tune_trial(config: dict[str, Any], inputs: TrainingInputs) -> None:
    """One trial: the shared training loop, reporting to Tune and to a nested MLflow run; a restarted trial resumes."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    tracker = None
    if config.get("mlflow_parent_run_id"):
        from mlplatform.mlops.tracking import ExperimentTracker

        tracker = ExperimentTracker(
            config["experiment_name"], tracking_uri=config["tracking_uri"], run_name=f"trial-{trial_id}",
            run_id=_trial_run_id(config, trial_id),
            tags={"mlflow.parentRunId": config["mlflow_parent_run_id"], "ray.trial_id": trial_id},
        )
        tracker.log_params({k: config[k] for k in search_space()})

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))
            tracker.flush()
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    restored = tune.get_checkpoint()  # a trial restarted after a lost node, or in a resumed study
    settings = {k: v for k, v in config.items() if k not in ("mlflow_parent_run_id", "tracking_uri")}
    try:
        with restored.as_directory() if restored else contextlib.nullcontext() as resume_from:
            if tracker is not None and resume_from is not None:
                log_resumed(tracker, resume_from)
            train_emotion_model(settings, inputs=inputs, report=report, resume_from=resume_from)
    finally:
        if tracker is not None:
            tracker.finish()


def latest_study(output_dir: str | Path) -> dict[str, str]:
    """The newest study under ``output_dir`` that can be resumed: its name and MLflow parent run.

    Raises:
        ConfigError: there is none.
    """
    output = storage.resolve(str(output_dir))
    for name in sorted(storage.list_folders(output), reverse=True):
        info = storage.join(output, name, STUDY_FILE)
        if storage.exists(info) and storage.exists(storage.join(output, name, "tuner.pkl")):
            return {"name": name, **json.loads(storage.read_bytes(info))}
    raise ConfigError(f"--resume found no study to continue in {output}")


def tune_emotion(
    config: EmotionConfig,
    tracker: Any | None = None,
    *,
    num_samples: int = 8,
    grace_period: int = 2,
    max_concurrent_trials: int | None = None,
    output_dir: str | Path = "runs/emotion-tune",
    resume: str | None = None,
) -> StudyResult:
    """Search learning rate, batch size, warmup and dropout with ASHA; each trial trains on one worker (``cpus_per_worker`` CPUs).

    Trials and their checkpoints live in ``<output_dir>/<study>``, a path or storage URI (a relative
    one goes under ``$MLPLATFORM_STORAGE``). A trial on a lost node restarts from its latest
    checkpoint, up to ``config.max_failures`` times; a study whose driver died continues with
    ``resume`` (``Tuner.restore``), finished trials kept, the rest resumed.

    Args:
        config: the base config; the searched fields override it per trial.
        tracker: the study's parent MLflow run; each trial logs a nested run under it.
        num_samples: trials to start.
        grace_period: epochs every trial gets before ASHA may stop it.
        max_concurrent_trials: trials running at once (None: as many as resources allow); one at
            a time makes a study repeatable, since ASHA then always compares the same results.
        output_dir: where Tune keeps the study.
        resume: the name of a study in ``output_dir`` to continue (see :func:`latest_study`).

    Returns:
        The best trial's config, dev and test metrics and checkpoint, and how many trials ASHA cut.
    """
    import ray
    from ray import tune

    started = time.perf_counter()
    connect_ray()
    output = storage.resolve(str(output_dir))
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    resources = {"cpu": config.cpus_per_worker, "gpu": gpus}
    inputs, teacher = prepare_inputs(config)
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, inputs=inputs), resources)
    if resume is not None:
        name, tuner = resume, tune.Tuner.restore(storage.join(output, resume), trainable, resume_errored=True)
    else:
        name = f"emotion-tune-{int(time.time())}"
        tuner = _new_study(config, tracker, trainable, name, output, num_samples, grace_period, max_concurrent_trials)
    results = tuner.fit()
    best = results.get_best_result(metric="best_dev_macro_f1", mode="max")
    folder = best_model_folder(best.get_best_checkpoint("dev_macro_f1", "max"), output, name,
                               provenance=inputs.provenance, config=config, teacher=teacher)
    test = score_checkpoint(folder, config, split="test")
    stopped = sum(r.metrics.get("epoch", 0) < config.epochs for r in results)
    searched = {k: best.config[k] for k in search_space()}
    if tracker is not None:
        if resume is None:
            tracker.log_params({f"best_{k}": v for k, v in searched.items()})
        tracker.log_metrics({"best_dev_macro_f1": best.metrics["best_dev_macro_f1"], "trials_stopped_early": stopped,
                             **{f"test_{k}": v for k, v in test.items()}, **inputs.teacher_metrics,
                             "teacher_share": served_teacher_share(folder)}, step=0)
        tracker.set_tags(provenance_tags(inputs.provenance))
        tracker.log_artifact(folder, artifact_path="model")
        log_training_figures(tracker, best.metrics_dataframe, folder, config)
    return StudyResult(searched, best.metrics["best_dev_macro_f1"], test, folder, len(results), stopped, time.perf_counter() - started)


def _new_study(config: EmotionConfig, tracker: Any | None, trainable: Any, name: str, output: str, num_samples: int,
               grace_period: int, max_concurrent_trials: int | None) -> Any:
    """A fresh Tuner, with the study's parent run recorded beside it for a later resume."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    # ASHA decides which trials stop, so per-trial early stopping is switched off.
    base = {**config_to_dict(config), "patience": config.epochs}
    study = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if tracker is not None:
        tracker.log_params({**config_to_dict(config), "search_space": SEARCH_SPACE_DOC, "num_samples": num_samples})
        from mlflow.tracking import MlflowClient

        # Nested runs live in the parent's experiment, whatever the config names.
        parent_experiment = MlflowClient(tracker.tracking_uri).get_experiment(tracker.experiment_id).name
        base |= {"mlflow_parent_run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri, "experiment_name": parent_experiment}
        study |= {"mlflow_run_id": tracker.run_id, "experiment_name": parent_experiment}
    storage.write_bytes(storage.join(output, name, STUDY_FILE), json.dumps(study).encode())
    scheduler = ASHAScheduler(max_t=config.epochs, grace_period=min(grace_period, config.epochs), reduction_factor=2)
    return tune.Tuner(
        trainable,
        param_space={**base, **search_space()},
        tune_config=tune.TuneConfig(
            metric="dev_macro_f1", mode="max", scheduler=scheduler, num_samples=num_samples,
            search_alg=BasicVariantGenerator(random_state=config.seed), max_concurrent_trials=max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=output, failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="dev_macro_f1",
                                                    checkpoint_score_order="max"),
        ),
    )
