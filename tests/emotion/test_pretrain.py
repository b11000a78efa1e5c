"""MLM pre-training of the default encoder: the unlabelled corpus it reads, what it saves, and that it learns."""

import json
import math

import pytest
import torch
from transformers import BertForMaskedLM

from mlplatform.emotion.data import EmotionExample, check_no_repeats, load_corpus, load_unlabelled
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.pretrain import PROVENANCE_FILE, PretrainConfig, pretrain_encoder


def test_the_bundled_unlabelled_corpus_is_large_and_shares_no_text_with_the_labelled_one():
    texts, provenance = load_unlabelled(None)
    assert len(texts) >= 20_000 and provenance["texts"] == len(texts) and len(provenance["files"]) == 8
    assert len(set(texts)) == len(texts)
    labelled = [(f"corpus:{i}", e) for i, e in enumerate(load_corpus())]
    unlabelled = [(f"unlabelled:{i}", EmotionExample(t, "-", "unlabelled", (1.0,) + (0.0,) * 7)) for i, t in enumerate(texts)]
    check_no_repeats(labelled + unlabelled)  # no labelled text, in any split, nearly the same as one pre-trained on


def test_a_small_pretraining_learns_and_saves_an_encoder_the_classifier_loads(tmp_path):
    corpus = tmp_path / "texts.txt"
    texts, _ = load_unlabelled(None)
    corpus.write_text("\n".join(texts[:400]), encoding="utf-8")
    config = PretrainConfig(corpus=str(corpus), vocab_size=500, hidden_size=32, num_layers=1, num_heads=2, epochs=3,
                            batch_size=32, learning_rate=3e-3, progress_interval_s=0.0)
    metrics = pretrain_encoder(config, tmp_path / "encoder")
    assert metrics["initial_held_out_mlm_loss"] > math.log(500) - 0.5  # the untrained encoder guesses among the vocabulary
    assert metrics["held_out_mlm_loss"] < metrics["initial_held_out_mlm_loss"] - 0.5  # on texts it never trained on
    provenance = json.loads((tmp_path / "encoder" / PROVENANCE_FILE).read_text())
    assert provenance["corpus"] == load_unlabelled(corpus)[1] and provenance["config"]["hidden_size"] == 32
    classifier = EmotionClassifier.from_pretrained(tmp_path / "encoder")  # a fresh eight-way head on the encoder
    encoder = BertForMaskedLM.from_pretrained(tmp_path / "encoder").bert
    assert classifier.model.config.num_labels == 8
    for name, weight in encoder.encoder.state_dict().items():
        assert torch.equal(classifier.model.bert.encoder.state_dict()[name], weight), name


def test_a_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no unlabelled corpus"):
        load_unlabelled(tmp_path / "nothing")
