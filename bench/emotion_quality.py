"""Benchmark: test and unseen-writer macro-F1 of the default emotion model vs the n-gram and word-vector baselines a user tries first, as one JSON line."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from quiet_stdout import stdout_to_stderr  # bench/ is on sys.path when a bench runs as a script
from mlplatform.emotion.data import EmotionExample, load_corpus
from mlplatform.emotion.train import EmotionConfig

NGRAM_C_GRID = (0.3, 1.0, 3.0, 10.0)
"""Inverse regularisation strengths the baseline picks from on the dev split, as our model picks its epoch there."""


def split(examples: Sequence[EmotionExample], name: str) -> tuple[list[str], np.ndarray]:
    """Texts and dominant emotions (the first strongest, as the model's single-label target) of one split."""
    chosen = [e for e in examples if e.split == name]
    return [e.text for e in chosen], np.array([e.dominant for e in chosen])


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {"macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(truth, predicted))}


def ngram_baseline(examples: Sequence[EmotionExample], seed: int) -> dict[str, float]:
    """Character 1-4-gram TF-IDF and logistic regression, fitted on train, its C chosen on dev, scored on test (and unseen)."""
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True)
    data = {name: split(examples, name) for name in ("train", "dev", "test", "unseen")}
    vectorizer.fit(data["train"][0])
    features = {name: (vectorizer.transform(texts), labels) for name, (texts, labels) in data.items()}
    return fit_on_dev(features["train"], features["dev"], {"": features["test"], "unseen_": features["unseen"]}, seed)


def fit_on_dev(train: tuple, dev: tuple, evaluated: dict[str, tuple], seed: int) -> dict[str, float]:
    """Logistic regression on train features, C chosen on dev, scored on each of ``evaluated`` (name: features, labels)."""
    fitted = [LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(*train) for c in NGRAM_C_GRID]
    best = fitted[int(np.argmax([scores(dev[1], model.predict(dev[0]))["macro_f1"] for model in fitted]))]
    out: dict[str, float] = {"C": best.C}
    for name, (features, labels) in evaluated.items():
        if len(labels):
            out |= {f"{name}{k}": v for k, v in scores(labels, best.predict(features)).items()}
    return out


def word_vector_baseline(examples: Sequence[EmotionExample], seed: int) -> dict[str, float]:
    """The mean of ja-ginza's vectors over a text's MeCab words (found as written or by dictionary form), and logistic regression."""
    import fugashi

    from mlplatform.emotion.wordvectors import WordVectors, dictionary_forms

    vectors, tagger = WordVectors.load_ginza(), fugashi.Tagger()
    forms = dictionary_forms([e.text for e in examples if e.split == "train"])

    def mean_vector(text: str) -> np.ndarray:
        found = [row for row in (vectors.find(w.surface, forms) for w in tagger(text)) if row >= 0]
        return vectors.vectors[found].mean(axis=0) if found else np.zeros(vectors.vectors.shape[1], np.float32)

    data = {}
    for name in ("train", "dev", "test", "unseen"):
        texts, labels = split(examples, name)
        data[name] = (np.stack([mean_vector(t) for t in texts]) if texts else np.zeros((0, 300)), labels)
    return fit_on_dev(data["train"], data["dev"], {"": data["test"], "unseen_": data["unseen"]}, seed)


def teacher_alone(examples: Sequence[EmotionExample]) -> dict[str, float]:
    """The default model's n-gram teacher on its own (char and word n-grams; deterministic), to show what the BERT adds to it."""
    from mlplatform.emotion.teacher import NgramTeacher

    teacher = NgramTeacher([e for e in examples if e.split in ("train", "dev")])
    return {f"{prefix}macro_f1": round(teacher.macro_f1(chosen), 4) for prefix, split in (("", "test"), ("unseen_", "unseen"))
            if (chosen := [e for e in examples if e.split == split])}


def default_model(corpus: str | None, seed: int, epochs: int | None, **settings: object) -> dict[str, float]:
    """What `mlplatform train emotion` trains by default (Ray Train, one worker), scored on test at its best dev epoch.

    The scores are the served model's (the student with its teacher's vote); ``student_*`` are the BERT's alone.
    """
    from mlplatform.emotion.trainer import fit_emotion_model, score_checkpoint, served_teacher_share

    config = EmotionConfig(**{"seed": seed, "corpus": corpus, "progress_interval_s": 0.0} | ({"epochs": epochs} if epochs else {}) | settings)
    with tempfile.TemporaryDirectory() as output, stdout_to_stderr():
        result = fit_emotion_model(config, None, output_dir=output)
        unseen = score_checkpoint(result.checkpoint, config, split="unseen")
        share = served_teacher_share(result.checkpoint)
    kept = ("macro_f1", "accuracy", "student_macro_f1", "student_accuracy")
    return {**{k: result.test_metrics[k] for k in kept if k in result.test_metrics},
            **{f"unseen_{k}": unseen[k] for k in kept if k in unseen},
            "teacher_share": share, "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1)}


def summary(runs: list[dict[str, float]]) -> dict[str, object]:
    means = {f"{key}_mean": round(statistics.mean(r[key] for r in runs), 4)
             for key in ("macro_f1", "accuracy", "unseen_macro_f1", "unseen_accuracy", "student_macro_f1",
                         "unseen_student_macro_f1") if key in runs[0]}
    return means | {"per_seed": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpus", default=None, help="a JSONL file or folder (default: the bundled corpus)")
    parser.add_argument("--epochs", type=int, default=None, help="override the default model's epochs (default: its own)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train the default model without ja-ginza's vectors, and without the teacher (30 epochs of labelled texts)")
    parser.add_argument("--encoder", default=None, help="also distil into this MLM-pre-trained encoder folder")
    args = parser.parse_args(argv)
    import ray

    examples = load_corpus(args.corpus)
    started = time.perf_counter()
    ngram = [ngram_baseline(examples, seed) for seed in args.seeds]
    ngram_seconds = time.perf_counter() - started
    word_vectors = [word_vector_baseline(examples, seed) for seed in args.seeds[:1]]  # deterministic: one fit is all seeds
    teacher = teacher_alone(examples)
    with stdout_to_stderr():
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)  # never a cluster found in /tmp/ray
    try:
        ours = [default_model(args.corpus, seed, args.epochs) for seed in args.seeds]
        variants: dict[str, dict[str, object]] = {}
        if args.ablation:
            variants |= {"ours_without_word_vectors": {"word_vectors": "none"},
                         "ours_without_teacher": {"teacher": "none", "epochs": 30}}
        if args.encoder:
            variants["pretrained_encoder"] = {"model": args.encoder, "tokenizer": args.encoder}
        others = {name: summary([default_model(args.corpus, seed, args.epochs, **settings) for seed in args.seeds])
                  for name, settings in variants.items()}
    finally:
        ray.shutdown()
    ours_summary, ngram_summary = summary(ours), summary(ngram)
    print(json.dumps({
        "bench": "emotion_quality",
        "corpus": args.corpus or "bundled",
        "examples": {s: sum(e.split == s for e in examples) for s in ("train", "dev", "test", "unseen")},
        "seeds": args.seeds,
        "ours": ours_summary,
        **others,
        "ngram_tfidf_logreg": ngram_summary | {"seconds": round(ngram_seconds, 1)},
        "ginza_mean_vectors_logreg": summary(word_vectors),
        "teacher_alone": teacher,
        "delta_macro_f1": round(ours_summary["macro_f1_mean"] - ngram_summary["macro_f1_mean"], 4),
        "ratio_macro_f1": round(ours_summary["macro_f1_mean"] / ngram_summary["macro_f1_mean"], 3),
        **({"delta_unseen_macro_f1": round(ours_summary["unseen_macro_f1_mean"] - ngram_summary["unseen_macro_f1_mean"], 4)}
           if "unseen_macro_f1_mean" in ours_summary else {}),
    }))


if __name__ == "__main__":
    sys.exit(main())
