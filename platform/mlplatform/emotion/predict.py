"""EmotionPredictor: a saved emotion model and its tokenizer, answering texts with the eight scores."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mlplatform.emotion.data import EmotionCollator, truncate
from mlplatform.emotion.labels import EMOTIONS
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.teacher import NgramTeacher
from mlplatform.emotion.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmotionPrediction:
    """The strongest emotion and every emotion's score (probability, or intensity 0-3)."""

    label: str
    scores: dict[str, float]


class EmotionPredictor:
    """Loads a model folder written by training (weights, config and tokenizer together).

    A folder that also holds the n-gram teacher (the default model's) answers with the two models'
    probabilities averaged, the teacher's weighted by the vote share saved with it.

    Args:
        folder: the model folder.
        max_length: longer texts are truncated (at most to the model's positions), with one warning per call that truncates.

    Raises:
        FileNotFoundError: the folder holds no model.
    """

    def __init__(self, folder: str | Path, *, max_length: int = 128) -> None:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no emotion model at {str(folder)!r}; train one with `mlplatform train emotion`")
        self.tokenizer = load_tokenizer(folder)
        self.classifier = EmotionClassifier.from_pretrained(folder).eval()
        # never past the model's own positions: a model trained at max_length=64 has 64
        self.max_length = min(max_length, self.classifier.model.config.max_position_embeddings)
        self.collate = EmotionCollator(self.tokenizer.pad_token_id)
        saved = NgramTeacher.load(folder) if self.classifier.target == "single" else None
        self.teacher, self.teacher_share = saved if saved else (None, 0.0)

    def predict(self, texts: Sequence[str]) -> list[EmotionPrediction]:
        """Scores for each text, in the order given.

        Raises:
            ValueError: a text is empty.
        """
        return [
            EmotionPrediction(EMOTIONS[int(row.argmax())], {e: float(v) for e, v in zip(EMOTIONS, row)})
            for row in self.scores(texts)
        ]

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, 8) scores, what :meth:`predict` answers.

        Raises:
            ValueError: a text is empty.
        """
        for index, text in enumerate(texts):
            if not text or not text.strip():
                raise ValueError(f"text {index} is empty")
        encoded = self.tokenizer(list(texts), truncation=False)["input_ids"]
        longest = max(len(ids) for ids in encoded)
        if longest > self.max_length:
            log.warning("texts longer than %d tokens were truncated (longest: %d)", self.max_length, longest)
        batch = self.collate([{"input_ids": truncate(ids, self.max_length), "labels": 0} for ids in encoded])
        logits = self.classifier(batch["input_ids"], batch["attention_mask"]).logits
        scores = self.classifier.scores(logits.float()).numpy()
        if self.teacher is None:
            return scores
        return (1.0 - self.teacher_share) * scores + self.teacher_share * self.teacher.probabilities(texts)
