"""Hyper-parameter search for the emotion classifier: Ray Tune with ASHA, one MLflow parent run per study."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from mlplatform.cluster import connect_ray
from mlplatform.config import config_to_dict
from mlplatform.emotion.train import EmotionConfig, prepare_tokenizer, score_checkpoint, train_emotion_model, with_absolute_paths

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


def _tune_trial(config: dict[str, Any]) -> None:
    """One trial: the shared training loop, reporting to Tune and to a nested MLflow run."""
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

    try:
        train_emotion_model(
            {k: v for k, v in config.items() if k not in ("mlflow_parent_run_id", "tracking_uri")}, report=report
        )
    finally:
        if tracker is not None:
            tracker.finish()


def tune_emotion(
    config: EmotionConfig,
    tracker: Any | None = None,
    *,
    num_samples: int = 8,
    grace_period: int = 2,
    max_concurrent_trials: int | None = None,
    output_dir: str | Path = "runs/emotion-tune",
) -> StudyResult:
    """Search learning rate, batch size, warmup and dropout with ASHA; each trial trains on one worker.

    Args:
        config: the base config; the searched fields override it per trial.
        tracker: the study's parent MLflow run; each trial logs a nested run under it.
        num_samples: trials to start.
        grace_period: epochs every trial gets before ASHA may stop it.
        max_concurrent_trials: trials running at once (None: as many as resources allow); one at
            a time makes a study repeatable, since ASHA then always compares the same results.
        output_dir: where Tune keeps trial checkpoints (made absolute).

    Returns:
        The best trial's config, dev and test metrics and checkpoint, and how many trials ASHA cut.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    started = time.perf_counter()
    connect_ray()
    config = with_absolute_paths(config)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # ASHA decides which trials stop, so per-trial early stopping is switched off.
    base = {**config_to_dict(config), "patience": config.epochs, "tokenizer_path": prepare_tokenizer(config)}
    if tracker is not None:
        tracker.log_params({**config_to_dict(config), "search_space": SEARCH_SPACE_DOC, "num_samples": num_samples})
        from mlflow.tracking import MlflowClient

        # Nested runs live in the parent's experiment, whatever the config names.
        parent_experiment = MlflowClient(tracker.tracking_uri).get_experiment(tracker.experiment_id).name
        base |= {"mlflow_parent_run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri, "experiment_name": parent_experiment}
    scheduler = ASHAScheduler(max_t=config.epochs, grace_period=min(grace_period, config.epochs), reduction_factor=2)
    tuner = tune.Tuner(
        tune.with_resources(_tune_trial, {"cpu": 1, "gpu": gpus}),
        param_space={**base, **search_space()},
        tune_config=tune.TuneConfig(
            metric="dev_macro_f1", mode="max", scheduler=scheduler, num_samples=num_samples,
            search_alg=BasicVariantGenerator(random_state=config.seed), max_concurrent_trials=max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=f"emotion-tune-{int(time.time())}", storage_path=str(Path(output_dir).expanduser().resolve())),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="best_dev_macro_f1", mode="max")
    folder = Path(best.get_best_checkpoint("dev_macro_f1", "max").to_directory(str(Path(output_dir).resolve() / "best")))
    test = score_checkpoint(folder, config, split="test")
    stopped = sum(r.metrics.get("epoch", 0) < config.epochs for r in results)
    searched = {k: best.config[k] for k in search_space()}
    if tracker is not None:
        tracker.log_params({f"best_{k}": v for k, v in searched.items()})
        tracker.log_metrics({"best_dev_macro_f1": best.metrics["best_dev_macro_f1"], "trials_stopped_early": stopped,
                             **{f"test_{k}": v for k, v in test.items()}}, step=0)
        tracker.log_artifact(folder, artifact_path="model")
    return StudyResult(searched, best.metrics["best_dev_macro_f1"], test, folder, len(results), stopped, time.perf_counter() - started)
