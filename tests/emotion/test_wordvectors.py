"""The default model's starting word embeddings: ja-ginza's vectors, found through MeCab's forms and projected by PCA."""

from pathlib import Path

import numpy as np
import pytest

from mlplatform.emotion.tokenizer import train_tokenizer
from mlplatform.emotion.train import EmotionConfig, prepare_inputs
from mlplatform.emotion.wordvectors import INITIAL_STD, WordVectors, initial_embeddings, vocabulary_rows

TEXTS = ["今日は嬉しい日だった", "旅行が楽しい", "別れが悲しい", "ケーキを食べた"]
MINI = str(Path(__file__).parent / "data" / "mini.jsonl")


@pytest.fixture(scope="module")
def vectors():
    return WordVectors.load_ginza()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tokenizer"), vocab_size=200)


def test_a_token_is_looked_up_as_written_then_by_its_dictionary_form(vectors, tokenizer):
    rows = vocabulary_rows(tokenizer, TEXTS, vectors)
    vocab = tokenizer.get_vocab()
    for word in ("嬉しい", "楽しい", "悲しい", "ケーキ"):
        assert rows[vocab[word]] == vectors.row_of(word) >= 0
    assert vectors.row_of("食べ") == -1 and rows[vocab["食べ"]] == vectors.row_of("食べる") >= 0  # a conjugated surface
    assert all(rows[vocab[special]] == -1 for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))


def test_known_tokens_start_at_their_vectors_projected_and_the_rest_at_random(vectors, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    width = 64  # more than the tokens that have a vector, so the PCA loses nothing and angles are kept
    table = initial_embeddings(tokenizer, TEXTS, width, seed=0)
    assert table.shape == (len(tokenizer), width) and table.dtype == np.float32
    rows = vocabulary_rows(tokenizer, TEXTS, vectors)
    known = np.flatnonzero(rows >= 0)
    assert 4 <= len(known) < width
    original = vectors.vectors[rows[known]]
    centred = original - original.mean(axis=0)
    projected = table[known].astype(np.float64)
    scale_squared = np.trace(projected @ projected.T) / np.trace(centred @ centred.T)
    # a rotation then one scale: every dot product between the known tokens is the vectors' own, times that scale
    np.testing.assert_allclose(projected @ projected.T, scale_squared * (centred @ centred.T), rtol=1e-3, atol=1e-3 * INITIAL_STD**2)
    components = projected[:, projected.any(axis=0)]  # the width beyond the vectors' own rank is zero-padded
    assert components.std() == pytest.approx(INITIAL_STD, rel=1e-3)
    assert not table[tokenizer.pad_token_id].any()
    unknown = np.setdiff1d(np.flatnonzero(rows < 0), [tokenizer.pad_token_id])
    assert table[unknown].std() == pytest.approx(INITIAL_STD, rel=0.3)
    np.testing.assert_array_equal(initial_embeddings(tokenizer, TEXTS, width, seed=0), table)  # read back from the cache
    assert list((tmp_path / "wordvectors").glob("ginza-*.npy"))


def test_the_default_model_gets_them_and_word_vectors_none_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    tiny = {"corpus": MINI, "teacher": "none", "hidden_size": 32, "num_heads": 2, "vocab_size": 300}
    inputs, _ = prepare_inputs(EmotionConfig(**tiny))
    assert inputs.word_embeddings is not None and inputs.word_embeddings.shape[1] == 32
    assert prepare_inputs(EmotionConfig(**tiny, word_vectors="none"))[0].word_embeddings is None
