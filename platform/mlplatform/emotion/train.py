"""Emotion training: the config, the per-worker loop (``train_emotion_model``) and its Ray Train launcher."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch
from pydantic.dataclasses import dataclass
from sklearn.metrics import f1_score, mean_absolute_error
from transformers import get_linear_schedule_with_warmup

from mlplatform.cluster import connect_ray
from mlplatform.config import RUN_CONFIG, config_to_dict
from mlplatform.emotion.data import EmotionCollator, EmotionDataset, EmotionExample, load_corpus, load_wrime_tsv
from mlplatform.emotion.labels import Target
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.tokenizer import default_tokenizer, load_tokenizer

Reporter = Callable[..., None]


@dataclass(config=RUN_CONFIG)
class EmotionConfig:
    """One emotion-classifier training; every field can be set from YAML or ``--set key=value``."""

    model: str | None = None
    """Hub name or folder of a pre-trained model; None builds the small default BERT from a config."""
    tokenizer: str | None = None
    """Hub name or folder of a tokenizer; None trains the project's WordPiece vocabulary on the corpus."""
    corpus: str | None = None
    """JSONL file or folder of labelled texts; None uses the bundled corpus."""
    wrime_tsv: str | None = None
    """A WRIME TSV file to train on instead of the corpus (readers' average labels)."""
    target: Target = "single"
    """single (dominant emotion), multi (each emotion present) or intensity (0-3 regression)."""
    epochs: int = pydantic.Field(30, ge=1)
    """Passes over the training split (early stopping may end sooner)."""
    batch_size: int = pydantic.Field(32, ge=1)
    """Texts per batch on each worker."""
    learning_rate: float = pydantic.Field(1e-3, gt=0.0)
    """Peak AdamW learning rate, reached at the end of warmup (1e-3: 2e-3 stalled some seeds of the default model)."""
    weight_decay: float = pydantic.Field(0.1, ge=0.0)
    """AdamW weight decay (never on biases or LayerNorm weights)."""
    warmup_ratio: float = pydantic.Field(0.1, ge=0.0, lt=1.0)
    """Share of all batches spent warming the learning rate up from zero."""
    max_grad_norm: float = pydantic.Field(1.0, gt=0.0)
    """Gradient clipping threshold on the global L2 norm."""
    dropout: float = pydantic.Field(0.3, ge=0.0, lt=1.0)
    """Dropout of the default model (hidden and attention)."""
    hidden_size: int = pydantic.Field(128, ge=8)
    """Width of the default model."""
    num_layers: int = pydantic.Field(2, ge=1)
    """Transformer layers of the default model."""
    num_heads: int = pydantic.Field(4, ge=1)
    """Attention heads of the default model (must divide hidden_size)."""
    vocab_size: int = pydantic.Field(6000, ge=100)
    """Vocabulary bound for the project's own tokenizer (6000 keeps the corpus' ~4k MeCab words whole; smaller splits them to characters)."""
    max_length: int = pydantic.Field(128, ge=8)
    """Tokens per text; longer texts are truncated."""
    soft_labels: bool = True
    """Single target: train against the normalised intensities, not their argmax (keeps secondary emotions); metrics still use the argmax."""
    patience: int = pydantic.Field(10, ge=1)
    """Epochs without a better dev macro-F1 before stopping early (10: at 5, slow-starting seeds stopped before learning)."""
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """bf16 autocast: auto uses it on GPUs that support it, never on CPU."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    num_workers: int = pydantic.Field(1, ge=1)
    """Ray Train workers (data-parallel, DDP)."""
    use_gpu: bool | None = None
    """One GPU per worker; None uses GPUs when the cluster has them."""
    experiment_name: str = "emotion"
    """MLflow experiment the run is logged under."""

    @pydantic.model_validator(mode="after")
    def _heads_divide_width(self) -> EmotionConfig:
        if self.model is None and self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


def load_examples(config: EmotionConfig) -> list[EmotionExample]:
    """The labelled texts the config points to."""
    return load_wrime_tsv(config.wrime_tsv) if config.wrime_tsv else load_corpus(config.corpus)


def with_absolute_paths(config: EmotionConfig) -> EmotionConfig:
    """Local paths made absolute, since Ray workers run in other folders; hub names stay as they are."""
    local = {
        field: str(Path(value).resolve())
        for field in ("model", "tokenizer", "corpus", "wrime_tsv")
        if (value := getattr(config, field)) is not None and Path(value).exists()
    }
    return dataclasses.replace(config, **local)


def prepare_tokenizer(config: EmotionConfig) -> str:
    """Resolve the tokenizer once, before workers start, and return a path or name they can load."""
    if config.tokenizer is not None:
        load_tokenizer(config.tokenizer)
        return config.tokenizer
    texts = [e.text for e in load_examples(config) if e.split == "train"]
    return default_tokenizer(texts, vocab_size=config.vocab_size).name_or_path


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only, none on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: torch.nn.Module, settings: EmotionConfig, *, total_batches: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its linear warmup-then-decay schedule, to be stepped once per batch.

    The sketch called the scheduler with the wrong arguments and stepped it once per epoch, so
    the warmup never ended; here warmup lasts ``warmup_ratio`` of all batches, then the rate falls
    linearly to zero at the last batch.
    """
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.learning_rate, fused=True)
    warmup = math.ceil(settings.warmup_ratio * total_batches)
    return optimizer, get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_batches)


def evaluate(model: EmotionClassifier, loader: torch.utils.data.DataLoader, device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 of the dominant emotion (plus MAE for intensity) over a loader."""
    model.eval()
    scores, labels, losses = [], [], []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            output = model(**batch)
            losses.append(output.loss.item() * len(batch["labels"]))
            scores.append(model.scores(output.logits.float()).cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    model.train()
    predicted, truth = np.concatenate(scores), np.concatenate(labels)
    metrics = {"loss": float(np.sum(losses) / len(truth))}
    if model.target == "multi":
        present = predicted >= 0.5
        metrics |= {"accuracy": float((present == truth.astype(bool)).all(axis=1).mean()),
                    "macro_f1": float(f1_score(truth, present, average="macro", zero_division=0))}
    else:
        dominant_true = truth if truth.ndim == 1 else truth.argmax(axis=1)
        dominant_pred = predicted.argmax(axis=1)
        metrics |= {"accuracy": float((dominant_pred == dominant_true).mean()),
                    "macro_f1": float(f1_score(dominant_true, dominant_pred, average="macro", zero_division=0))}
        if model.target == "intensity":
            metrics["mae"] = float(mean_absolute_error(truth, predicted))
    return metrics


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    max_grad_norm: float,
    bf16: bool,
) -> float:
    """One pass over ``loader``: clipped AdamW steps, the schedule stepped per batch; returns the mean loss."""
    device = next(model.parameters()).device
    running, seen = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        running += loss.item() * len(batch["labels"])
        seen += len(batch["labels"])
    return running / max(seen, 1)


def train_emotion_model(
    config: dict[str, Any],
    *,
    report: Reporter,
    world_rank: int = 0,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    prepare_loader: Callable[[torch.utils.data.DataLoader], torch.utils.data.DataLoader] = lambda d: d,
) -> None:
    """The per-worker training loop, the same under Ray Train (DDP), Ray Tune or a plain call.

    ``config`` is an :class:`EmotionConfig` as a dict plus ``tokenizer_path``. Ray is touched only
    through the three callables: ``prepare_loader`` shards the data, ``prepare_model`` wraps
    the model for DDP, ``report`` sends each epoch's dev metrics (and, from rank 0, the best
    checkpoint so far).
    """
    settings = EmotionConfig(**{k: v for k, v in config.items() if k != "tokenizer_path"})
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(config["tokenizer_path"])
    examples = load_examples(settings)
    datasets = {
        split: EmotionDataset([e for e in examples if e.split == split], tokenizer, target=settings.target,
                              max_length=settings.max_length, soft_labels=settings.soft_labels and split == "train")
        for split in ("train", "dev")
    }
    collate = EmotionCollator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = prepare_loader(torch.utils.data.DataLoader(
        datasets["train"], batch_size=settings.batch_size, shuffle=True, collate_fn=collate, generator=generator))
    dev_loader = torch.utils.data.DataLoader(datasets["dev"], batch_size=64, collate_fn=collate)

    if settings.model is None:
        classifier = EmotionClassifier.from_config(
            tokenizer, target=settings.target, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
            num_heads=settings.num_heads, dropout=settings.dropout, max_length=settings.max_length)
    else:
        classifier = EmotionClassifier.from_pretrained(
            settings.model, target=settings.target, hidden_dropout_prob=settings.dropout)
    model = prepare_model(classifier)
    device = next(model.parameters()).device
    optimizer, scheduler = make_optimizer(model, settings, total_batches=settings.epochs * len(train_loader))
    bf16 = settings.mixed_precision == "bf16" or (
        settings.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())

    best, stale_epochs = -1.0, 0
    for epoch in range(settings.epochs):
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, max_grad_norm=settings.max_grad_norm, bf16=bf16)
        dev = evaluate(classifier, dev_loader, device)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "learning_rate": scheduler.get_last_lr()[0],
                   **{f"dev_{k}": v for k, v in dev.items()}}
        improved = dev["macro_f1"] > best
        best, stale_epochs = (dev["macro_f1"], 0) if improved else (best, stale_epochs + 1)
        metrics["best_dev_macro_f1"] = best
        if improved and world_rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                classifier.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                report(metrics, checkpoint_dir=folder)
        else:
            report(metrics, checkpoint_dir=None)
        if stale_epochs >= settings.patience:
            break


@dataclasses.dataclass
class EmotionResult:
    """What a training produced: the best checkpoint folder and its metrics."""

    checkpoint: Path
    dev_metrics: dict[str, float]
    test_metrics: dict[str, float]
    best_epoch: int
    seconds: float


def _ray_train_loop(config: dict[str, Any]) -> None:
    """Per-worker entry under TorchTrainer: the three Ray touches, then the shared loop."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlplatform.mlops.tracking import ExperimentTracker

        # Only rank 0 writes to MLflow, into the run the driver opened: one run per training.
        tracker = ExperimentTracker(config["experiment_name"], run_id=config["mlflow_run_id"], tracking_uri=config["tracking_uri"])

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))
            tracker.flush()
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)  # (3) metrics and the best checkpoint

    train_emotion_model(
        {k: v for k, v in config.items() if k not in ("mlflow_run_id", "tracking_uri")},
        report=report,
        world_rank=rank,
        prepare_model=ray.train.torch.prepare_model,  # (2) DDP across workers
        prepare_loader=ray.train.torch.prepare_data_loader,  # (1) a shard of the data per worker
    )


def fit_emotion_model(config: EmotionConfig, tracker: Any | None = None, *, output_dir: str | Path = "runs/emotion") -> EmotionResult:
    """Train under Ray Train's TorchTrainer, then score the best checkpoint on the test split.

    Args:
        config: the training config.
        tracker: an ``ExperimentTracker`` whose run the rank-0 worker logs into (None: no tracking).
        output_dir: where Ray Train keeps checkpoints (made absolute: jobs run in a copied folder).

    Returns:
        The best checkpoint (by dev macro-F1) copied under ``output_dir``, with dev and test metrics.
    """
    import time

    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    connect_ray()
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    config = with_absolute_paths(config)
    loop_config = {**config_to_dict(config), "tokenizer_path": prepare_tokenizer(config)}
    if tracker is not None:
        tracker.log_params(config_to_dict(config))
        loop_config |= {"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri}
    output_dir = Path(output_dir).expanduser().resolve()
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"emotion-{int(time.time())}",
            storage_path=str(output_dir / "ray_results"),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="dev_macro_f1", checkpoint_score_order="max"),
        ),
    )
    result = trainer.fit()
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["dev_macro_f1"])
    best = Path(best_checkpoint.to_directory(str(output_dir / "best")))
    test = score_checkpoint(best, config, split="test")
    best_epoch = int(best_metrics["epoch"])
    if tracker is not None:
        tracker.log_metrics({f"test_{k}": v for k, v in test.items()}, step=best_epoch)
        tracker.log_artifact(best, artifact_path="model")
    dev = {k.removeprefix("dev_"): v for k, v in best_metrics.items() if k.startswith("dev_")}
    return EmotionResult(best, dev, test, best_epoch, time.perf_counter() - started)


def score_checkpoint(folder: str | Path, config: EmotionConfig, *, split: str = "test") -> dict[str, float]:
    """Metrics of a saved model on one split of the config's data."""
    tokenizer = load_tokenizer(folder)
    classifier = EmotionClassifier.from_pretrained(folder)
    examples = [e for e in load_examples(config) if e.split == split]
    if not examples:
        return {}
    dataset = EmotionDataset(examples, tokenizer, target=classifier.target, max_length=config.max_length)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=EmotionCollator(tokenizer.pad_token_id))
    return evaluate(classifier, loader, torch.device("cpu"))
