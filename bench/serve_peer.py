"""Peer of bench/serve.py: the same EmotionPredictor behind a plain FastAPI app, as a user would write it in ten minutes.

Run by the bench as ``uvicorn serve_peer:app --workers 1`` with ``SERVE_PEER_MODEL`` naming the model folder; no Ray,
no batching, one request's texts per model call.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel

from mlplatform.emotion.predict import EmotionPredictor

predictor = EmotionPredictor(os.environ["SERVE_PEER_MODEL"])
app = FastAPI()


class Texts(BaseModel):
    text: str | list[str]


@app.post("/v1/emotion")
def classify(body: Texts) -> dict[str, object]:
    texts = [body.text] if isinstance(body.text, str) else body.text
    return {"predictions": [{"label": p.label, "scores": p.scores} for p in predictor.predict(texts)]}


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
