"""Whose texts a model learnt from: a corpus' public and private writers, and the provenance a trained model records."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from mlplatform.emotion.data import DataError, EmotionExample, bundled_corpus_dir

WriterGroup = Literal["all", "public", "private"]
GROUPS_FILE = "writer_groups.json"
"""Beside a corpus' JSONL files: ``{"public": [writer ids], "private": [writer ids]}``."""
PRIVATE_TEST = "private_test"
"""The private writers' test split, as a federated run over them names it."""
PROVENANCE_FILE = "provenance.json"
"""In a model folder: the corpus and the writers whose texts trained it (its vocabulary included)."""


def load_writer_groups(corpus: str | Path | None = None) -> dict[str, str]:
    """Each writer's group, ``public`` or ``private``, from the corpus' :data:`GROUPS_FILE`.

    Public writers' texts may train anything (the vocabulary, the base model) and score it; private
    writers are the federated clients that a DP run protects, and the only ones it may train on.

    Raises:
        DataError: no groups file, or a writer in both groups.
    """
    folder = Path(corpus) if corpus is not None else bundled_corpus_dir()
    file = folder / GROUPS_FILE if folder.is_dir() else folder.with_name(GROUPS_FILE)
    if not file.is_file():
        raise DataError(f"{file}: missing; a corpus split by writer group needs it to say which writers are public "
                        f"and which private")
    try:
        listed = json.loads(file.read_text(encoding="utf-8"))
        public, private = set(listed["public"]), set(listed["private"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{file}: expected {{\"public\": [...], \"private\": [...]}} ({e})") from None
    if public & private:
        raise DataError(f"{file}: writers in both groups: {', '.join(sorted(public & private)[:5])}")
    return {writer: "public" for writer in public} | {writer: "private" for writer in private}


def select_writers(examples: Sequence[EmotionExample], corpus: str | Path | None, group: WriterGroup) -> list[EmotionExample]:
    """The examples of one writer group (all of them for ``all``).

    Raises:
        DataError: a writer of the corpus in neither group.
    """
    if group == "all":
        return list(examples)
    groups = load_writer_groups(corpus)
    unassigned = sorted({e.writer for e in examples} - groups.keys())
    if unassigned:
        raise DataError(f"writers in neither group of {GROUPS_FILE}: {', '.join(unassigned[:5])}")
    return [e for e in examples if groups[e.writer] == group]


def private_clients_view(examples: Sequence[EmotionExample], corpus: str | Path | None) -> tuple[list[EmotionExample], list[EmotionExample]]:
    """The data of a federated run over the private writers, and the public writers' training texts.

    The view holds the private writers' train split (the clients' data), the public writers' dev and
    test splits (evaluation, which then releases nothing private) and the private writers' own test
    split as :data:`PRIVATE_TEST` (a simulation measurement, outside any guarantee). The public
    training texts are what a vocabulary may be built from.
    """
    public, private = select_writers(examples, corpus, "public"), select_writers(examples, corpus, "private")
    view = [e for e in private if e.split == "train"] + [e for e in public if e.split in ("dev", "test")]
    view += [dataclasses.replace(e, split=PRIVATE_TEST) for e in private if e.split == "test"]
    return view, [e for e in public if e.split == "train"]


def provenance(examples: Iterable[EmotionExample], corpus: str | Path | None) -> dict[str, object]:
    """What a model trained on ``examples`` records: the corpus, its writers, and a hash of the texts in order."""
    chosen = list(examples)
    digest = hashlib.sha256("\n".join(f"{e.writer}\t{e.text}" for e in chosen).encode("utf-8")).hexdigest()
    return {"corpus": str(corpus) if corpus is not None else "bundled", "writers": sorted({e.writer for e in chosen}),
            "texts": len(chosen), "sha256": digest}


def inherited_provenance(record: dict[str, object], *sources: str | None) -> dict[str, object]:
    """``record`` with the writers of every local folder among ``sources`` (a tokenizer, a model to fine-tune) that has one."""
    writers = set(record["writers"])  # type: ignore[call-overload]
    for source in sources:
        earlier = load_provenance(source) if source is not None and Path(source).is_dir() else None
        writers |= set(earlier["writers"]) if earlier else set()  # type: ignore[call-overload]
    return record | {"writers": sorted(writers)}


def save_provenance(folder: Path, record: dict[str, object]) -> None:
    """Write :data:`PROVENANCE_FILE` into a model folder."""
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def load_provenance(folder: str | Path) -> dict[str, object] | None:
    """A model folder's recorded provenance, or None for one trained elsewhere (a hub model, an older folder)."""
    file = Path(folder) / PROVENANCE_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def provenance_tags(record: dict[str, object]) -> dict[str, str]:
    """The provenance as run and model-version tags (the writer list in full: MLflow keeps 5,000 characters)."""
    writers = list(record["writers"])  # type: ignore[call-overload]
    return {"provenance.corpus": str(record["corpus"]), "provenance.sha256": str(record["sha256"]),
            "provenance.texts": str(record["texts"]), "provenance.writer_count": str(len(writers)),
            "provenance.writers": ",".join(writers)}


def overlapping_writers(record: dict[str, object] | None, writers: Iterable[str]) -> list[str]:
    """The ``writers`` a model with provenance ``record`` already learnt from (none for a model without one)."""
    return sorted(set(record["writers"]) & set(writers)) if record else []  # type: ignore[call-overload]
