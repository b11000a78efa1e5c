"""Emotion data and tokenization: bundled corpus, WRIME columns, per-batch padding, MeCab + WordPiece."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertJapaneseTokenizer

from mlplatform.emotion.data import SPLITS, DataError, EmotionCollator, EmotionDataset, load_corpus, load_wrime_tsv
from mlplatform.emotion.labels import EMOTIONS, emotion_index
from mlplatform.emotion.tokenizer import train_tokenizer, word_split

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [e.text for e in load_corpus() if e.split == "train"]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=3000)


def test_bundled_corpus_is_large_balanced_and_well_formed():
    examples = load_corpus()
    assert len(examples) >= 5000
    dominant = Counter(EMOTIONS[e.dominant] for e in examples)
    assert set(dominant) == set(EMOTIONS) and min(dominant.values()) >= 0.1 * len(examples)
    assert len({e.text for e in examples}) == len(examples)
    writers = {split: {e.writer for e in examples if e.split == split} for split in SPLITS}
    assert len(set().union(*writers.values())) >= 120
    assert len(writers["unseen"]) >= 10 and not writers["unseen"] & (writers["train"] | writers["dev"] | writers["test"])
    splits = Counter(e.split for e in examples)
    assert splits["train"] > 0.7 * len(examples) and min(splits["dev"], splits["test"], splits["unseen"]) >= 400
    assert all(0 <= v <= 3 for e in examples for v in e.intensity) and all(max(e.intensity) >= 1 for e in examples)
    ties = sum(sorted(e.intensity)[-1] == sorted(e.intensity)[-2] for e in examples)
    assert ties < 0.1 * len(examples)  # a tie's dominant emotion is the first in EMOTIONS' order: few, so little skew


def test_tokenizer_splits_words_with_mecab_then_wordpiece(tokenizer):
    text = "明日の試験が怖くて眠れない"
    words = word_split([text])[0]
    pieces = tokenizer.tokenize(text)
    # every MeCab word is covered by its pieces, in order: WordPiece only splits inside words
    rebuilt, index = [], -1
    for piece in pieces:
        if piece.startswith("##"):
            rebuilt[index] += piece[2:]
        else:
            rebuilt.append(piece)
            index += 1
    assert [w if w in rebuilt else "[UNK]" for w in words] == rebuilt
    assert words == ["明日", "の", "試験", "が", "怖く", "て", "眠れ", "ない"]


def test_tokenizer_round_trips_through_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, BertJapaneseTokenizer)
    assert loaded.word_tokenizer_type == "mecab" and loaded.mecab_kwargs == {"mecab_dic": "unidic_lite"}
    text = "久しぶりに晴れて洗濯物がよく乾いた"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertJapaneseTokenizer"


def test_collator_pads_only_to_the_longest_in_the_batch(tokenizer):
    examples = load_corpus(DATA / "mini.jsonl")
    dataset = EmotionDataset(examples, tokenizer, max_length=128)
    lengths = [len(dataset[i]["input_ids"]) for i in range(4)]
    batch = EmotionCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, max(lengths)) < (4, 128)
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert batch["labels"].dtype == torch.long


def test_targets_for_each_head(tokenizer):
    examples = load_wrime_tsv(DATA / "wrime-sample.tsv")
    multi = EmotionDataset(examples, tokenizer, target="multi")
    intensity = EmotionDataset(examples, tokenizer, target="intensity")
    np.testing.assert_array_equal(multi.labels[0], [0, 1, 0, 1, 0, 1, 0, 0])  # readers' average >= 1
    np.testing.assert_allclose(intensity.labels[0], [0, 2.33, 0, 2.33, 0.33, 1.0, 0.67, 0], rtol=1e-5)


def test_soft_single_targets_are_the_normalised_intensities(tokenizer):
    examples = load_corpus(DATA / "mini.jsonl")
    soft = EmotionDataset(examples, tokenizer, soft_labels=True).labels
    assert soft.shape == (len(examples), 8) and np.allclose(soft.sum(axis=1), 1.0)
    assert soft.argmax(axis=1).tolist() == [e.dominant for e in examples]  # the argmax is still the class


def test_long_texts_are_truncated_keeping_the_closing_token(tokenizer, caplog):
    examples = load_corpus(DATA / "mini.jsonl")[:2]
    dataset = EmotionDataset(examples, tokenizer, max_length=8)
    assert all(len(ids) <= 8 and ids[-1] == tokenizer.sep_token_id for ids in dataset.input_ids)
    assert "longer than 8 tokens and were truncated" in caplog.text


def test_wrime_columns_map_by_name_for_readers_and_writer():
    readers = load_wrime_tsv(DATA / "wrime-sample.tsv")
    writer = load_wrime_tsv(DATA / "wrime-sample.tsv", annotator="writer")
    assert readers[0].text.startswith("車のタイヤがパンクしてた")
    assert readers[0].intensity == (0.0, 2.33, 0.0, 2.33, 0.33, 1.0, 0.67, 0.0)
    assert writer[0].intensity == (0.0, 3.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0)
    assert [e.split for e in readers] == ["train", "dev", "test"] and readers[2].writer == "2"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"writer": "w1", "split": "train", "intensity": {}}', r"bad\.jsonl:2: missing field 'text'"),
        ('{"text": " ", "writer": "w1", "split": "train", "intensity": {}}', r"bad\.jsonl:2: empty text"),
        ('{"text": "a", "writer": "w1", "split": "train", "intensity": {"happiness": 2}}', r"unknown emotion 'happiness'"),
        ('{"text": "a", "writer": "w1", "split": "train", "intensity": {"joy": 5}}', r"intensities must be numbers from 0 to 3"),
        ('{"text": "a", "writer": "w1", "split": "val", "intensity": {"joy": 1}}', r"split must be one of train, dev, test"),
        ('{"text": "a", "writer": "w1", "split": "train", "intensity": {"joy": 0}}', r"bad\.jsonl:2: no emotion above 0"),
        ('{"text": " よ し ", "writer": "w2", "split": "test", "intensity": {"joy": 1}}', r"bad\.jsonl:2: the same text as .*bad\.jsonl:1"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "よし", "writer": "w1", "split": "train", "intensity": {"joy": 1}}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_corpus(path)


def test_a_tsv_that_is_not_wrime_is_refused(tmp_path):
    path = tmp_path / "other.tsv"
    path.write_text("text\tlabel\nこんにちは\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match="not a WRIME TSV, missing column 'Sentence'"):
        load_wrime_tsv(path)


def test_unknown_emotion_names():
    assert emotion_index("信頼") == 7 and emotion_index("joy") == 0
    with pytest.raises(ValueError, match="unknown emotion 'happiness'"):
        emotion_index("happiness")


def test_preflight_says_what_to_install_when_unidic_lite_is_missing():
    # A real interpreter in which the unidic_lite package cannot be imported.
    script = "import sys; sys.modules['unidic_lite'] = None\n" \
             "from mlplatform.emotion.tokenizer import preflight_mecab\npreflight_mecab()"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "pip install fugashi unidic-lite" in result.stderr
    assert "full `unidic` package is not needed" in result.stderr


def test_a_test_sentence_reworded_from_a_training_one_is_refused_while_rewordings_within_a_split_are_kept(tmp_path):
    train = "駅前に新しくできたパン屋さん、クロワッサンが本当に美味しかった"
    reworded = "駅前に新しくできたパン屋さん、クロワッサンが本当に美味しかったよ！"
    other = "雨の日の通勤電車、傘の水が足にかかって朝から最悪"
    line = '{{"text": "{}", "writer": "w1", "split": "{}", "intensity": {{"joy": 2}}}}'
    (tmp_path / "a.jsonl").write_text(line.format(train, "train") + "\n" + line.format(other, "train") + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(line.format(reworded, "train") + "\n", encoding="utf-8")
    assert len(load_corpus(tmp_path)) == 3  # the same split: a rewording is more data, not a leak
    (tmp_path / "b.jsonl").write_text(line.format(reworded, "test") + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl:1: nearly the same text as .*a\.jsonl:1 \(5-gram Jaccard 0\.\d+\) in split train"):
        load_corpus(tmp_path)


def test_the_bundled_writers_split_into_public_and_private_groups_that_share_no_writer():
    from mlplatform.emotion.writers import load_writer_groups, select_writers

    corpus = load_corpus()
    groups = load_writer_groups()
    assert set(groups) == {e.writer for e in corpus}  # every writer in exactly one group
    public, private = select_writers(corpus, None, "public"), select_writers(corpus, None, "private")
    assert len(public) + len(private) == len(corpus) and not {e.writer for e in public} & {e.writer for e in private}
    counts = Counter((groups[e.writer], e.split) for e in corpus)
    assert len({e.writer for e in private}) == 73 and counts["private", "train"] >= 1900 and counts["public", "train"] >= 1800
    assert counts["private", "unseen"] == 0  # the unseen-writer test is public: no model trains on it, any may be scored on it
    assert {groups[e.writer] for e in private if e.split == "test"} == {"private"}  # the private held-out test


def test_writer_groups_that_cannot_be_used_are_refused_by_name(tmp_path):
    from mlplatform.emotion.writers import load_writer_groups, select_writers

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "嬉しい", "writer": "w1", "split": "train",
                                                  "intensity": {"joy": 2}}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="writer_groups.json: missing"):
        select_writers(load_corpus(tmp_path), tmp_path, "private")
    assert len(select_writers(load_corpus(tmp_path), tmp_path, "all")) == 1  # no groups needed to train on everyone
    (tmp_path / "writer_groups.json").write_text(json.dumps({"public": ["w1"], "private": ["w1"]}))
    with pytest.raises(DataError, match="writers in both groups: w1"):
        load_writer_groups(tmp_path)
    (tmp_path / "writer_groups.json").write_text(json.dumps({"public": ["w2"], "private": []}))
    with pytest.raises(DataError, match="writers in neither group of writer_groups.json: w1"):
        select_writers(load_corpus(tmp_path), tmp_path, "public")
