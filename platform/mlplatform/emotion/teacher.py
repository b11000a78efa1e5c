"""Knowledge distillation for the emotion model: a character n-gram teacher labels the unlabelled corpus for the BERT student.

Hinton et al. 2015 (arXiv:1503.02531) on unlabelled text: the teacher, character 1-4-gram TF-IDF
and logistic regression (the strongest small-data baseline), is fitted on the train split, its
regularisation chosen on dev, and its probabilities over the eight emotions become soft labels on
every unlabelled text. The student trains on the labelled train split and on those; it sees 6x
the texts, and what it learns from them can carry past the teacher (ja-ginza's vectors and its own
attention give it more than character n-grams).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from mlplatform.emotion.data import EmotionExample
from mlplatform.emotion.labels import MAX_INTENSITY, NUM_EMOTIONS

TEACHER_C_GRID = (1.0, 3.0, 10.0, 30.0)
"""Inverse regularisation strengths the teacher picks from on dev (by macro-F1)."""
UNLABELLED_WRITER = "unlabelled"
"""The writer id of a teacher-labelled text, so that no writer-based split or partition counts it."""


class NgramTeacher:
    """Character 1-4-gram TF-IDF and logistic regression over the dominant emotion.

    Args:
        examples: labelled texts; the train split fits it, the dev split chooses C.
        seed: the solver's seed.
    """

    def __init__(self, examples: Sequence[EmotionExample], *, seed: int = 0) -> None:
        train = [e for e in examples if e.split == "train"]
        dev = [e for e in examples if e.split == "dev"] or train
        if len({e.dominant for e in train}) < NUM_EMOTIONS:
            raise ValueError("the n-gram teacher needs train texts of all eight dominant emotions")
        self.vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True)
        features = self.vectorizer.fit_transform([e.text for e in train])
        labels = [e.dominant for e in train]
        fitted = [LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(features, labels) for c in TEACHER_C_GRID]
        dev_features, dev_labels = self.vectorizer.transform([e.text for e in dev]), [e.dominant for e in dev]
        self.dev_macro_f1s = [float(f1_score(dev_labels, m.predict(dev_features), average="macro")) for m in fitted]
        self.model = fitted[int(np.argmax(self.dev_macro_f1s))]

    def macro_f1(self, examples: Sequence[EmotionExample]) -> float:
        """The teacher's macro-F1 over the dominant emotions of ``examples``: the n-gram baseline, in the student's own run."""
        predicted = self.model.predict(self.vectorizer.transform([e.text for e in examples]))
        return float(f1_score([e.dominant for e in examples], predicted, average="macro", zero_division=0))

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, 8) probabilities of each emotion being the dominant one."""
        return self.model.predict_proba(self.vectorizer.transform(list(texts)))

    def label(self, texts: Sequence[str]) -> list[EmotionExample]:
        """Each text as a train example whose intensities are the teacher's probabilities scaled to 0-3 (soft labels)."""
        return [EmotionExample(text, UNLABELLED_WRITER, "train", tuple(float(MAX_INTENSITY * p) for p in row))
                for text, row in zip(texts, self.probabilities(texts))]
