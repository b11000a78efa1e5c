"""Distillation from the n-gram teacher: its soft labels on unlabelled texts, and what the trainer is handed."""

from pathlib import Path

import numpy as np
import pytest

from mlplatform.config import ConfigError, load_config
from mlplatform.emotion.data import load_corpus
from mlplatform.emotion.teacher import TEACHER_C_GRID, UNLABELLED_WRITER, NgramTeacher
from mlplatform.emotion.train import EmotionConfig, prepare_inputs

MINI = str(Path(__file__).parent / "data" / "mini.jsonl")
UNLABELLED = ["今日は本当に嬉しい一日だった", "夜道で後ろから足音がして怖かった", "明日の旅行が待ち遠しい"]


def test_the_teacher_picks_c_on_dev_and_labels_texts_with_its_probabilities():
    examples = load_corpus(MINI)
    teacher = NgramTeacher(examples)
    assert len(teacher.dev_macro_f1s) == len(TEACHER_C_GRID)
    assert teacher.model.C == TEACHER_C_GRID[int(np.argmax(teacher.dev_macro_f1s))]
    labelled = teacher.label(UNLABELLED)
    probabilities = teacher.probabilities(UNLABELLED)
    assert [e.text for e in labelled] == UNLABELLED
    assert all(e.split == "train" and e.writer == UNLABELLED_WRITER for e in labelled)
    for example, row in zip(labelled, probabilities):
        assert sum(example.intensity) == pytest.approx(3.0)  # the probabilities, scaled to the 0-3 intensity range
        assert example.dominant == int(np.argmax(row))


def test_the_trainer_gets_the_labelled_and_the_teacher_labelled_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    unlabelled = tmp_path / "texts.txt"
    unlabelled.write_text("\n".join(UNLABELLED) + "\n\n", encoding="utf-8")
    tiny = {"corpus": MINI, "teacher": "none", "hidden_size": 32, "num_heads": 2, "vocab_size": 300, "word_vectors": "none"}
    plain = prepare_inputs(EmotionConfig(**tiny))
    distilled = prepare_inputs(EmotionConfig(**tiny | {"teacher": "ngram", "unlabelled": str(unlabelled)}))
    assert distilled.examples[: len(plain.examples)] == plain.examples
    assert [e.text for e in distilled.examples[len(plain.examples):]] == UNLABELLED
    # the teacher's own scores, the n-gram baseline of the same run, come with them: one per held-out split there is
    assert plain.teacher_metrics == {} and set(distilled.teacher_metrics) == {"teacher_dev_macro_f1"}  # mini: train, dev
    assert all(0.0 <= value <= 1.0 for value in distilled.teacher_metrics.values())


def test_a_teacher_for_another_target_is_refused_by_name(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: ngram\ntarget: multi\n")
    with pytest.raises(ConfigError, match="teacher=ngram .* needs target=single"):
        load_config(EmotionConfig, str(config))
