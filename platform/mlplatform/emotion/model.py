"""EmotionClassifier: a BERT-family sequence classifier with a single-label, multi-label or intensity head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from mlplatform.emotion.labels import EMOTIONS, NUM_EMOTIONS, MAX_INTENSITY, Target

PROBLEM_TYPES: dict[str, str] = {
    "single": "single_label_classification",
    "multi": "multi_label_classification",
    "intensity": "regression",
}
TARGETS = {problem: target for target, problem in PROBLEM_TYPES.items()}


class EmotionClassifier(nn.Module):
    """Wraps ``AutoModelForSequenceClassification``; the target decides the loss and the outputs.

    ``single`` is softmax cross-entropy over the dominant emotion, ``multi`` a sigmoid per emotion
    present (intensity >= 1), ``intensity`` a regression on each emotion's 0-3 intensity. The
    target is stored in the model config's ``problem_type``, so a saved model loads back as itself.

    Args:
        model: a sequence-classification model with eight outputs.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if model.config.num_labels != NUM_EMOTIONS:
            raise ValueError(f"an emotion model needs {NUM_EMOTIONS} outputs, got {model.config.num_labels}")
        self.model = model
        self.target: Target = TARGETS[model.config.problem_type]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, target: Target = "single", **config: object) -> EmotionClassifier:
        """A saved emotion model, or any BERT-family encoder (hub name or folder) given a new eight-way head.

        Raises:
            FileNotFoundError: nothing loadable there (offline, a hub name must be cached).
        """
        try:
            found = AutoConfig.from_pretrained(str(name_or_path))
            if found.num_labels == NUM_EMOTIONS and found.problem_type in TARGETS:
                model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), **config)
            else:  # a plain encoder (hub BERT, MLM pre-training): a fresh eight-way head on top
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(name_or_path), num_labels=NUM_EMOTIONS, problem_type=PROBLEM_TYPES[target],
                    id2label=dict(enumerate(EMOTIONS)), label2id={e: i for i, e in enumerate(EMOTIONS)}, **config,
                )
        except OSError as e:
            raise FileNotFoundError(f"no model at {str(name_or_path)!r}: {str(e).splitlines()[0]}") from None
        return cls(model)

    @classmethod
    def from_config(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        *,
        target: Target = "single",
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.1,
        max_length: int = 128,
    ) -> EmotionClassifier:
        """A small BERT built from a config (the offline default), sized to the tokenizer's vocabulary."""
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=4 * hidden_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=NUM_EMOTIONS,
            problem_type=PROBLEM_TYPES[target],
            id2label=dict(enumerate(EMOTIONS)),
            label2id={e: i for i, e in enumerate(EMOTIONS)},
        )
        return cls(AutoModelForSequenceClassification.from_config(config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """The Hugging Face output: ``logits`` (B, 8) and, given labels, the target's ``loss``.

        For the single target, ``labels`` may also be a (B, 8) distribution (soft labels); the
        loss is then the cross-entropy against it.
        """
        if self.target == "single" and labels is not None and labels.is_floating_point():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return SequenceClassifierOutput(loss=nn.functional.cross_entropy(logits.float(), labels), logits=logits)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (single: softmax, multi: sigmoid) or intensities clamped to 0-3."""
        if self.target == "single":
            return logits.softmax(dim=-1)
        if self.target == "multi":
            return logits.sigmoid()
        return logits.clamp(0.0, MAX_INTENSITY)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write weights (safetensors) and config; load back with :meth:`from_pretrained`."""
        self.model.save_pretrained(folder)
