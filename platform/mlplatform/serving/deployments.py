"""Serve deployments: the batched emotion classifier and the DQN policy, each following a registry alias."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
from ray import serve

from mlplatform.emotion.predict import EmotionPrediction, EmotionPredictor
from mlplatform.mlops.monitoring import ModelMonitoring
from mlplatform.mlops.registry import ModelRegistry, RegisteredVersion
from mlplatform.rl.policy import Policy
from mlplatform.serving.rollout import AliasFollower

PROBE_TEXT = "今日はとても嬉しい"


def finite_or_refused(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` when every one is finite; a version that answers NaN or Inf is refused (its probe raises)."""
    if not np.isfinite(values).all():
        raise ValueError(f"{what} are not all finite")
    return values


def probe_emotion(predictor: EmotionPredictor) -> np.ndarray:
    """The health check before a swap: the probe text's scores, all finite."""
    return finite_or_refused(predictor.scores([PROBE_TEXT]), "the probe text's scores")


def probe_policy(policy: Policy) -> np.ndarray:
    """The health check before a swap: the Q-values of an all-zero observation, all finite."""
    return finite_or_refused(policy.q_values([0.0] * math.prod(policy.obs_shape)), "the Q-values of a zero observation")


@serve.deployment(name="EmotionModel", ray_actor_options={"num_cpus": 1})
class EmotionModel:
    """Classifies texts with the registered emotion model that ``ref`` points at, in batches (``@serve.batch``).

    ``user_config`` keys: ``max_batch_size``, ``batch_wait_timeout_s``, ``ref`` (alias or version) and
    ``poll_interval_s``; all change without a restart.
    """

    def __init__(self, model_name: str, ref: str, tracking_uri: str) -> None:
        self.monitoring = ModelMonitoring(model_name, serve.get_replica_context().deployment)
        self.follower: AliasFollower[EmotionPredictor] = AliasFollower(
            ModelRegistry(tracking_uri), model_name, ref, load=EmotionPredictor,
            probe=probe_emotion,
            on_swap=lambda version: self.monitoring.set_version(version.version),
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.classify.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self.classify.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))
        self.follower.follow(str(config.get("ref", self.follower.ref)), poll_interval_s=float(config.get("poll_interval_s", 2.0)))

    async def predict(self, texts: list[str]) -> dict[str, Any]:
        """Every text's label and scores, all from one version (``model``, ``version``, ``predictions``), or ``error``
        with the HTTP ``status`` it deserves: 422 for a text the model cannot take, 503 for non-finite scores."""
        with self.monitoring.track_request():
            result = await self.classify((texts, time.perf_counter()))
        if "error" in result:
            self.monitoring.record_error(result.pop("reason"))
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, requests: list[tuple[list[str], float]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        self.monitoring.record_batch([started - queued for _, queued in requests])
        version, predictor = self.follower.current  # one version for the whole batch, even mid-swap
        texts = [text for request, _ in requests for text in request]
        try:
            predictions = await asyncio.to_thread(predictor.predict, texts)
        except ValueError:  # one bad request must fail only itself: answer the requests one by one
            return [await asyncio.to_thread(_answer_alone, predictor, version, request) for request, _ in requests]
        answers, first = [], 0
        for request, _ in requests:
            answers.append(_emotion_answer(version, predictions[first:first + len(request)]))
            first += len(request)
        return answers

    def info(self) -> dict[str, Any]:
        return self.follower.info()


def _emotion_answer(version: RegisteredVersion, predictions: list[EmotionPrediction]) -> dict[str, Any]:
    if not all(math.isfinite(score) for p in predictions for score in p.scores.values()):
        return {"error": f"model {version.name!r} version {version.version} answered non-finite scores",
                "status": 503, "reason": "non_finite_output"}
    return {"model": version.name, "version": version.version,
            "predictions": [{"label": p.label, "scores": p.scores} for p in predictions]}


def _answer_alone(predictor: EmotionPredictor, version: RegisteredVersion, texts: list[str]) -> dict[str, Any]:
    try:
        return _emotion_answer(version, predictor.predict(texts))
    except ValueError as e:
        return {"error": str(e), "status": 422, "reason": "bad_input"}


@serve.deployment(name="PolicyModel", ray_actor_options={"num_cpus": 0.5})
class PolicyModel:
    """Answers observations with the greedy action of the registered DQN policy that ``ref`` points at."""

    def __init__(self, model_name: str, ref: str, tracking_uri: str) -> None:
        self.monitoring = ModelMonitoring(model_name, serve.get_replica_context().deployment)
        self.follower: AliasFollower[Policy] = AliasFollower(
            ModelRegistry(tracking_uri), model_name, ref, load=Policy,
            probe=probe_policy,
            on_swap=lambda version: self.monitoring.set_version(version.version),
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.follower.follow(str(config.get("ref", self.follower.ref)), poll_interval_s=float(config.get("poll_interval_s", 2.0)))

    def act(self, observation: np.ndarray) -> dict[str, Any]:
        """The greedy action and the Q-values, or ``error`` for an observation of the wrong size or shape, or one
        whose Q-values are not finite (values too large for the network: the probe showed the model itself sound)."""
        with self.monitoring.track_request():
            version, policy = self.follower.current
            try:
                q_values = policy.q_values(observation)
            except ValueError as e:
                self.monitoring.record_error("bad_input")
                return {"error": str(e)}
            if not np.isfinite(q_values).all():
                self.monitoring.record_error("non_finite_output")
                return {"error": f"policy {version.name!r} version {version.version} has no finite Q-values for "
                                 "this observation (its values are too large for the network)"}
        return {"version": version.version, "action": int(q_values.argmax()), "q_values": q_values.tolist()}

    def info(self) -> dict[str, Any]:
        return self.follower.info()
