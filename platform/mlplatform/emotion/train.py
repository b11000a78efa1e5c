"""Emotion training: the config, what every worker is handed, and the per-worker loop (``train_emotion_model``) that resumes."""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pydantic
import torch
from pydantic.dataclasses import dataclass
from transformers import get_linear_schedule_with_warmup

from mlplatform import storage
from mlplatform.config import RUN_CONFIG
from mlplatform.emotion.data import (
    EmotionCollator, EmotionDataset, EmotionExample, load_corpus, load_unlabelled, load_wrime_tsv,
)
from mlplatform.emotion.evaluation import evaluate
from mlplatform.emotion.labels import Target
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.progress import ProgressLine
from mlplatform.emotion.teacher import NgramTeacher
from mlplatform.emotion.tokenizer import default_tokenizer, load_tokenizer
from mlplatform.emotion.wordvectors import initial_embeddings
from mlplatform.emotion.writers import WriterGroup, inherited_provenance, provenance, select_writers
from mlplatform.storage import PortableFolder

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
    writers: WriterGroup = "all"
    """Whose texts train and score the model: all, or one group of the corpus' writer_groups.json (the demo trains on public, so that DP fine-tuning on private writers protects texts no earlier model read)."""
    target: Target = "single"
    """single (dominant emotion), multi (each emotion present) or intensity (0-3 regression)."""
    epochs: int = pydantic.Field(6, ge=1)
    """Passes over the training texts, the teacher-labelled ones included (early stopping may end sooner); with teacher=none, about 30."""
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
    word_vectors: Literal["ginza", "none"] = "ginza"
    """Starting word embeddings of the default model: ginza (ja-ginza's pre-trained vectors, PCA-projected to hidden_size) or none (random)."""
    vocab_size: int = pydantic.Field(6000, ge=100)
    """Vocabulary bound for the project's own tokenizer (6000 keeps the corpus' ~4k MeCab words whole; smaller splits them to characters)."""
    max_length: int = pydantic.Field(128, ge=8)
    """Tokens per text; longer texts are truncated."""
    teacher: Literal["ngram", "none"] = "ngram"
    """Distillation (single target): ngram fits a char 1-4-gram and word 1-2-gram TF-IDF + logistic-regression teacher on train, trains on its soft labels for the unlabelled corpus too (seven times the texts per epoch) and serves the two together; none uses the labelled texts alone."""
    unlabelled: str | None = None
    """Text file or folder (one text per line) the teacher labels; None uses the bundled unlabelled corpus."""
    teacher_share: float | None = pydantic.Field(None, ge=0.0, le=1.0)
    """The teacher's share of the served model's vote (its probabilities are averaged with the student's at this weight); None chooses it on dev from 0, 0.1, ..., 1 (the best dev macro-F1 of the mixture, so the served model is never behind either model alone on dev); 0 serves the student alone."""
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
    cpus_per_worker: int = pydantic.Field(2, ge=1)
    """CPUs each Ray Train worker or Tune trial reserves (Ray sets torch's thread count to it; 2 threads train the default model 1.6x faster than 1)."""
    use_gpu: bool | None = None
    """One GPU per worker; None uses GPUs when the cluster has them."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """Ray Train's worker placement: PACK fills one node first (fastest on one machine), SPREAD puts workers on different nodes."""
    max_failures: int = pydantic.Field(3, ge=0)
    """Restarts after a lost worker or node; each resumes from the latest checkpoint (optimizer, schedule and epoch included)."""
    experiment_name: str = "emotion"
    """MLflow experiment the run is logged under."""
    progress_interval_s: float = pydantic.Field(10.0, ge=0.0)
    """Seconds between rank 0's progress lines within an epoch (one also ends each epoch); 0 prints none."""

    @pydantic.model_validator(mode="after")
    def _heads_divide_width(self) -> EmotionConfig:
        if self.model is None and self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.teacher != "none" and self.target != "single":
            raise ValueError(f"teacher={self.teacher} gives soft labels over the dominant emotion: it needs target=single "
                             f"(with target={self.target}, set teacher=none)")
        return self


def load_examples(config: EmotionConfig) -> list[EmotionExample]:
    """The labelled texts the config points to, of its writer group."""
    examples = load_wrime_tsv(config.wrime_tsv) if config.wrime_tsv else load_corpus(config.corpus)
    return select_writers(examples, config.wrime_tsv or config.corpus, config.writers)


@dataclasses.dataclass(frozen=True)
class TrainingInputs:
    """What every worker is handed besides the config, by value: no worker reads the driver's disk.

    The train and dev examples and the tokenizer's (and a local model's) files travel inside the
    task's arguments, through Ray's object store; a hub name travels as a name, loaded from the
    node's own cache.
    """

    examples: tuple[EmotionExample, ...]
    tokenizer: PortableFolder | str
    model: PortableFolder | str | None
    word_embeddings: np.ndarray | None = None
    """The default model's starting word embeddings (vocabulary x hidden_size), or None for BERT's random start."""
    teacher_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    """The teacher's macro-F1 on each held-out split (``teacher_test_macro_f1``...), logged beside the student's."""
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Whose labelled texts the model (and its vocabulary) learnt from, including what a given tokenizer or model had."""


def prepare_inputs(config: EmotionConfig) -> tuple[TrainingInputs, NgramTeacher | None]:
    """Read the data and resolve the tokenizer once, on the driver (the project's own is trained here and cached).

    The default model's starting word embeddings are made here too, so only the driver needs ja-ginza,
    and so is the n-gram teacher (None with teacher=none), which the driver saves beside the best model.
    """
    examples = load_examples(config)
    train_texts = [e.text for e in examples if e.split == "train"]
    # loaded here so that a bad one fails in one line, rather than on every worker
    loaded = load_tokenizer(config.tokenizer) if config.tokenizer is not None else default_tokenizer(train_texts, vocab_size=config.vocab_size)
    tokenizer = storage.portable(config.tokenizer if config.tokenizer is not None else loaded.name_or_path)
    model = storage.portable(config.model) if config.model is not None else None
    embeddings = None
    if config.model is None and config.word_vectors == "ginza":
        embeddings = initial_embeddings(loaded, train_texts, config.hidden_size, seed=config.seed)
    labelled = [e for e in examples if e.split in ("train", "dev")]
    record = inherited_provenance(provenance(labelled, config.wrime_tsv or config.corpus), config.tokenizer, config.model)
    teacher_metrics, teacher = {}, None
    if config.teacher == "ngram":
        teacher = NgramTeacher(labelled, seed=config.seed)
        labelled += teacher.label(load_unlabelled(config.unlabelled)[0])
        held_out = {split: [e for e in examples if e.split == split] for split in ("dev", "test", "unseen")}
        teacher_metrics = {f"teacher_{split}_macro_f1": teacher.macro_f1(chosen) for split, chosen in held_out.items() if chosen}
    return TrainingInputs(tuple(labelled), tokenizer, model, embeddings, teacher_metrics, record), teacher


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only, none on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class OptimizerSettings(Protocol):
    """What :func:`make_optimizer` reads from a config (:class:`EmotionConfig`, or MLM pre-training's)."""

    learning_rate: float
    weight_decay: float
    warmup_ratio: float


def make_optimizer(
    model: torch.nn.Module, settings: OptimizerSettings, *, total_batches: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its linear warmup-then-decay schedule, to be stepped once per batch.

    The sketch called the scheduler with the wrong arguments and stepped it once per epoch, so
    the warmup never ended; here warmup lasts ``warmup_ratio`` of all batches, then the rate falls
    linearly to zero at the last batch.
    """
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.learning_rate, fused=True)
    warmup = math.ceil(settings.warmup_ratio * total_batches)
    return optimizer, get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_batches)


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    max_grad_norm: float,
    bf16: bool,
    on_batch: Callable[[int, float, int], None] | None = None,
) -> float:
    """One pass over ``loader``: clipped AdamW steps, the schedule stepped per batch; returns the mean loss.

    ``on_batch`` is called after each step with the batch number (from 1), its loss and its size.
    """
    device = next(model.parameters()).device
    model.train()  # a model loaded with from_pretrained (a resumed run) comes in eval mode, dropout off
    running, seen = 0.0, 0
    for number, batch in enumerate(loader, start=1):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        batch_loss, batch_size = loss.item(), len(batch["labels"])
        running += batch_loss * batch_size
        seen += batch_size
        if on_batch is not None:
            on_batch(number, batch_loss, batch_size)
    return running / max(seen, 1)


TRAINER_STATE = "trainer_state.pt"
"""The file beside a checkpoint's model that holds what resuming needs: optimizer, schedule, epoch, RNG."""


def save_checkpoint(folder: Path, classifier: EmotionClassifier, tokenizer: Any, state: dict[str, Any]) -> None:
    """The model and tokenizer as ``save_pretrained`` writes them, plus the training state (plain tensors only)."""
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(state, folder / TRAINER_STATE)


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """The training state :func:`save_checkpoint` wrote, read with ``weights_only=True``."""
    return torch.load(Path(folder) / TRAINER_STATE, map_location="cpu", weights_only=True)


def log_resumed(tracker: Any, checkpoint_dir: str | Path) -> None:
    """Record in the run that training restarted from ``checkpoint_dir`` (after a lost worker or node, or a resumed study)."""
    epoch = int(load_trainer_state(checkpoint_dir)["epoch"])
    tracker.log_metrics({"faults/resumed_from_epoch": epoch}, step=epoch)


def train_emotion_model(
    config: dict[str, Any],
    *,
    inputs: TrainingInputs,
    report: Reporter,
    world_rank: int = 0,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    prepare_loader: Callable[[torch.utils.data.DataLoader], torch.utils.data.DataLoader] = lambda d: d,
    resume_from: str | Path | None = None,
) -> None:
    """The per-worker training loop, the same under Ray Train (DDP), Ray Tune or a plain call.

    ``config`` is an :class:`EmotionConfig` as a dict. Ray is touched only through the callables:
    ``prepare_loader`` shards the data, ``prepare_model`` wraps the model for DDP, ``report`` sends
    each epoch's dev metrics and, from rank 0, a checkpoint folder to resume from (the model, its
    tokenizer and :data:`TRAINER_STATE`). Given ``resume_from``, such a folder, training continues
    after its epoch with its optimizer, schedule, best score and random state, so a run restarted
    after a lost worker ends as it would have.
    """
    settings = EmotionConfig(**config)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(storage.local_path(inputs.tokenizer))
    datasets = {
        split: EmotionDataset([e for e in inputs.examples if e.split == split], tokenizer, target=settings.target,
                              max_length=settings.max_length, soft_labels=settings.soft_labels and split == "train")
        for split in ("train", "dev")
    }
    collate = EmotionCollator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = prepare_loader(torch.utils.data.DataLoader(
        datasets["train"], batch_size=settings.batch_size, shuffle=True, collate_fn=collate, generator=generator))
    dev_loader = torch.utils.data.DataLoader(datasets["dev"], batch_size=64, collate_fn=collate)

    if resume_from is not None:  # the checkpoint's own weights and head
        classifier = EmotionClassifier.from_pretrained(resume_from)
    elif inputs.model is None:
        classifier = EmotionClassifier.from_config(
            tokenizer, target=settings.target, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
            num_heads=settings.num_heads, dropout=settings.dropout, max_length=settings.max_length)
        if inputs.word_embeddings is not None:
            with torch.no_grad():
                classifier.model.get_input_embeddings().weight.copy_(torch.from_numpy(inputs.word_embeddings))
    else:
        classifier = EmotionClassifier.from_pretrained(
            storage.local_path(inputs.model), target=settings.target, hidden_dropout_prob=settings.dropout)
    model = prepare_model(classifier)
    device = next(model.parameters()).device
    optimizer, scheduler = make_optimizer(model, settings, total_batches=settings.epochs * len(train_loader))
    bf16 = settings.mixed_precision == "bf16" or (
        settings.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())

    progress = ProgressLine(epochs=settings.epochs, batches=len(train_loader),
                            interval_s=settings.progress_interval_s if world_rank == 0 else 0.0)
    first_epoch, best, stale_epochs = 0, -1.0, 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch, best, stale_epochs = state["epoch"], state["best"], state["stale_epochs"]
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["shuffle_rng"])
    for epoch in range(first_epoch, settings.epochs):
        if stale_epochs >= settings.patience:
            break
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, max_grad_norm=settings.max_grad_norm, bf16=bf16,
                                     on_batch=functools.partial(progress.batch_done, epoch + 1))
        dev = evaluate(classifier, dev_loader, device)
        progress.epoch_done(epoch + 1, dev["macro_f1"])
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "learning_rate": scheduler.get_last_lr()[0],
                   **{f"dev_{k}": v for k, v in dev.items()}}
        improved = dev["macro_f1"] > best
        best, stale_epochs = (dev["macro_f1"], 0) if improved else (best, stale_epochs + 1)
        metrics["best_dev_macro_f1"] = best
        if world_rank != 0:
            report(metrics, checkpoint_dir=None)
            continue
        state = {"epoch": epoch + 1, "best": best, "stale_epochs": stale_epochs, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "shuffle_rng": generator.get_state()}
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), classifier, tokenizer, state)
            report(metrics, checkpoint_dir=folder)
