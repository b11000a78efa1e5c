"""Request and response bodies of the HTTP API, with the limits that keep bad input a 4xx."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted (413 beyond it)."""
MAX_TEXT_CHARS = 2000
"""Longest text accepted (longer ones are a 422, not silently cut)."""
MAX_TEXTS = 64
"""Most texts in one request."""
MAX_OBSERVATION_VALUES = 4096
"""Most numbers in one observation."""
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
    """One observation, flattened in C order."""

    model_config = ConfigDict(extra="forbid")
    observation: list[Annotated[float, Field(strict=True)]] = Field(
        max_length=MAX_OBSERVATION_VALUES, description="The observation's numbers, flattened (CartPole: 4); no strings.")

    @field_validator("observation")
    @classmethod
    def _finite(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in value):
            raise ValueError(f"observation values must be finite float32 numbers (|value| <= {FLOAT32_MAX:.4g})")
        return value


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
