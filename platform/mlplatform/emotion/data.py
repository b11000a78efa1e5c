"""Emotion data: the bundled corpus, WRIME's TSV files, and a dataset whose batches pad per batch."""

from __future__ import annotations

import csv
import hashlib
import dataclasses
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mlplatform.emotion.labels import EMOTIONS, MAX_INTENSITY, NUM_EMOTIONS, Target

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test", "unseen")
"""``unseen``: every sentence of writers held out of the other splits, to score a model on people it never read."""
NEAR_DUPLICATE_JACCARD = 0.5
"""Character 5-gram Jaccard similarity from which two texts of different splits count as one sentence reworded."""


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class EmotionExample:
    """One text with its writer and the intensity (0-3) of each of the eight emotions."""

    text: str
    writer: str
    split: str
    intensity: tuple[float, ...]

    @property
    def dominant(self) -> int:
        """Index of the strongest emotion (the first one on a tie)."""
        return int(np.argmax(self.intensity))


def bundled_corpus_dir() -> Path:
    """The folder of JSONL files shipped inside the package."""
    return Path(str(resources.files("mlplatform.emotion") / "corpus"))


def load_corpus(path: str | Path | None = None) -> list[EmotionExample]:
    """Read labelled JSONL (the bundled corpus by default): a file or every ``*.jsonl`` in a folder.

    Each line: ``{"text": ..., "writer": ..., "split": "train|dev|test|unseen", "intensity": {emotion: 0-3}}``.

    Raises:
        DataError: a line is not JSON, misses a field, names an unknown emotion or split, has an
            intensity outside 0-3 or no emotion at all, or repeats a text (see :func:`check_no_repeats`);
            the message gives the file and line number.
        FileNotFoundError: the path does not exist.
    """
    path = Path(path) if path is not None else bundled_corpus_dir()
    if not path.exists():
        raise FileNotFoundError(f"no corpus at {str(path)!r}")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    located = [pair for file in files for pair in _read_jsonl(file)]
    check_no_repeats(located)
    return [example for _, example in located]


def bundled_unlabelled_dir() -> Path:
    """The unlabelled corpus shipped inside the package."""
    return Path(str(resources.files("mlplatform.emotion") / "unlabelled"))


def load_unlabelled(path: str | Path | None) -> tuple[list[str], dict[str, object]]:
    """The corpus' non-empty lines, and its provenance: files, line count and the SHA-256 of the texts in order.

    Raises:
        FileNotFoundError: nothing there.
    """
    path = Path(path) if path is not None else bundled_unlabelled_dir()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no unlabelled corpus at {str(path)!r}")
    texts = [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return texts, {"files": [f.name for f in files], "texts": len(texts), "sha256": digest}


def check_no_repeats(located: Sequence[tuple[str, EmotionExample]]) -> None:
    """Refuse a text seen twice, and a text of one split nearly the same as one of another.

    Either would score a model on sentences it trained on. ``located`` pairs each example with
    where it was read ("file:line"). Near means a character 5-gram Jaccard similarity of at least
    :data:`NEAR_DUPLICATE_JACCARD` (spaces ignored); within one split, rewordings are allowed.

    Raises:
        DataError: naming both places.
    """
    first_seen: dict[str, str] = {}
    holders: defaultdict[str, list[int]] = defaultdict(list)  # 5-gram -> positions of the texts holding it
    grams_of: list[set[str]] = []
    for position, (where, example) in enumerate(located):
        key = "".join(example.text.split())
        if key in first_seen:
            raise DataError(f"{where}: the same text as {first_seen[key]}")
        first_seen[key] = where
        grams = {key[i:i + 5] for i in range(max(1, len(key) - 4))}
        shared = Counter(other for gram in grams for other in holders[gram])
        for other, count in shared.items():
            # |A & B| / |A | B| >= t needs |A & B| >= t |A|: the rest cannot reach the threshold
            if count < NEAR_DUPLICATE_JACCARD * len(grams) or located[other][1].split == example.split:
                continue
            similarity = count / len(grams | grams_of[other])
            if similarity >= NEAR_DUPLICATE_JACCARD:
                raise DataError(f"{where}: nearly the same text as {located[other][0]} (5-gram Jaccard {similarity:.2f}) "
                                f"in split {located[other][1].split}, while this one is in {example.split}")
        grams_of.append(grams)
        for gram in grams:
            holders[gram].append(position)


def _read_jsonl(file: Path) -> Iterable[tuple[str, EmotionExample]]:
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
                intensity = record["intensity"]
                unknown = set(intensity) - set(EMOTIONS)
                if unknown:
                    raise DataError(f"{where}: unknown emotion {sorted(unknown)[0]!r}; expected {', '.join(EMOTIONS)}")
                example = _example(record["text"], str(record["writer"]), record["split"],
                                   [intensity.get(e, 0) for e in EMOTIONS], where)
                if max(example.intensity) == 0:
                    raise DataError(f"{where}: no emotion above 0; a labelled line needs at least one")
                yield where, example
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            except KeyError as e:
                raise DataError(f"{where}: missing field {e.args[0]!r}") from None


def load_wrime_tsv(path: str | Path, *, annotator: str = "readers") -> list[EmotionExample]:
    """Read WRIME's own TSV (ver1 or ver2), mapping columns by their header names.

    WRIME has a column per emotion for the writer (``Writer_Joy``), each of three readers
    (``Reader1_Joy``) and their average (``Avg. Readers_Joy``), plus ``Sentence``, ``UserID`` and
    ``Train/Dev/Test``.

    Args:
        path: the TSV file.
        annotator: ``"readers"`` (the readers' average, WRIME's objective labels) or ``"writer"``.

    Raises:
        DataError: a required column is missing or a row is malformed (file and line named).
    """
    prefix = {"readers": "Avg. Readers_", "writer": "Writer_"}.get(annotator)
    if prefix is None:
        raise ValueError(f"annotator must be 'readers' or 'writer', got {annotator!r}")
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = ["Sentence", "UserID", "Train/Dev/Test"] + [prefix + e.capitalize() for e in EMOTIONS]
        missing = [c for c in columns if c not in (rows.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: not a WRIME TSV, missing column {missing[0]!r}")
        examples = []
        for number, row in enumerate(rows, start=2):
            where = f"{path}:{number}"
            try:
                values = [float(row[prefix + e.capitalize()]) for e in EMOTIONS]
            except (TypeError, ValueError):
                raise DataError(f"{where}: intensities must be numbers") from None
            examples.append(_example(row["Sentence"], row["UserID"], row["Train/Dev/Test"].lower(), values, where))
    return examples


def _example(text: Any, writer: str, split: Any, values: Sequence[Any], where: str) -> EmotionExample:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty text")
    if split not in SPLITS:
        raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if any(not isinstance(v, (int, float)) or not 0 <= v <= MAX_INTENSITY for v in values):
        raise DataError(f"{where}: intensities must be numbers from 0 to {MAX_INTENSITY}, got {list(values)}")
    return EmotionExample(text.strip(), writer, split, tuple(float(v) for v in values))


def targets_of(examples: Sequence[EmotionExample], target: Target, *, soft: bool = False) -> np.ndarray:
    """Training targets: class index (single), presence 0/1 per emotion (multi), or raw 0-3 (intensity).

    With ``soft``, the single target is instead the intensities normalised to sum to one (a
    distribution over the eight emotions whose argmax is still the dominant one).
    """
    intensity = np.array([e.intensity for e in examples], dtype=np.float32).reshape(-1, NUM_EMOTIONS)
    if target == "single":
        return intensity / intensity.sum(axis=1, keepdims=True) if soft else intensity.argmax(axis=1)
    if target == "multi":
        return (intensity >= 1).astype(np.float32)
    return intensity


def truncate(ids: list[int], max_length: int) -> list[int]:
    """Cut token ids to ``max_length``, keeping the closing [SEP] as the model always sees it."""
    return ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:]


class EmotionDataset(torch.utils.data.Dataset):
    """Texts tokenized once, without padding; :class:`EmotionCollator` pads each batch to its longest.

    For the single-label target, texts with no emotion at all (every intensity 0, common in
    WRIME) have no dominant emotion and are left out; the count is logged.

    Args:
        examples: labelled texts.
        tokenizer: a Japanese tokenizer from :mod:`mlplatform.emotion.tokenizer`.
        target: ``"single"``, ``"multi"`` or ``"intensity"``.
        max_length: longer texts are truncated (a warning says how many, once).
        soft_labels: single target only: the normalised intensities instead of the class index.
    """

    def __init__(
        self,
        examples: Sequence[EmotionExample],
        tokenizer: PreTrainedTokenizerBase,
        *,
        target: Target = "single",
        max_length: int = 128,
        soft_labels: bool = False,
    ) -> None:
        if target == "single":
            kept = [e for e in examples if max(e.intensity) > 0]
            if len(kept) < len(examples):
                log.info("left out %d texts with no emotion from a single-label dataset", len(examples) - len(kept))
            examples = kept
        self.examples = list(examples)
        self.target = target
        texts = [e.text for e in self.examples]
        encoded = tokenizer(texts, truncation=False)["input_ids"] if texts else []
        too_long = sum(len(ids) > max_length for ids in encoded)
        if too_long:
            log.warning("%d of %d texts are longer than %d tokens and were truncated", too_long, len(encoded), max_length)
        self.input_ids = [truncate(ids, max_length) for ids in encoded]
        self.labels = targets_of(self.examples, target, soft=soft_labels)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


@dataclasses.dataclass
class EmotionCollator:
    """Pads a batch only to its own longest text (the sketch padded the whole set to the maximum).

    Args:
        pad_token_id: the tokenizer's padding id.
        pad_to_multiple_of: round the padded length up (8 suits tensor cores); 1 disables.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in batch)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            ids = item["input_ids"]
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = torch.as_tensor(np.stack([item["labels"] for item in batch]))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
