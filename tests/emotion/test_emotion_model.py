"""EmotionClassifier: heads per target, and loading a plain pre-trained encoder as a hub model would be."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from mlplatform.emotion.model import EmotionClassifier


@pytest.fixture
def encoder_folder(tmp_path):
    """A small BERT encoder saved in Hugging Face format, like cl-tohoku/bert-base-japanese-v3 (no head)."""
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("target", "problem"), [("single", "single_label_classification"),
                                                  ("multi", "multi_label_classification"),
                                                  ("intensity", "regression")])
def test_a_plain_encoder_gets_an_eight_way_head_for_each_target(encoder_folder, target, problem):
    classifier = EmotionClassifier.from_pretrained(encoder_folder, target=target)
    assert classifier.target == target and classifier.model.config.problem_type == problem
    ids = torch.tensor([[2, 10, 11, 3]])
    logits = classifier(ids, torch.ones_like(ids)).logits
    assert logits.shape == (1, 8)
    scores = classifier.scores(logits)
    if target == "single":
        assert scores.sum().item() == pytest.approx(1.0, abs=1e-6)
    elif target == "multi":
        assert ((scores > 0) & (scores < 1)).all()
    else:
        assert ((scores >= 0) & (scores <= 3)).all()


def test_the_encoder_weights_are_kept_and_a_saved_model_loads_as_itself(encoder_folder, tmp_path):
    classifier = EmotionClassifier.from_pretrained(encoder_folder, target="multi")
    encoder = BertForMaskedLM.from_pretrained(encoder_folder)
    torch.testing.assert_close(classifier.model.bert.embeddings.word_embeddings.weight,
                               encoder.bert.embeddings.word_embeddings.weight)
    classifier.save_pretrained(tmp_path / "saved")
    again = EmotionClassifier.from_pretrained(tmp_path / "saved")  # the target comes back from the config
    assert again.target == "multi"
    torch.testing.assert_close(again.model.classifier.weight, classifier.model.classifier.weight)


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        EmotionClassifier.from_pretrained(tmp_path / "nothing-here")


def test_single_target_takes_a_soft_label_distribution(encoder_folder):
    classifier = EmotionClassifier.from_pretrained(encoder_folder, target="single")
    input_ids, mask = torch.randint(5, 60, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    hard = classifier(input_ids, mask, labels=torch.tensor([1, 3]))
    one_hot = classifier(input_ids, mask, labels=torch.nn.functional.one_hot(torch.tensor([1, 3]), 8).float())
    assert one_hot.loss.item() == pytest.approx(hard.loss.item(), rel=1e-5)  # one-hot soft labels = hard labels
    soft = classifier(input_ids, mask, labels=torch.full((2, 8), 1 / 8))
    assert soft.loss.item() == pytest.approx(-hard.logits.log_softmax(-1).mean(-1).mean().item(), rel=1e-5)
