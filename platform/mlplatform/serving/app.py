"""The HTTP API: a FastAPI ingress (OpenAPI at /docs) over the model deployments, and the app builder for Serve configs."""

import asyncio
import os
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from mlplatform.serving.deployments import EmotionModel, PolicyModel
from mlplatform.serving.schemas import (
    MAX_BODY_BYTES, MAX_POLICY_BODY_BYTES, EmotionPrediction, EmotionRequest, EmotionResponse, ModelInfo, ModelsResponse, PolicyRequest,
    PolicyResponse,
)

# /docs (Swagger UI) and /redoc load their scripts and styles from the fastapi-offline package through this app, never
# from a CDN, so the API pages render on an offline or air-gapped cluster
api = FastAPIOffline(title="mlplatform", summary="Registered emotion and DQN-policy models, served by Ray Serve.")


@api.middleware("http")
async def limit_body_size(request: Request, call_next: Any) -> Any:
    """413 before reading a body larger than its route takes; 411 for a POST that does not say its length."""
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse({"detail": "send a Content-Length header"}, status_code=411)
        cap = MAX_POLICY_BODY_BYTES if request.url.path.startswith("/v1/policy/") else MAX_BODY_BYTES
        if not length.isdigit() or int(length) > cap:
            return JSONResponse({"detail": f"body larger than {cap} bytes"}, status_code=413)
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input (it may be huge, or NaN that JSON cannot carry)."""
    details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    return JSONResponse({"detail": details}, status_code=422)


REPLICA_ATTEMPTS = 4
"""Tries per model call: a replica lost with its node fails the calls it held, and Serve routes the next try to a live one."""
RETRY_BACKOFF_S = 0.25
"""Wait before the second try, doubling for each after (0.25 + 0.5 + 1 s: about how long Serve takes to notice a dead replica)."""


async def call_replica(method: Any, *args: Any) -> Any:
    """``method.remote(*args)`` on a model deployment, tried again on another replica if the one that took it died.

    Model calls are read-only, so a call that may or may not have run on a lost replica is safe to repeat.

    Raises:
        HTTPException: 503 when every try found a replica gone.
    """
    for attempt in range(REPLICA_ATTEMPTS - 1):
        try:
            return await method.remote(*args)
        except RayActorError:
            await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
    try:
        return await method.remote(*args)
    except RayActorError:
        raise HTTPException(503, "no model replica answered; try again shortly") from None


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    """Validates requests, fans them out to the model deployments and shapes the answers."""

    def __init__(self, emotions: dict[str, DeploymentHandle], policies: dict[str, DeploymentHandle]) -> None:
        self.emotions = emotions
        self.policies = policies

    @api.post("/v1/emotion", response_model=EmotionResponse)
    async def classify(self, body: EmotionRequest) -> EmotionResponse:
        """Label and eight probabilities for each text, from the first emotion model deployed."""
        if not self.emotions:
            raise HTTPException(404, "no emotion model is deployed")
        return await self.classify_with(next(iter(self.emotions)), body)

    @api.post("/v1/emotion/{name}", response_model=EmotionResponse)
    async def classify_with(self, name: str, body: EmotionRequest) -> EmotionResponse:
        """Label and eight probabilities for each text, from emotion model ``name``."""
        if name not in self.emotions:
            raise HTTPException(404, f"no emotion model named {name!r}; deployed: {sorted(self.emotions)}")
        result = await call_replica(self.emotions[name].predict, body.texts())  # one call: one version answers all
        if "error" in result:
            raise HTTPException(result["status"], result["error"])
        return EmotionResponse(model=result["model"], version=result["version"],
                               predictions=[EmotionPrediction(**p) for p in result["predictions"]])

    @api.post("/v1/policy/{name}", response_model=PolicyResponse)
    async def act(self, name: str, body: PolicyRequest) -> PolicyResponse:
        """The greedy action and the Q-values of policy ``name`` for one observation."""
        if name not in self.policies:
            raise HTTPException(404, f"no policy named {name!r}; deployed: {sorted(self.policies)}")
        result = await call_replica(self.policies[name].act, body.array())
        if "error" in result:
            raise HTTPException(422, [{"loc": ["body", "observation"], "msg": result["error"], "type": "value_error"}])
        return PolicyResponse(model=name, version=result["version"], action=result["action"], q_values=result["q_values"])

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """200 while the ingress answers."""
        return {"status": "ok"}

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        """Each deployed model: registry name, kind, serving version and the alias it follows."""
        handles = [*self.emotions.values(), *self.policies.values()]
        infos = await asyncio.gather(*(handle.info.remote() for handle in handles))
        return ModelsResponse(models=[ModelInfo(**info) for info in infos])


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application (``import_path: mlplatform.serving.app:build_app``).

    Args (from the Serve config's ``args``):
        emotion_models: registered emotion models to serve, each at ``/v1/emotion/<name>``; the first
            also answers ``/v1/emotion``.
        policies: registered DQN policies to serve, each at ``/v1/policy/<name>``.
        ref: alias (or version) every deployment follows; ``champion`` by default.
        tracking_uri: the MLflow store; else ``MLFLOW_TRACKING_URI`` in the deployment's environment.

    Raises:
        ValueError: no tracking store, or nothing to serve.
    """
    tracking_uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ValueError("set args.tracking_uri or MLFLOW_TRACKING_URI (an absolute store) for the model registry")
    ref = str(args.get("ref", "champion"))
    emotions, policies = list(args.get("emotion_models", [])), list(args.get("policies", []))
    if not emotions and not policies:
        raise ValueError("nothing to serve: set args.emotion_models and/or args.policies")
    return Ingress.bind({name: EmotionModel.options(name=f"Emotion-{name}").bind(name, ref, tracking_uri) for name in emotions},
                        {name: PolicyModel.options(name=f"Policy-{name}").bind(name, ref, tracking_uri) for name in policies})
