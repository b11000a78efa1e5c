"""Emotion training: the warmup schedule per batch, resuming from a checkpoint, a Tune study with ASHA (Ray Train on two nodes: tests/cluster)."""

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mlplatform.config import config_to_dict
from mlplatform.emotion.model import EmotionClassifier
from mlplatform.emotion.train import EmotionConfig, make_optimizer, parameter_groups, prepare_inputs, train_emotion_model
from mlplatform.emotion.tune import tune_emotion
from mlplatform.mlops.tracking import ExperimentTracker

MINI = str(Path(__file__).parent / "data" / "mini.jsonl")
FORTY_WRITERS = str(Path(__file__).parent / "data" / "forty-writers")
"""The bundled corpus' first 40 writers (1,120 texts): four times cheaper to train on than all 160."""
TINY = {"corpus": MINI, "teacher": "none", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 300, "batch_size": 8}


def test_learning_rate_warms_up_to_the_peak_then_falls_linearly_per_batch():
    model = torch.nn.Linear(4, 2)
    settings = EmotionConfig(learning_rate=1e-3, warmup_ratio=0.1)
    optimizer, scheduler = make_optimizer(model, settings, total_batches=100)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(5e-4)
    assert rates[10] == pytest.approx(1e-3)  # the peak, right after 10 warmup batches
    decrements = [a - b for a, b in zip(rates[10:], rates[11:])]
    assert all(d == pytest.approx(1e-3 / 90) for d in decrements)  # linear, one step per batch
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_the_loop_steps_the_schedule_once_per_batch():
    config = EmotionConfig(**TINY, epochs=2, learning_rate=1e-3, warmup_ratio=0.25)
    reports = []
    train_emotion_model(config_to_dict(config), inputs=prepare_inputs(config)[0],
                        report=lambda metrics, checkpoint_dir: reports.append(metrics))
    batches_per_epoch = math.ceil(16 / 8)  # the mini corpus has 16 training texts
    total, warmup = 2 * batches_per_epoch, math.ceil(0.25 * 2 * batches_per_epoch)
    after_first_epoch = 1e-3 * (total - batches_per_epoch) / (total - warmup)
    assert reports[0]["learning_rate"] == pytest.approx(after_first_epoch)
    assert reports[1]["learning_rate"] == pytest.approx(0.0)


def test_rank_zero_prints_progress_within_and_at_the_end_of_each_epoch(capsys):
    config = EmotionConfig(**TINY, epochs=2, progress_interval_s=1e-9)  # every batch is past the interval
    inputs, _ = prepare_inputs(config)
    train_emotion_model(config_to_dict(config), inputs=inputs, report=lambda metrics, checkpoint_dir: None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(" · ")[:2] for line in lines] == [  # 2 batches per epoch: one line mid-epoch, one closing it
        ["epoch 1/2", "batch 1/2"], ["epoch 1/2", "batch 2/2"], ["epoch 2/2", "batch 1/2"], ["epoch 2/2", "batch 2/2"]]
    assert " · dev macro-F1 - · " in lines[0]  # no dev score before the first epoch ends
    assert all(re.fullmatch(r"epoch \d/2 · batch \d/2 · loss \d+\.\d{4} · dev macro-F1 [01]\.\d{3} · \d+ samples/s", line)
               for line in lines[1:])
    for quiet in ({"progress_interval_s": 0.0}, {"world_rank": 1}):  # switched off, and on every rank but 0
        settings = config_to_dict(config) | {k: v for k, v in quiet.items() if k != "world_rank"}
        train_emotion_model(settings, inputs=inputs, report=lambda metrics, checkpoint_dir: None,
                            world_rank=quiet.get("world_rank", 0))
        assert "epoch " not in capsys.readouterr().out


def test_a_run_resumed_from_a_checkpoint_ends_as_the_unbroken_run(tmp_path):
    """What a restart after a lost node relies on: optimizer, schedule, epoch, best score and RNG all come back."""
    config = EmotionConfig(**TINY, epochs=4, dropout=0.2)
    inputs, _ = prepare_inputs(config)

    def keeping(kept: list) -> object:
        def report(metrics, checkpoint_dir):
            copy = tmp_path / f"run{id(kept)}-epoch{metrics['epoch']}"
            shutil.copytree(checkpoint_dir, copy)
            kept.append((metrics, copy))
        return report

    unbroken, resumed = [], []
    train_emotion_model(config_to_dict(config), inputs=inputs, report=keeping(unbroken))
    train_emotion_model(config_to_dict(config), inputs=inputs, report=keeping(resumed), resume_from=unbroken[1][1])
    assert [m["epoch"] for m, _ in resumed] == [3, 4]
    for (expected, _), (got, _) in zip(unbroken[2:], resumed):
        assert got == pytest.approx(expected, rel=1e-6)
    final = [EmotionClassifier.from_pretrained(folder).state_dict() for _, folder in (unbroken[-1], resumed[-1])]
    assert all(torch.allclose(final[0][name], final[1][name], atol=1e-6) for name in final[0])


def test_no_weight_decay_on_biases_and_layer_norms():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"bert.embeddings.LayerNorm.weight", "classifier.bias"}
    assert no_decay["weight_decay"] == 0.0


def test_tune_with_asha_stops_some_trials_and_returns_the_best(local_ray, tmp_path):
    db = f"sqlite:///{tmp_path}/m.db"
    # A real corpus, so that trials differ enough for ASHA to rank them; a tiny model keeps it
    # fast, and one trial at a time with a seeded search makes ASHA's decisions repeatable (hard
    # labels: the trials this seeded search draws are ranked apart by ASHA under them).
    config = EmotionConfig(**{**TINY, "corpus": FORTY_WRITERS, "vocab_size": 2000}, epochs=4, max_length=64, soft_labels=False)
    with ExperimentTracker("emotion-study", tracking_uri=db) as parent:
        study = tune_emotion(config, parent, num_samples=4, grace_period=1, max_concurrent_trials=1, output_dir=tmp_path / "tune")
    assert study.trials == 4
    assert study.stopped_early >= 1
    assert set(study.best_config) == {"learning_rate", "batch_size", "warmup_ratio", "dropout"}
    assert (study.checkpoint / "config.json").is_file()
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("emotion-study").experiment_id])
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.run_id]
    assert len(nested) == 4 and len({r.data.tags["ray.trial_id"] for r in nested}) == 4
    # the study's run shows the best trial's learning curves and the champion's test confusion matrix
    plots = {Path(a.path).name: a for a in client.list_artifacts(parent.run_id, "plots")}
    assert set(plots) == {"learning_curves.png", "confusion_matrix_test.png"}
    for name in plots:
        assert Path(client.download_artifacts(parent.run_id, f"plots/{name}", str(tmp_path))).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
