"""What a federation trains: the ``FederatedTask`` base and two tasks on the emotion corpus (tiny n-gram, BERT)."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.metrics import f1_score
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from mlplatform.emotion.data import EmotionCollator, EmotionDataset, EmotionExample, load_corpus
from mlplatform.emotion.labels import NUM_EMOTIONS
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.tokenizer import load_tokenizer
from mlplatform.emotion.writers import PRIVATE_TEST, save_provenance
from mlplatform.storage import PortableFolder, local_path

if TYPE_CHECKING:  # MLflow is imported only where a registry version is used
    from mlplatform.mlops.registry import RegistrySource

Batch = dict[str, torch.Tensor]
EVALUATION_SPLITS = ("dev", "test", PRIVATE_TEST)
"""Held-out splits a task may score on (the private writers' test only in a run over private writers)."""
Source = Union[PortableFolder, "RegistrySource", str]
"""Where a tokenizer or model comes from, in a form every node can use: carried files, a registry version, a hub name."""


class FederatedTask(ABC):
    """A model and its data, built once inside each client actor and on the server; only weights travel per round.

    A task is picklable and carries everything by value (the labelled examples, the tokenizer's and a
    model's files, or a registry version any node downloads), so a client actor on another node never
    reads the driver's disk; what is derived from it (features, tokenized datasets) is built lazily,
    where it is used. Clients see the training split by index (their partition); the server
    evaluates on a held-out split.
    """

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model whose forward takes a batch's tensors and returns ``loss`` and ``logits``."""

    @abstractmethod
    def train_examples(self) -> list[EmotionExample]:
        """The training split; partitions index into it."""

    @abstractmethod
    def dataset(self, split: str, indices: np.ndarray | None = None) -> torch.utils.data.Dataset:
        """Examples of ``split`` (all, or those at ``indices`` of the training split) ready for :meth:`loader`."""

    def collate(self, batch: list[Any]) -> Batch:
        """Stack a list of dataset items into one batch (default: torch's own)."""
        return torch.utils.data.default_collate(batch)

    def loader(self, dataset: torch.utils.data.Dataset, *, batch_size: int, seed: int | None = None) -> torch.utils.data.DataLoader:
        """Batches of ``dataset``, shuffled by ``seed`` when given (training), in order otherwise (evaluation)."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=seed is not None,
                                           generator=generator, collate_fn=self.collate)

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write ``model`` to ``folder`` (default: its state dict, loadable with ``torch.load(weights_only=True)``)."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "model.pt")

    def train_labels(self) -> np.ndarray:
        """Dominant emotion of each training example (Dirichlet label skew partitions on it)."""
        return np.array([e.dominant for e in self.train_examples()])

    def train_writers(self) -> list[str]:
        """Writer id of each training example (the by-writer partition)."""
        return [e.writer for e in self.train_examples()]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", *, batch_size: int = 128) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of ``model`` on a split."""
        model.eval()
        losses, predicted, truth = [], [], []
        for batch in self.loader(self.dataset(split), batch_size=batch_size):
            output = model(**batch)
            losses.append(output.loss.item() * len(batch["labels"]))
            predicted.append(output.logits.argmax(dim=-1).numpy())
            truth.append(batch["labels"].numpy())
        model.train()
        predicted_all, truth_all = np.concatenate(predicted), np.concatenate(truth)
        return {"loss": float(np.sum(losses) / len(truth_all)),
                "accuracy": float((predicted_all == truth_all).mean()),
                "macro_f1": float(f1_score(truth_all, predicted_all, average="macro", zero_division=0))}


class CorpusTask(FederatedTask, ABC):
    """A task on labelled emotion examples (texts with no emotion at all have no label and are left out)."""

    examples: tuple[EmotionExample, ...]

    @functools.cached_property
    def _examples(self) -> list[EmotionExample]:
        return [e for e in self.examples if max(e.intensity) > 0]

    @functools.cached_property
    def splits(self) -> tuple[str, ...]:
        """The splits this task holds: train, dev, test, and the private writers' test in a run over them."""
        return tuple(split for split in ("train", *EVALUATION_SPLITS) if any(e.split == split for e in self._examples))


class NgramClassifier(nn.Module):
    """Softmax regression on hashed character n-grams: the tiny model that keeps federated tests fast."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, NUM_EMOTIONS)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.linear(features)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features, self.labels = torch.from_numpy(features), torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}


class NgramTask(CorpusTask):
    """The emotion corpus as hashed character 1-3-grams (stateless hashing, so no vocabulary leaks between clients).

    Args:
        examples: the labelled texts of every split; None reads the bundled corpus.
        num_features: hash buckets (the model has ``8 * num_features`` weights plus 8 biases).
    """

    def __init__(self, *, examples: Sequence[EmotionExample] | None = None, num_features: int = 4096) -> None:
        self.examples = tuple(examples if examples is not None else load_corpus())
        self.num_features = num_features

    @functools.cached_property
    def _features(self) -> dict[str, _Labelled]:
        hashing = HashingVectorizer(analyzer="char", ngram_range=(1, 3), n_features=self.num_features,
                                    alternate_sign=False, norm="l2")
        splits = {}
        for split in self.splits:
            examples = [e for e in self._examples if e.split == split]
            features = hashing.transform([e.text for e in examples]).toarray().astype(np.float32)
            splits[split] = _Labelled(features, np.array([e.dominant for e in examples], dtype=np.int64))
        return splits

    def build_model(self) -> nn.Module:
        return NgramClassifier(self.num_features)

    def train_examples(self) -> list[EmotionExample]:
        return [e for e in self._examples if e.split == "train"]

    def dataset(self, split: str, indices: np.ndarray | None = None) -> torch.utils.data.Dataset:
        data = self._features[split]
        return data if indices is None else torch.utils.data.Subset(data, indices.tolist())

    def __getstate__(self) -> dict[str, Any]:  # ship the examples only; features are rebuilt where they are used
        return {"examples": self.examples, "num_features": self.num_features}


class EmotionTask(CorpusTask):
    """The emotion classifier (:class:`~mlplatform.emotion.model.EmotionClassifier`) on the labelled corpus.

    Args:
        tokenizer: the tokenizer's files (:class:`~mlplatform.storage.PortableFolder`), a registry version
            whose model folder holds it, or a hub name.
        model: a saved emotion model or encoder to fine-tune, in the same forms; None builds the small
            default BERT from a config.
        examples: the labelled texts of every split; None reads the bundled corpus.
        max_length: tokens per text.
        model_options: ``EmotionClassifier.from_config`` sizes for the default model.
        train_head_only: freeze the encoder and federate only the classification head. Under DP this
            matters: the noise's norm grows with the square root of the trained weights' count.
        provenance: whose texts the starting model and vocabulary learnt from (saved with the model).
    """

    def __init__(self, *, tokenizer: Source, model: Source | None = None, examples: Sequence[EmotionExample] | None = None,
                 max_length: int = 128, model_options: dict[str, Any] | None = None,
                 train_head_only: bool = False, provenance: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.examples = tuple(examples if examples is not None else load_corpus())
        self.max_length = max_length
        self.model_options = dict(model_options or {})
        self.train_head_only = train_head_only
        self.provenance = provenance

    @functools.cached_property
    def _tokenizer(self) -> Any:
        return load_tokenizer(local_path(self.tokenizer))

    @functools.cached_property
    def _collator(self) -> EmotionCollator:
        return EmotionCollator(pad_token_id=self._tokenizer.pad_token_id)

    @functools.cached_property
    def _splits(self) -> dict[str, EmotionDataset]:
        return {split: EmotionDataset([e for e in self._examples if e.split == split], self._tokenizer,
                                      target="single", max_length=self.max_length)
                for split in self.splits}

    def build_model(self) -> nn.Module:
        if self.model is not None:
            model = EmotionClassifier.from_pretrained(local_path(self.model), target="single")
        else:
            model = EmotionClassifier.from_config(self._tokenizer, target="single", max_length=self.max_length,
                                                  **self.model_options)
        if self.train_head_only:
            for name, parameter in model.named_parameters():
                parameter.requires_grad = name.startswith("model.classifier.")
        return model

    def train_examples(self) -> list[EmotionExample]:
        return self._splits["train"].examples

    def dataset(self, split: str, indices: np.ndarray | None = None) -> torch.utils.data.Dataset:
        data = self._splits[split]
        return data if indices is None else torch.utils.data.Subset(data, indices.tolist())

    def collate(self, batch: list[Any]) -> Batch:
        return self._collator(batch)

    def save(self, model: nn.Module, folder: Path) -> None:
        """``save_pretrained`` of the model and its tokenizer: the folder loads with ``EmotionClassifier.from_pretrained``.

        The provenance saved beside them is the starting point's: what a DP run added is protected, not recorded."""
        model.save_pretrained(folder)
        self._tokenizer.save_pretrained(folder)
        if self.provenance is not None:
            save_provenance(folder, self.provenance)

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "model": self.model, "examples": self.examples,
                "max_length": self.max_length, "model_options": self.model_options,
                "train_head_only": self.train_head_only, "provenance": self.provenance}
