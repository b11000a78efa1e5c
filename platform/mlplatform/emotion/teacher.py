"""The n-gram half of the emotion model: it labels the unlabelled corpus for the BERT student, then votes beside it.

Hinton et al. 2015 (arXiv:1503.02531) on unlabelled text: the teacher, TF-IDF over character
1-4-grams and MeCab word 1-2-grams with logistic regression (the strongest small-data model we
measured), is fitted on the train split, its regularisation chosen on dev, and its probabilities
over the eight emotions become soft labels on every unlabelled text. The student trains on the
labelled train split and on those. The two make different mistakes (the student reads words in
context through ja-ginza's vectors, the teacher sees exact surface forms), so the served model
averages their probabilities: :meth:`NgramTeacher.save` writes the teacher beside the student, as
JSON and safetensors (no pickle), and :class:`~mlplatform.emotion.predict.EmotionPredictor` loads
both.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from scipy.sparse import hstack
from scipy.special import softmax

from mlplatform.emotion.data import EmotionExample
from mlplatform.emotion.evaluation import dominant_metrics
from mlplatform.emotion.labels import MAX_INTENSITY, NUM_EMOTIONS
from mlplatform.emotion.tokenizer import word_split

TEACHER_C_GRID = (1.0, 3.0, 10.0, 30.0)
"""Inverse regularisation strengths the teacher picks from on dev (by macro-F1), fitted in this order, each from the last."""
UNLABELLED_WRITER = "unlabelled"
"""The writer id of a teacher-labelled text, so that no writer-based split or partition counts it."""
TEACHER_FILES = ("ngram_teacher.json", "ngram_teacher.safetensors")
"""What :meth:`NgramTeacher.save` writes into a model folder: vocabularies and vote share, then idf and weights."""
ANALYZERS = {
    "char": {"analyzer": "char", "ngram_range": (1, 4)},
    "word": {"analyzer": "word", "ngram_range": (1, 2), "token_pattern": r"\S+", "lowercase": False},
}
"""The two TF-IDF feature sets; word features read the MeCab words of a text joined by spaces."""


MIN_TEXTS_PER_FEATURE = 2
"""An n-gram must occur in this many train texts to be a feature: a quarter of the features, and better scores on dev."""


def _vectorizer(name: str, vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(sublinear_tf=True, min_df=MIN_TEXTS_PER_FEATURE, vocabulary=vocabulary, dtype=np.float32,
                           **ANALYZERS[name])


def _documents(texts: Sequence[str]) -> dict[str, list[str]]:
    return {"char": list(texts), "word": [" ".join(words) for words in word_split(texts)]}


class NgramTeacher:
    """Character 1-4-gram and word 1-2-gram TF-IDF with logistic regression over the dominant emotion.

    Args:
        examples: labelled texts; the train split fits it, the dev split chooses C.
        seed: the solver's seed.
    """

    def __init__(self, examples: Sequence[EmotionExample], *, seed: int = 0) -> None:
        train = [e for e in examples if e.split == "train"]
        dev = [e for e in examples if e.split == "dev"] or train
        if len({e.dominant for e in train}) < NUM_EMOTIONS:
            raise ValueError("the n-gram teacher needs train texts of all eight dominant emotions")
        documents = _documents([e.text for e in train])
        self.vectorizers = {name: _vectorizer(name).fit(documents[name]) for name in ANALYZERS}
        features, labels = self._features(documents), [e.dominant for e in train]
        dev_features, dev_labels = self.features([e.text for e in dev]), [e.dominant for e in dev]
        # one solver warm-started along the C path: each fit starts from the last one's weights
        solver = LogisticRegression(max_iter=3000, random_state=seed, warm_start=True)
        self.dev_macro_f1s, weights = [], []
        for c in TEACHER_C_GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                solver.set_params(C=c).fit(features, labels)
            self.dev_macro_f1s.append(float(f1_score(dev_labels, solver.predict(dev_features), average="macro")))
            # contiguous: safetensors writes an array's buffer as is, and the solver's coef_ is Fortran-ordered
            weights.append((np.ascontiguousarray(solver.coef_, np.float32), solver.intercept_.astype(np.float32)))
        self.c = TEACHER_C_GRID[int(np.argmax(self.dev_macro_f1s))]
        self.coef, self.intercept = weights[int(np.argmax(self.dev_macro_f1s))]

    def _features(self, documents: dict[str, list[str]]):
        return hstack([self.vectorizers[name].transform(documents[name]) for name in ANALYZERS]).tocsr()

    def features(self, texts: Sequence[str]):
        """The TF-IDF features of ``texts`` (a sparse matrix, character n-grams then word n-grams)."""
        return self._features(_documents(texts))

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, 8) probabilities of each emotion being the dominant one."""
        return softmax(self.features(texts) @ self.coef.T + self.intercept, axis=1)

    def macro_f1(self, examples: Sequence[EmotionExample]) -> float:
        """The teacher's macro-F1 over the dominant emotions of ``examples``: its own score, logged beside the student's."""
        return dominant_metrics(self.probabilities([e.text for e in examples]), np.array([e.dominant for e in examples]))["macro_f1"]

    def label(self, texts: Sequence[str]) -> list[EmotionExample]:
        """Each text as a train example whose intensities are the teacher's probabilities scaled to 0-3 (soft labels)."""
        return [EmotionExample(text, UNLABELLED_WRITER, "train", tuple(float(MAX_INTENSITY * p) for p in row))
                for text, row in zip(texts, self.probabilities(texts))]

    def save(self, folder: str | Path, *, vote_share: float) -> None:
        """Write the teacher into a model folder, with the share of the vote its probabilities get beside the student's."""
        json_file, tensor_file = TEACHER_FILES
        vocabularies = {name: {term: int(index) for term, index in v.vocabulary_.items()} for name, v in self.vectorizers.items()}
        Path(folder, json_file).write_text(json.dumps({"vote_share": vote_share, "C": self.c, "vocabularies": vocabularies},
                                                  ensure_ascii=False), encoding="utf-8")
        save_file({"coef": self.coef, "intercept": self.intercept,
                   **{f"idf_{name}": v.idf_.astype(np.float32) for name, v in self.vectorizers.items()}}, str(Path(folder, tensor_file)))

    @classmethod
    def load(cls, folder: str | Path) -> tuple[NgramTeacher, float] | None:
        """The teacher saved in a model folder and its vote share, or None when the folder holds none."""
        json_file, tensor_file = (Path(folder, name) for name in TEACHER_FILES)
        if not json_file.is_file():
            return None
        saved, arrays = json.loads(json_file.read_text(encoding="utf-8")), load_file(str(tensor_file))
        teacher = cls.__new__(cls)
        teacher.vectorizers = {name: _vectorizer(name, saved["vocabularies"][name]) for name in ANALYZERS}
        for name, vectorizer in teacher.vectorizers.items():
            vectorizer.idf_ = arrays[f"idf_{name}"]
        teacher.c, teacher.coef, teacher.intercept = saved["C"], arrays["coef"], arrays["intercept"]
        return teacher, float(saved["vote_share"])
