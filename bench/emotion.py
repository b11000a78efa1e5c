"""Benchmark: emotion training samples/s, ours vs HF Trainer and per-batch vs pad-to-max padding, as one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from quiet_stdout import stdout_to_stderr  # bench/ is on sys.path when a bench runs as a script
from mlplatform.emotion.data import EmotionCollator, EmotionDataset, load_corpus
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.tokenizer import load_tokenizer
from mlplatform.emotion.train import EmotionConfig, make_optimizer, prepare_inputs, train_one_epoch
from mlplatform.storage import local_path

Collate = Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]
Timing = tuple[float, float, float]  # wall seconds, CPU seconds of this process, mean training loss


def pad_to_max(pad_token_id: int, length: int) -> Collate:
    """The sketch's padding: every text padded to ``length`` tokens, however short its batch is."""

    def collate(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
        for row, item in enumerate(batch):
            input_ids[row, : len(item["input_ids"])] = torch.as_tensor(item["input_ids"])
        labels = torch.as_tensor(np.stack([item["labels"] for item in batch]))
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad_token_id).long(), "labels": labels}

    return collate


def build_model(tokenizer: PreTrainedTokenizerBase, settings: EmotionConfig) -> EmotionClassifier:
    """The default small BERT exactly as ``train_emotion_model`` builds it, from the same seed."""
    torch.manual_seed(settings.seed)
    return EmotionClassifier.from_config(
        tokenizer, target=settings.target, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
        num_heads=settings.num_heads, dropout=settings.dropout, max_length=settings.max_length)


def loader(dataset: EmotionDataset, collate: Collate, settings: EmotionConfig) -> torch.utils.data.DataLoader:
    """The training DataLoader of ``train_emotion_model``: shuffled, seeded, one process."""
    return torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(settings.seed))


def run_ours(tokenizer: PreTrainedTokenizerBase, dataset: EmotionDataset, collate: Collate,
             settings: EmotionConfig) -> Timing:
    """The training epochs of ``train_emotion_model`` (its own ``train_one_epoch``), without evaluation."""
    model = build_model(tokenizer, settings)
    wall, cpu = time.perf_counter(), time.process_time()
    train_loader = loader(dataset, collate, settings)
    optimizer, scheduler = make_optimizer(model, settings, total_batches=settings.epochs * len(train_loader))
    losses = [train_one_epoch(model, train_loader, optimizer, scheduler, max_grad_norm=settings.max_grad_norm, bf16=False)
              for _ in range(settings.epochs)]
    return time.perf_counter() - wall, time.process_time() - cpu, float(np.mean(losses))


def hf_args(settings: EmotionConfig, out: str) -> TrainingArguments:
    """Trainer settings matching ``EmotionConfig``: AdamW, linear warmup and decay per batch, clipping; no logging."""
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=settings.batch_size, num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate, warmup_steps=settings.warmup_ratio, max_grad_norm=settings.max_grad_norm,
        weight_decay=settings.weight_decay, seed=settings.seed, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)


def run_hf(tokenizer: PreTrainedTokenizerBase, dataset: EmotionDataset, collate: Collate,
           settings: EmotionConfig, out: str) -> Timing:
    """``Trainer.train()`` on the same Hugging Face model, data, batch size and schedule."""
    trainer = Trainer(model=build_model(tokenizer, settings).model, args=hf_args(settings, out),
                      train_dataset=dataset, data_collator=collate)
    wall, cpu = time.perf_counter(), time.process_time()
    with stdout_to_stderr():  # Trainer prints its final metrics
        loss = trainer.train().training_loss
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides (more than one "
                        "collapses unpredictably when other processes share the cores)")
    flags = parser.parse_args()
    torch.set_num_threads(flags.threads)
    # The WordPiece vocabulary is trained into a throwaway cache, leaving ~/.cache/mlplatform alone.
    home = tempfile.TemporaryDirectory()
    os.environ["MLPLATFORM_HOME"] = home.name
    settings = EmotionConfig(epochs=flags.epochs)
    with stdout_to_stderr():  # the WordPiece trainer's progress bar writes newlines to stdout
        tokenizer = load_tokenizer(local_path(prepare_inputs(settings)[0].tokenizer))
    train = [e for e in load_corpus() if e.split == "train"]
    dataset = EmotionDataset(train, tokenizer, target=settings.target, max_length=settings.max_length)
    per_batch = EmotionCollator(tokenizer.pad_token_id)
    lengths = np.array([len(ids) for ids in dataset.input_ids])
    widths = [batch["input_ids"].shape[1] for batch in loader(dataset, per_batch, settings)]
    out = os.path.join(home.name, "trainer")
    runners: dict[str, Callable[[EmotionConfig], Timing]] = {
        "ours": lambda s: run_ours(tokenizer, dataset, per_batch, s),
        "hf_trainer": lambda s: run_hf(tokenizer, dataset, per_batch, s, out),
        "pad_to_max": lambda s: run_ours(tokenizer, dataset, pad_to_max(tokenizer.pad_token_id, s.max_length), s),
    }
    for run in runners.values():  # untimed warm-up epoch: allocator, oneDNN kernels, lazy imports
        run(EmotionConfig(epochs=1))
    runs: dict[str, list[Timing]] = {name: [] for name in runners}
    for repeat in range(flags.repeats):  # interleaved, so drifting machine load hits every side alike
        for name, run in runners.items():
            runs[name].append(run(settings))
            wall, cpu, loss = runs[name][-1]
            print(f"repeat {repeat}: {name} {wall:.2f} s wall, {cpu:.2f} s CPU, mean train loss {loss:.4f}, "
                  f"{torch.get_num_threads()} threads", file=sys.stderr)
    samples = settings.epochs * len(dataset)
    # Medians of samples per second of wall time [0] and of this process's CPU time [1] (robust to a busy machine).
    rate = {name: [statistics.median(samples / t[clock] for t in timings) for clock in (0, 1)]
            for name, timings in runs.items()}

    def compare(clock: int) -> dict[str, float]:
        return {"ours_samples_per_s": round(rate["ours"][clock], 1),
                "hf_trainer_samples_per_s": round(rate["hf_trainer"][clock], 1),
                "ratio_vs_hf_trainer": round(rate["ours"][clock] / rate["hf_trainer"][clock], 2),
                "pad_to_max_samples_per_s": round(rate["pad_to_max"][clock], 1),
                "ratio_per_batch_vs_pad_to_max": round(rate["ours"][clock] / rate["pad_to_max"][clock], 2)}

    print(json.dumps({
        "bench": "emotion",
        "model": {"hidden_size": settings.hidden_size, "num_layers": settings.num_layers,
                  "params": sum(p.numel() for p in build_model(tokenizer, settings).parameters())},
        "train_texts": len(dataset),
        "batch_size": settings.batch_size,
        "epochs_timed": settings.epochs,
        **compare(0),
        "per_cpu_second": compare(1),
        "tokens": {"mean": round(float(lengths.mean()), 1), "max": int(lengths.max()),
                   "mean_batch_width": round(statistics.mean(widths), 1), "pad_to_max_width": settings.max_length},
        "mean_train_loss": {name: round(statistics.median(t[2] for t in timings), 4) for name, timings in runs.items()},
        "hf_optimizer": hf_args(settings, out).optim.value,
        "torch_threads": torch.get_num_threads(),
        "repeats": flags.repeats,
    }))
    home.cleanup()


if __name__ == "__main__":
    main()
