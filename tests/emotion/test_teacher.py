"""The n-gram teacher: its soft labels on unlabelled texts, what the trainer is handed, and its vote in the served model."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlplatform.config import ConfigError, config_to_dict, load_config
from mlplatform.emotion.data import load_corpus
from mlplatform.emotion.evaluation import dominant_metrics
from mlplatform.emotion.labels import EMOTIONS
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.emotion.teacher import TEACHER_C_GRID, TEACHER_FILES, UNLABELLED_WRITER, NgramTeacher
from mlplatform.emotion.tokenizer import default_tokenizer
from mlplatform.emotion.train import EmotionConfig, prepare_inputs, train_emotion_model
from mlplatform.emotion.trainer import TEACHER_SHARES, best_model_folder, score_checkpoint, served_teacher_share
from mlplatform.emotion.writers import load_provenance

MINI = str(Path(__file__).parent / "data" / "mini.jsonl")
UNLABELLED = ["今日は本当に嬉しい一日だった", "夜道で後ろから足音がして怖かった", "明日の旅行が待ち遠しい"]


def test_the_teacher_picks_c_on_dev_and_labels_texts_with_its_probabilities():
    examples = load_corpus(MINI)
    teacher = NgramTeacher(examples)
    assert len(teacher.dev_macro_f1s) == len(TEACHER_C_GRID)
    assert teacher.c == TEACHER_C_GRID[int(np.argmax(teacher.dev_macro_f1s))]
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
    plain, no_teacher = prepare_inputs(EmotionConfig(**tiny))
    distilled, teacher = prepare_inputs(EmotionConfig(**tiny | {"teacher": "ngram", "unlabelled": str(unlabelled)}))
    assert no_teacher is None and isinstance(teacher, NgramTeacher)
    assert distilled.examples[: len(plain.examples)] == plain.examples
    assert [e.text for e in distilled.examples[len(plain.examples):]] == UNLABELLED
    # the teacher's own scores, the n-gram baseline of the same run, come with them: one per held-out split there is
    assert plain.teacher_metrics == {} and set(distilled.teacher_metrics) == {"teacher_dev_macro_f1"}  # mini: train, dev
    assert all(0.0 <= value <= 1.0 for value in distilled.teacher_metrics.values())


def test_a_saved_teacher_loads_back_as_itself_without_pickle(tmp_path):
    teacher = NgramTeacher(load_corpus(MINI))
    teacher.save(tmp_path, vote_share=0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TEACHER_FILES)  # JSON and safetensors only
    loaded, share = NgramTeacher.load(tmp_path)
    assert share == 0.7 and loaded.c == teacher.c
    texts = UNLABELLED + ["ｶﾀｶﾅと全角ＡＢＣも同じ特徴になる"]
    np.testing.assert_allclose(loaded.probabilities(texts), teacher.probabilities(texts), rtol=1e-6)
    assert NgramTeacher.load(tmp_path / "elsewhere") is None


def test_the_teacher_reads_words_as_well_as_characters():
    teacher = NgramTeacher(load_corpus(MINI))
    words = teacher.vectorizers["word"].vocabulary_
    assert {"本当", "ない", "た 。"} <= set(words)  # MeCab words found in two texts or more, and word pairs
    assert teacher.features(UNLABELLED).shape[1] == len(teacher.vectorizers["char"].vocabulary_) + len(words)


def test_a_teacher_for_another_target_is_refused_by_name(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: ngram\ntarget: multi\n")
    with pytest.raises(ConfigError, match="teacher=ngram .* needs target=single"):
        load_config(EmotionConfig, str(config))


def test_a_model_folder_with_its_teacher_answers_with_both_votes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    examples = load_corpus(MINI)
    tokenizer = default_tokenizer([e.text for e in examples if e.split == "train"], vocab_size=300)
    student = tmp_path / "student"
    torch.manual_seed(0)
    # 16 positions: the predictor must cut longer texts to the model's own length, whatever it is asked
    EmotionClassifier.from_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_length=16).save_pretrained(student)
    tokenizer.save_pretrained(student)
    served = tmp_path / "served"
    shutil.copytree(student, served)
    teacher = NgramTeacher(examples)
    teacher.save(served, vote_share=0.7)

    texts = UNLABELLED + ["".join(UNLABELLED) * 3]  # the last one far past 16 tokens
    alone, both = EmotionPredictor(student).scores(texts), EmotionPredictor(served).scores(texts)
    np.testing.assert_allclose(both, 0.3 * alone + 0.7 * teacher.probabilities(texts), rtol=1e-5)
    assert [p.label for p in EmotionPredictor(served).predict(texts)] == [EMOTIONS[i] for i in both.argmax(axis=1)]


def test_the_best_model_keeps_its_teacher_and_is_scored_as_it_is_served(tmp_path, monkeypatch):
    from ray.train import Checkpoint

    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    unlabelled = tmp_path / "texts.txt"
    unlabelled.write_text("\n".join(UNLABELLED) + "\n", encoding="utf-8")
    config = EmotionConfig(corpus=MINI, unlabelled=str(unlabelled), hidden_size=32, num_layers=1, num_heads=2, vocab_size=300,
                           word_vectors="none", epochs=1, batch_size=8)
    inputs, teacher = prepare_inputs(config)
    checkpoint = tmp_path / "checkpoint"
    train_emotion_model(config_to_dict(config), inputs=inputs,
                        report=lambda metrics, checkpoint_dir: shutil.copytree(checkpoint_dir, checkpoint, dirs_exist_ok=True))
    served = best_model_folder(Checkpoint.from_directory(str(checkpoint)), str(tmp_path / "served"), "run",
                               provenance=inputs.provenance, config=dataclasses.replace(config, teacher_share=0.7),
                               teacher=teacher)
    assert all((served / name).is_file() for name in TEACHER_FILES)
    assert load_provenance(served)["writers"] == sorted({e.writer for e in inputs.examples if e.writer != UNLABELLED_WRITER})
    dev = [e for e in load_corpus(MINI) if e.split == "dev"]
    scored = score_checkpoint(served, config, split="dev")
    answered = EmotionPredictor(served).scores([e.text for e in dev])
    assert scored["macro_f1"] == dominant_metrics(answered, np.array([e.dominant for e in dev]))["macro_f1"]
    assert {"student_macro_f1", "student_accuracy"} <= set(scored)  # the BERT alone, beside what is served
    student_only = best_model_folder(Checkpoint.from_directory(str(checkpoint)), str(tmp_path / "student"), "run",
                                     provenance=inputs.provenance, config=dataclasses.replace(config, teacher_share=0.0),
                                     teacher=teacher)
    assert not (student_only / TEACHER_FILES[0]).exists() and "student_macro_f1" not in score_checkpoint(student_only, config, split="dev")
    # the default share is the one with the best dev macro-F1, so the served mixture is never behind either model on dev
    assert config.teacher_share is None
    chosen = best_model_folder(Checkpoint.from_directory(str(checkpoint)), str(tmp_path / "chosen"), "run",
                               provenance=inputs.provenance, config=config, teacher=teacher)
    share = served_teacher_share(chosen)
    truth = np.array([e.dominant for e in dev])
    student, taught = EmotionPredictor(student_only).scores([e.text for e in dev]), teacher.probabilities([e.text for e in dev])
    dev_f1 = {s: dominant_metrics((1 - s) * student + s * taught, truth)["macro_f1"] for s in TEACHER_SHARES}
    assert share in TEACHER_SHARES and dev_f1[share] == max(dev_f1.values())
    assert score_checkpoint(chosen, config, split="dev")["macro_f1"] == pytest.approx(dev_f1[share])
