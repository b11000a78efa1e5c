"""Pre-trained Japanese word vectors (ja-ginza's, chiVe-derived) as the default BERT's starting word embeddings.

`ja-ginza` (a PyPI package) ships 20,000 distinct 300-d vectors for 480,443 words, read here
with spaCy's own ``Vectors``. Each token of the project's WordPiece vocabulary is looked up as it
is, then by the dictionary forms MeCab gives it in the training texts (``食べ`` → ``食べる``), since
the vocabulary holds conjugated surfaces. The vectors found are projected to the model's width by
PCA and scaled to BERT's initial spread; tokens without a vector keep BERT's random start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from mlplatform.storage import cache_dir

INITIAL_STD = 0.02
"""BERT's ``initializer_range``: the spread of every embedding the projected vectors sit beside."""


class WordVectorsError(RuntimeError):
    """The pre-trained vectors cannot be read here; the message says what to install."""


def ginza_vectors_dir() -> Path:
    """The ``vocab`` folder of the installed ``ja-ginza`` package.

    Raises:
        WordVectorsError: ``ja-ginza`` is not installed.
    """
    try:
        package = Path(str(resources.files("ja_ginza")))
    except ModuleNotFoundError:
        raise WordVectorsError("the default emotion model starts from ja-ginza's word vectors: "
                               "`pip install ja-ginza`, or set word_vectors=none") from None
    found = sorted(package.glob("ja_ginza-*/vocab/vectors"))
    if not found:
        raise WordVectorsError(f"ja-ginza at {package} has no vocab/vectors; reinstall it with `pip install ja-ginza`")
    return found[-1].parent


@dataclasses.dataclass(frozen=True)
class WordVectors:
    """A word → vector table: ``vectors[row_of(word)]``, ``row_of`` giving -1 for a word it lacks."""

    vectors: np.ndarray
    rows: dict[int, int]

    @classmethod
    def load_ginza(cls) -> WordVectors:
        """ja-ginza's table (about 5 s to read)."""
        from spacy.vectors import Vectors

        table = Vectors().from_disk(str(ginza_vectors_dir()))
        return cls(np.asarray(table.data, dtype=np.float32), dict(table.key2row.items()))

    def row_of(self, word: str) -> int:
        from spacy.strings import hash_string

        return self.rows.get(hash_string(word), -1)

    def find(self, word: str, forms: dict[str, list[str]]) -> int:
        """The row of ``word`` as written, else of its first dictionary form that has one (``forms``: :func:`dictionary_forms`)."""
        return next((row for row in map(self.row_of, (word, *forms.get(word, ()))) if row >= 0), -1)


def dictionary_forms(texts: Sequence[str]) -> dict[str, list[str]]:
    """For each MeCab surface in ``texts``, its base and lemma forms, the most frequent first."""
    import fugashi

    tagger = fugashi.Tagger()  # unidic-lite, the dictionary the tokenizer splits words with
    seen: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for text in texts:
        for word in tagger(text):
            lemma = (word.feature.lemma or "").split("-")[0]  # UniDic writes loanword lemmas as ケーキ-cake
            seen[word.surface].update(form for form in (word.feature.orthBase, lemma) if form and form != word.surface)
    return {surface: [form for form, _ in forms.most_common()] for surface, forms in seen.items()}


def vocabulary_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], vectors: WordVectors) -> np.ndarray:
    """The vector row of each token id (-1: none), looking a token up as written, then by its dictionary forms."""
    forms = dictionary_forms(texts)
    rows = np.full(len(tokenizer), -1, dtype=np.int64)
    for token, token_id in tokenizer.get_vocab().items():
        rows[token_id] = vectors.find(token.removeprefix("##"), forms)
    return rows


def project(found: np.ndarray, width: int) -> np.ndarray:
    """The vectors' first ``width`` principal components, scaled to :data:`INITIAL_STD` (zero-padded if width exceeds their size)."""
    centred = found - found.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:width].T
    projected *= INITIAL_STD / projected.std()
    return np.pad(projected, ((0, 0), (0, width - projected.shape[1]))).astype(np.float32)


def initial_embeddings(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], width: int, *, seed: int) -> np.ndarray:
    """A (vocabulary, width) embedding matrix: projected ja-ginza vectors where a token has one, BERT's random start elsewhere.

    Cached by vocabulary, texts and width under ``~/.cache/mlplatform/wordvectors``.

    Raises:
        WordVectorsError: ``ja-ginza`` is not installed.
    """
    vocabulary = "\n".join(sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get))
    digest = hashlib.sha256(f"{vocabulary}\0{chr(0).join(texts)}\0{width}\0{seed}".encode()).hexdigest()[:16]
    cached = cache_dir() / "wordvectors" / f"ginza-{digest}.npy"
    if cached.is_file():
        return np.load(cached)
    vectors = WordVectors.load_ginza()
    rows = vocabulary_rows(tokenizer, texts, vectors)
    table = np.random.default_rng(seed).normal(0.0, INITIAL_STD, size=(len(tokenizer), width)).astype(np.float32)
    has_vector = rows >= 0
    table[has_vector] = project(vectors.vectors[rows[has_vector]], width)
    if tokenizer.pad_token_id is not None:
        table[tokenizer.pad_token_id] = 0.0  # as BertEmbeddings keeps its padding row
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.npy")
    np.save(partial, table)
    os.replace(partial, cached)  # whole or absent, when two drivers fill the cache at once
    return table
