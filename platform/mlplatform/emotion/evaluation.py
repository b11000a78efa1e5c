"""Scoring an emotion model over a loader: its outputs, and accuracy, macro-F1 (and MAE) of the dominant emotion."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score, mean_absolute_error

from mlplatform.emotion.model import EmotionClassifier


def collect_outputs(
    model: EmotionClassifier, loader: torch.utils.data.DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray, float]:
    """The model's scores (see :meth:`EmotionClassifier.scores`), the labels and the mean loss over a loader."""
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
    truth = np.concatenate(labels)
    return np.concatenate(scores), truth, float(np.sum(losses) / len(truth))


def dominant_metrics(scores: np.ndarray, dominant: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of the strongest score of each row against the dominant emotions."""
    predicted = scores.argmax(axis=1)
    return {"accuracy": float((predicted == dominant).mean()),
            "macro_f1": float(f1_score(dominant, predicted, average="macro", zero_division=0))}


def evaluate(model: EmotionClassifier, loader: torch.utils.data.DataLoader, device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 of the dominant emotion (plus MAE for intensity) over a loader."""
    predicted, truth, loss = collect_outputs(model, loader, device)
    metrics = {"loss": loss}
    if model.target == "multi":
        present = predicted >= 0.5
        metrics |= {"accuracy": float((present == truth.astype(bool)).all(axis=1).mean()),
                    "macro_f1": float(f1_score(truth, present, average="macro", zero_division=0))}
    else:
        metrics |= dominant_metrics(predicted, truth if truth.ndim == 1 else truth.argmax(axis=1))
        if model.target == "intensity":
            metrics["mae"] = float(mean_absolute_error(truth, predicted))
    return metrics
