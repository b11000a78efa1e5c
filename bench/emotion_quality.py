"""Benchmark: test macro-F1 and accuracy of the default emotion model vs the n-gram baseline a user tries first, as one JSON line."""

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
    (train_x, train_y), (dev_x, dev_y), (test_x, test_y), (unseen_x, unseen_y) = (
        split(examples, s) for s in ("train", "dev", "test", "unseen"))
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True)
    train_features = vectorizer.fit_transform(train_x)
    fitted = [LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(train_features, train_y) for c in NGRAM_C_GRID]
    dev_f1 = [scores(dev_y, model.predict(vectorizer.transform(dev_x)))["macro_f1"] for model in fitted]
    best = fitted[int(np.argmax(dev_f1))]
    unseen = {f"unseen_{k}": v for k, v in scores(unseen_y, best.predict(vectorizer.transform(unseen_x))).items()} if unseen_x else {}
    return scores(test_y, best.predict(vectorizer.transform(test_x))) | unseen | {"C": best.C}


def default_model(corpus: str | None, seed: int, epochs: int | None) -> dict[str, float]:
    """What `mlplatform train emotion` trains by default (Ray Train, one worker), scored on test at its best dev epoch."""
    from mlplatform.emotion.trainer import fit_emotion_model, score_checkpoint

    config = EmotionConfig(**{"seed": seed, "corpus": corpus} | ({"epochs": epochs} if epochs else {}))
    with tempfile.TemporaryDirectory() as output, stdout_to_stderr():
        result = fit_emotion_model(config, None, output_dir=output)
        unseen = score_checkpoint(result.checkpoint, config, split="unseen")
    return {"macro_f1": result.test_metrics["macro_f1"], "accuracy": result.test_metrics["accuracy"],
            **{f"unseen_{k}": unseen[k] for k in ("macro_f1", "accuracy") if k in unseen},
            "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1)}


def summary(runs: list[dict[str, float]]) -> dict[str, object]:
    means = {f"{key}_mean": round(statistics.mean(r[key] for r in runs), 4)
             for key in ("macro_f1", "accuracy", "unseen_macro_f1", "unseen_accuracy") if key in runs[0]}
    return means | {"per_seed": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpus", default=None, help="a JSONL file or folder (default: the bundled corpus)")
    parser.add_argument("--epochs", type=int, default=None, help="override the default model's epochs (default: its own)")
    args = parser.parse_args(argv)
    import ray

    examples = load_corpus(args.corpus)
    started = time.perf_counter()
    ngram = [ngram_baseline(examples, seed) for seed in args.seeds]
    ngram_seconds = time.perf_counter() - started
    with stdout_to_stderr():
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)  # never a cluster found in /tmp/ray
    try:
        ours = [default_model(args.corpus, seed, args.epochs) for seed in args.seeds]
    finally:
        ray.shutdown()
    ours_summary, ngram_summary = summary(ours), summary(ngram)
    print(json.dumps({
        "bench": "emotion_quality",
        "corpus": args.corpus or "bundled",
        "examples": {s: sum(e.split == s for e in examples) for s in ("train", "dev", "test", "unseen")},
        "seeds": args.seeds,
        "ours": ours_summary,
        "ngram_tfidf_logreg": ngram_summary | {"seconds": round(ngram_seconds, 1)},
        "delta_macro_f1": round(ours_summary["macro_f1_mean"] - ngram_summary["macro_f1_mean"], 4),
        "ratio_macro_f1": round(ours_summary["macro_f1_mean"] / ngram_summary["macro_f1_mean"], 3),
        **({"delta_unseen_macro_f1": round(ours_summary["unseen_macro_f1_mean"] - ngram_summary["unseen_macro_f1_mean"], 4)}
           if "unseen_macro_f1_mean" in ours_summary else {}),
    }))


if __name__ == "__main__":
    sys.exit(main())
