"""Request and response bodies of the HTTP API, with the limits that keep bad input a 4xx."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

MAX_BODY_BYTES = 64 * 1024
"""Largest emotion request body accepted (413 beyond it)."""
MAX_POLICY_BODY_BYTES = 1024 * 1024
"""Largest policy request body accepted: room for an Atari frame stack (4 x 84 x 84) as nested lists of integers.
How many values an observation may have is the policy's own size, checked by the model deployment."""
MAX_TEXT_CHARS = 2000
"""Longest text accepted (longer ones are a 422, not silently cut)."""
MAX_TEXTS = 64
"""Most texts in one request."""
FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a policy computes in float32, where anything larger is infinite."""


class EmotionRequest(BaseModel):
    """One text or a list of texts to classify."""

    model_config = ConfigDict(extra="forbid")
    text: str | list[str] = Field(description=f"A Japanese text, or up to {MAX_TEXTS} of them.")

    @field_validator("text")
    @classmethod
    def _texts_within_limits(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_TEXTS:
            raise ValueError(f"give 1 to {MAX_TEXTS} texts, got {len(texts)}")
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"text {index} is empty")
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"text {index} has {len(text)} characters, more than {MAX_TEXT_CHARS}")
        return value

    def texts(self) -> list[str]:
        """The texts as a list, whichever form was sent."""
        return [self.text] if isinstance(self.text, str) else list(self.text)


class EmotionPrediction(BaseModel):
    """The strongest emotion and the eight probabilities."""

    label: str
    scores: dict[str, float]


class EmotionResponse(BaseModel):
    """Predictions in the order of the texts, and the model version that made them."""

    model: str
    version: str
    predictions: list[EmotionPrediction]


class PolicyRequest(BaseModel):
    """One observation: numbers (flat in C order, or nested lists of the observation's shape), or for images its
    bytes as base64 with their shape."""

    model_config = ConfigDict(extra="forbid")
    observation: list[Any] | None = Field(
        None, description="The observation's numbers, flat in C order (CartPole: 4) or nested by its shape; no strings.")
    observation_b64: str | None = Field(
        None, description="Or the observation as uint8 bytes in C order, base64-encoded (Atari: 4 x 84 x 84 frames); "
                          "needs `shape`.")
    shape: list[int] | None = Field(None, description="The shape of `observation_b64`, e.g. [4, 84, 84].")
    _array: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _decoded(self) -> PolicyRequest:
        if (self.observation is None) == (self.observation_b64 is None):
            raise ValueError("send either observation (numbers) or observation_b64 with shape")
        if self.observation is not None:
            if self.shape is not None:
                raise ValueError("shape goes with observation_b64; nested lists carry their own shape")
            self._array = numbers_array(self.observation)
        else:
            self._array = uint8_array(self.observation_b64 or "", self.shape)
        return self

    def array(self) -> np.ndarray:
        """The observation as a float32 (numbers) or uint8 (base64) array of the shape it was sent in."""
        return self._array


def numbers_array(value: list[Any]) -> np.ndarray:
    """Nested lists of numbers as a float32 array of their shape.

    Raises:
        ValueError: ragged lists, a value that is not a number, or one outside float32's finite range.
    """
    shape, level = [len(value)], list(value)
    while level and all(isinstance(item, list) for item in level):
        widths = {len(item) for item in level}
        if len(widths) != 1:
            raise ValueError("observation is ragged: the lists at each depth must have one length")
        shape.append(widths.pop())
        level = [number for item in level for number in item]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in level):
        raise ValueError("observation values must be numbers, nested in lists of one length per depth")
    try:
        values = np.asarray(level, dtype=np.float64)
    except OverflowError:
        values = np.array([math.inf])
    if not np.all(np.isfinite(values) & (np.abs(values) <= FLOAT32_MAX)):
        raise ValueError(f"observation values must be finite float32 numbers (|value| <= {FLOAT32_MAX:.4g})")
    return values.astype(np.float32).reshape(shape)


def uint8_array(encoded: str, shape: list[int] | None) -> np.ndarray:
    """base64 bytes as a uint8 array of ``shape``.

    Raises:
        ValueError: no shape, a negative size, text that is not base64, or a byte count that is not the shape's.
    """
    if not shape or any(size < 1 for size in shape):
        raise ValueError("observation_b64 needs shape, a list of positive sizes such as [4, 84, 84]")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("observation_b64 is not base64") from None
    if len(data) != math.prod(shape):
        raise ValueError(f"observation_b64 holds {len(data)} bytes, shape {shape} needs {math.prod(shape)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


class PolicyResponse(BaseModel):
    """The greedy action and every action's Q-value."""

    model: str
    version: str
    action: int
    q_values: list[float]


class ModelInfo(BaseModel):
    """A deployed model: its registry name, the version serving now, the alias it follows."""

    name: str
    kind: str
    version: str
    alias: str
    last_rollout_error: str | None = None


class ModelsResponse(BaseModel):
    """Every deployed model."""

    models: list[ModelInfo]
