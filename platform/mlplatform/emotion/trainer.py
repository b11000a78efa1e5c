"""Emotion training under Ray Train: the launcher (``fit_emotion_model``), its per-worker entry, and the checkpoints it resumes from."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlplatform import storage
from mlplatform.cluster import connect_ray
from mlplatform.config import config_to_dict
from mlplatform.emotion.data import EmotionCollator, EmotionDataset
from mlplatform.emotion.evaluation import dominant_metrics, evaluate
from mlplatform.emotion.labels import EMOTIONS
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.emotion.teacher import NgramTeacher
from mlplatform.emotion.tokenizer import load_tokenizer
from mlplatform.emotion.writers import provenance_tags, save_provenance
from mlplatform.emotion.train import (
    TRAINER_STATE, EmotionConfig, TrainingInputs, load_examples, log_resumed, prepare_inputs, train_emotion_model,
)
from mlplatform.mlops.figures import confusion_matrix_figure, learning_curves_figure


@dataclasses.dataclass
class EmotionResult:
    """What a training produced: the best model folder (on this machine) and its metrics."""

    checkpoint: Path
    dev_metrics: dict[str, float]
    test_metrics: dict[str, float]
    best_epoch: int
    seconds: float


def _ray_train_loop(config: dict[str, Any]) -> None:
    """Per-worker entry under TorchTrainer: the four Ray touches, then the shared loop."""
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    inputs: TrainingInputs = config["inputs"]
    settings = {k: v for k, v in config.items() if k not in ("inputs", "mlflow_run_id", "tracking_uri")}
    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlplatform.mlops.tracking import ExperimentTracker

        # Only rank 0 writes to MLflow, into the run the driver opened: one run per training, restarts included.
        tracker = ExperimentTracker(config["experiment_name"], run_id=config["mlflow_run_id"], tracking_uri=config["tracking_uri"])

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))
            tracker.flush()
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)  # (3) metrics and rank 0's checkpoint

    restored = ray.train.get_checkpoint()  # (4) after a lost worker or node: the latest checkpoint
    with restored.as_directory() if restored else contextlib.nullcontext() as resume_from:
        if tracker is not None and resume_from is not None:
            log_resumed(tracker, resume_from)
        train_emotion_model(
            settings,
            inputs=inputs,
            report=report,
            world_rank=rank,
            prepare_model=ray.train.torch.prepare_model,  # (2) DDP across workers
            prepare_loader=ray.train.torch.prepare_data_loader,  # (1) a shard of the data per worker
            resume_from=resume_from,
        )


def fit_emotion_model(config: EmotionConfig, tracker: Any | None = None, *, output_dir: str | Path = "runs/emotion") -> EmotionResult:
    """Train under Ray Train's TorchTrainer, then score the best checkpoint on the test split.

    Checkpoints go to ``<output_dir>/ray_results``, a path or a storage URI; a relative one goes
    under ``$MLPLATFORM_STORAGE`` when it is set, which on a multi-node cluster it must be (Ray Train
    needs storage every node reaches). A lost worker or node restarts the workers, up to
    ``max_failures`` times, each continuing from the latest checkpoint; the MLflow run stays one.

    Args:
        config: the training config.
        tracker: an ``ExperimentTracker`` whose run the rank-0 worker logs into (None: no tracking).
        output_dir: where Ray Train keeps checkpoints; the best model is copied to ``<output_dir>/best``
            (or, for a URI, into this machine's cache).

    Returns:
        The best model (by dev macro-F1), with dev and test metrics.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    connect_ray()
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    inputs, teacher = prepare_inputs(config)
    loop_config = {**config_to_dict(config), "inputs": inputs}
    if tracker is not None:
        tracker.log_params(config_to_dict(config))
        tracker.set_tags(provenance_tags(inputs.provenance))
        loop_config |= {"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri}
    name = f"emotion-{int(time.time())}"
    output = storage.resolve(str(output_dir))
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu, placement_strategy=config.placement_strategy,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage.join(output, "ray_results"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="dev_macro_f1", checkpoint_score_order="max"),
        ),
    )
    result = trainer.fit()
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["dev_macro_f1"])
    best = best_model_folder(best_checkpoint, output, name, provenance=inputs.provenance, config=config, teacher=teacher)
    test = score_checkpoint(best, config, split="test")
    best_epoch = int(best_metrics["epoch"])
    if tracker is not None:
        tracker.log_metrics({f"test_{k}": v for k, v in test.items()} | inputs.teacher_metrics
                            | {"teacher_share": served_teacher_share(best)}, step=best_epoch)
        tracker.log_artifact(best, artifact_path="model")
        log_training_figures(tracker, result.metrics_dataframe, best, config)
    dev = {k.removeprefix("dev_"): v for k, v in best_metrics.items() if k.startswith("dev_")}
    return EmotionResult(best, dev, test, best_epoch, time.perf_counter() - started)


TEACHER_SHARES = tuple(tenths / 10 for tenths in range(11))
"""The teacher vote shares tried on dev when ``teacher_share`` is None."""


def best_model_folder(checkpoint: Any, output: str, name: str, *, provenance: dict[str, Any], config: EmotionConfig,
                      teacher: NgramTeacher | None = None) -> Path:
    """The best checkpoint as a model folder on this machine, without its training state, with the teacher that votes
    beside it (at ``config.teacher_share``, or the share chosen on dev) and the provenance of what it learnt from.

    A local ``output`` gets it as ``<output>/best``; a storage URI's run is copied into this machine's cache.
    """
    folder = Path(output) / "best" if not storage.is_uri(output) else storage.cache_dir() / "runs" / name / "best"
    best = Path(checkpoint.to_directory(str(folder)))
    (best / TRAINER_STATE).unlink(missing_ok=True)
    if teacher is not None:
        share = config.teacher_share if config.teacher_share is not None else dev_chosen_share(best, teacher, config)
        if share > 0.0:
            teacher.save(best, vote_share=share)
    save_provenance(best, provenance)
    return best


def dev_chosen_share(folder: Path, teacher: NgramTeacher, config: EmotionConfig) -> float:
    """The teacher's vote share (of ``TEACHER_SHARES``) whose mixture with the student in ``folder`` has the best dev
    macro-F1; the smaller share on a tie. 0.5 when the corpus has no dev split."""
    examples = [e for e in load_examples(config) if e.split == "dev"]
    if not examples:
        return 0.5
    texts, truth = [e.text for e in examples], np.array([e.dominant for e in examples])
    student = EmotionPredictor(folder, max_length=config.max_length).scores(texts)  # no teacher saved in it yet
    taught = teacher.probabilities(texts)
    return max(TEACHER_SHARES, key=lambda share: (
        dominant_metrics((1.0 - share) * student + share * taught, truth)["macro_f1"], -share))


def served_teacher_share(folder: Path) -> float:
    """The teacher's share of the vote the model in ``folder`` serves with (0: the student alone)."""
    saved = NgramTeacher.load(folder)
    return saved[1] if saved else 0.0


def _split_loader(folder: str | Path, config: EmotionConfig, split: str) -> tuple[EmotionClassifier, torch.utils.data.DataLoader] | None:
    """A saved model and a loader over one split of the config's data (None: the split is empty)."""
    tokenizer = load_tokenizer(folder)
    classifier = EmotionClassifier.from_pretrained(folder)
    examples = [e for e in load_examples(config) if e.split == split]
    if not examples:
        return None
    dataset = EmotionDataset(examples, tokenizer, target=classifier.target, max_length=config.max_length)
    return classifier, torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=EmotionCollator(tokenizer.pad_token_id))


def score_checkpoint(folder: str | Path, config: EmotionConfig, *, split: str = "test") -> dict[str, float]:
    """Metrics of a saved model on one split of the config's data: what it serves, and the student alone (``student_*``)."""
    loaded = _split_loader(folder, config, split)
    if not loaded:
        return {}
    classifier, loader = loaded
    student = evaluate(classifier, loader, torch.device("cpu"))
    predictor = EmotionPredictor(folder, max_length=config.max_length)
    if predictor.teacher is None:
        return student
    examples = loader.dataset.examples
    served = dominant_metrics(predictor.scores([e.text for e in examples]), np.array([e.dominant for e in examples]))
    return {"loss": student["loss"], **served, **{f"student_{k}": v for k, v in student.items() if k != "loss"}}


def log_training_figures(tracker: Any, history: Any, folder: str | Path, config: EmotionConfig) -> None:
    """Log the learning curves (train loss, dev macro-F1 per epoch) and the test split's confusion matrix as PNGs.

    ``history`` is the run's reported metrics as a DataFrame (Ray's ``Result.metrics_dataframe``);
    after a restart an epoch is reported again, and its last report counts.
    """
    epochs = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
    tracker.log_figure(learning_curves_figure(
        epochs["epoch"].tolist(), {"train loss": epochs["train_loss"].tolist(), "dev macro-F1": epochs["dev_macro_f1"].tolist()},
        title="emotion: learning curves", xlabel="epoch"), "plots/learning_curves.png")
    examples = [e for e in load_examples(config) if e.split == "test"]
    if examples:  # what the model serves: with its teacher's vote where it has one
        scores = EmotionPredictor(folder, max_length=config.max_length).scores([e.text for e in examples])
        truth = [e.dominant for e in examples]
        tracker.log_figure(confusion_matrix_figure(truth, scores.argmax(axis=1), EMOTIONS, title="emotion: test confusion matrix"),
                           "plots/confusion_matrix_test.png")
