"""Masked-language-model pre-training of the small BERT on the project's unlabelled Japanese corpus: the default encoder.

Devlin et al. 2019 (arXiv:1810.04805), the MLM half: 15% of the tokens are chosen, 80% of those
replaced by [MASK], 10% by a random token, 10% kept, and the model predicts them all. The corpus
(``unlabelled/*.txt``, one text per line) was written for the project by writers outside the
labelled corpus, so an encoder pre-trained on it has seen none of the emotion data's texts.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pydantic
import torch
from pydantic.dataclasses import dataclass
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

from mlplatform.config import RUN_CONFIG, config_to_dict
from mlplatform.emotion.data import load_unlabelled
from mlplatform.emotion.progress import ProgressLine
from mlplatform.emotion.tokenizer import train_tokenizer
from mlplatform.emotion.train import make_optimizer, train_one_epoch
from mlplatform.emotion.wordvectors import initial_embeddings

PROVENANCE_FILE = "pretraining.json"
"""Beside an encoder's weights: the corpus it was pre-trained on (files, lines, SHA-256) and the config."""


@dataclass(config=RUN_CONFIG)
class PretrainConfig:
    """One MLM pre-training of the small BERT; every field can be set from YAML or ``--set key=value``."""

    corpus: str | None = None
    """Text file or folder of ``*.txt`` files, one text per line; None uses the bundled unlabelled corpus."""
    vocab_size: int = pydantic.Field(8000, ge=100)
    """Bound of the WordPiece vocabulary learnt on the corpus."""
    hidden_size: int = pydantic.Field(128, ge=8)
    """Width of the encoder."""
    num_layers: int = pydantic.Field(2, ge=1)
    """Transformer layers."""
    num_heads: int = pydantic.Field(4, ge=1)
    """Attention heads (must divide hidden_size)."""
    max_length: int = pydantic.Field(128, ge=8)
    """Tokens per text; longer texts are truncated."""
    word_vectors: str = "ginza"
    """Starting word embeddings: ginza (ja-ginza's vectors, see mlplatform.emotion.wordvectors) or none."""
    epochs: int = pydantic.Field(8, ge=1)
    """Passes over the corpus."""
    batch_size: int = pydantic.Field(64, ge=1)
    """Texts per batch."""
    learning_rate: float = pydantic.Field(1e-3, gt=0.0)
    """Peak AdamW learning rate, reached at the end of warmup, then linear decay to zero."""
    warmup_ratio: float = pydantic.Field(0.06, ge=0.0, lt=1.0)
    """Share of all batches spent warming the learning rate up from zero."""
    weight_decay: float = pydantic.Field(0.01, ge=0.0)
    """AdamW weight decay (never on biases or LayerNorm weights)."""
    mask_probability: float = pydantic.Field(0.15, gt=0.0, lt=1.0)
    """Share of tokens the model must predict."""
    seed: int = 0
    """Seed for initialisation, masking and shuffling."""
    progress_interval_s: float = pydantic.Field(10.0, ge=0.0)
    """Seconds between progress lines within an epoch; 0 prints none."""


def pretrain_encoder(config: PretrainConfig, out_dir: str | Path) -> dict[str, float]:
    """Learn a vocabulary on the corpus, pre-train the encoder with MLM, and save both with ``save_pretrained``.

    Returns:
        The last epoch's mean MLM loss, the loss on 2% of the texts held out (before and after), and the seconds taken.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    texts, provenance = load_unlabelled(config.corpus)
    tokenizer = train_tokenizer(texts, out_dir, vocab_size=config.vocab_size, model_max_length=config.max_length)
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=4 * config.hidden_size,
        max_position_embeddings=config.max_length, pad_token_id=tokenizer.pad_token_id))
    if config.word_vectors == "ginza":
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(torch.from_numpy(
                initial_embeddings(tokenizer, texts, config.hidden_size, seed=config.seed)))
    encoded = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    held_out = encoded[:: 50]  # 2%, to see the encoder generalise rather than memorise
    training = [ids for i, ids in enumerate(encoded) if i % 50]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mask_probability, return_tensors="pt")
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader([{"input_ids": ids} for ids in training], batch_size=config.batch_size,
                                         shuffle=True, collate_fn=collator, generator=generator)
    optimizer, scheduler = make_optimizer(model, config, total_batches=config.epochs * len(loader))
    initial_loss = masked_loss(model, collator, held_out, config.seed)
    progress = ProgressLine(epochs=config.epochs, batches=len(loader), interval_s=config.progress_interval_s,
                            score_name="held-out MLM loss")
    for epoch in range(1, config.epochs + 1):
        train_loss = train_one_epoch(model, loader, optimizer, scheduler, max_grad_norm=1.0, bf16=False,
                                     on_batch=functools.partial(progress.batch_done, epoch))
        held_out_loss = masked_loss(model, collator, held_out, config.seed)
        progress.epoch_done(epoch, held_out_loss)
    model.save_pretrained(out_dir)
    metrics = {"train_mlm_loss": train_loss, "held_out_mlm_loss": held_out_loss, "initial_held_out_mlm_loss": initial_loss,
               "seconds": time.perf_counter() - started}
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(
        {"corpus": provenance, "config": config_to_dict(config), "metrics": metrics}, indent=1), encoding="utf-8")
    return metrics


def masked_loss(model: BertForMaskedLM, collator: DataCollatorForLanguageModeling, encoded: Sequence[list[int]], seed: int) -> float:
    """Mean MLM loss over ``encoded`` with a fixed masking, so epochs compare."""
    model.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(), torch.no_grad():  # the training's own random stream goes on untouched
        torch.manual_seed(seed)
        for start in range(0, len(encoded), 128):
            batch = collator([{"input_ids": ids} for ids in encoded[start:start + 128]])
            total += model(**batch).loss.item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
    model.train()
    return total / max(count, 1)
