"""The eight emotions of WRIME (Kajiwara et al. 2021), in WRIME's column order, in one place."""

from __future__ import annotations

from typing import Literal

EMOTIONS: tuple[str, ...] = (
    "joy",
    "sadness",
    "anticipation",
    "surprise",
    "anger",
    "fear",
    "disgust",
    "trust",
)
"""English names, in the order WRIME's columns and every model output use."""

EMOTIONS_JA: dict[str, str] = {
    "joy": "喜び",
    "sadness": "悲しみ",
    "anticipation": "期待",
    "surprise": "驚き",
    "anger": "怒り",
    "fear": "恐れ",
    "disgust": "嫌悪",
    "trust": "信頼",
}
"""The Japanese name WRIME gives each emotion."""

NUM_EMOTIONS = len(EMOTIONS)
MAX_INTENSITY = 3
"""WRIME intensities run 0 (none), 1 (weak), 2 (medium), 3 (strong)."""

Target = Literal["single", "multi", "intensity"]
"""What a model predicts: the dominant emotion (softmax), each emotion present (intensity >= 1,
sigmoid per emotion), or each emotion's intensity (regression on 0-3)."""


def emotion_index(name: str) -> int:
    """Position of an emotion, by English or Japanese name.

    Raises:
        ValueError: the name is not one of the eight.
    """
    for index, emotion in enumerate(EMOTIONS):
        if name in (emotion, EMOTIONS_JA[emotion]):
            return index
    raise ValueError(f"unknown emotion {name!r}; expected one of {', '.join(EMOTIONS)}")
