"""MLflow's pyfunc flavour of the registered models: `mlflow.pyfunc.load_model("models:/<name>@champion")` answers as Serve does.

:func:`register_servable` registers a version together with an MLflow model (an ``MLmodel`` file with a
signature and an input example) made of the very artifact the Serve deployments load, so MLflow's own
tools (`mlflow models serve`, `mlflow.models.predict`, evaluation) take it too. MLflow opens it through
this module (its ``loader_module``): the model holds weights only, never a pickled Python object.
"""

from __future__ import annotations

import contextlib
import pickle
import tempfile
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

from mlplatform.emotion.labels import EMOTIONS
from mlplatform.emotion.predict import EmotionPredictor
from mlplatform.mlops.registry import ModelRegistry, RegisteredVersion, RegistryError
from mlplatform.rl.policy import Policy

__all__ = ["EmotionPyfunc", "PolicyPyfunc", "register_servable"]

EXAMPLE_TEXT = "今日はとても嬉しい"
EMOTION_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text")]),
    outputs=Schema([ColSpec("string", "label"), *(ColSpec("double", emotion) for emotion in EMOTIONS)]),
)
REQUIREMENTS = ("mlplatform", "torch", "transformers", "fugashi", "unidic-lite", "gymnasium", "mlflow")
"""What the model needs installed; `mlflow models serve --env-manager local` uses the environment it runs in."""


@contextlib.contextmanager
def bad_input_as_mlflow_error() -> Iterator[None]:
    """The model's ValueError (an empty text, a wrong shape) as MLflow's own input error: a 400 with the message
    alone from `mlflow models serve`, where any other exception is answered with its traceback."""
    try:
        yield
    except ValueError as e:
        raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


class EmotionPyfunc:
    """A ``text`` column in, a ``label`` column and one score column per emotion out (the endpoint's answer, flat)."""

    def __init__(self, folder: str | Path) -> None:
        self.predictor = EmotionPredictor(folder)

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        with bad_input_as_mlflow_error():
            predictions = self.predictor.predict(model_input["text"].tolist())
        return pd.DataFrame([{"label": p.label, **p.scores} for p in predictions], columns=["label", *EMOTIONS])


class PolicyPyfunc:
    """Observations in (one per row), the greedy ``action`` and the ``q_values`` out."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.policy = Policy(checkpoint)

    def predict(self, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = np.asarray(model_input, dtype=np.float32).reshape(len(model_input), -1)
        with bad_input_as_mlflow_error():
            q_values = [self.policy.q_values(row.tolist()) for row in rows]
        return pd.DataFrame({"action": [int(q.argmax()) for q in q_values], "q_values": [q.tolist() for q in q_values]})


def _load_pyfunc(path: str) -> EmotionPyfunc | PolicyPyfunc:
    """MLflow's entry point: the emotion model folder itself, or the checkpoint inside a policy's MLflow model."""
    return EmotionPyfunc(path) if Path(path).is_dir() else PolicyPyfunc(path)


def _loaded(local: Path, kind: str, what: str) -> EmotionPyfunc | PolicyPyfunc:
    try:
        return EmotionPyfunc(local) if kind == "emotion" else PolicyPyfunc(local)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as e:
        message = f"no {e.args[0]!r} in it" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0]
        raise RegistryError(f"{what} does not load as a {kind} model: {message}", error_code="INVALID_PARAMETER_VALUE") from None


def register_servable(registry: ModelRegistry, name: str, *, run_id: str, artifact_path: str | None = None,
                      description: str = "", tags: dict[str, Any] | None = None) -> RegisteredVersion:
    """Register a run's model (see :meth:`ModelRegistry.register_model`) as an MLflow pyfunc model as well.

    An emotion folder becomes the MLflow model itself (its ``MLmodel`` beside the weights); a DQN
    checkpoint is copied into an MLflow model under ``mlflow/<checkpoint name>/``. The version's
    ``artifact_path`` stays what the Serve deployments load.

    Raises:
        RegistryError: as ``register_model``, or the model does not load (nothing is registered then).
    """
    import mlflow.pyfunc

    found_path, kind = registry.find_model(run_id, artifact_path)
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as scratch:
        local = registry.download_run_artifact(run_id, found_path, Path(scratch) / "artifact")
        flavour = Path(scratch) / "mlflow"
        common = {"loader_module": __name__, "pip_requirements": [f"{dist}=={installed_version(dist)}" for dist in REQUIREMENTS]}
        loaded = _loaded(local, kind, f"{found_path!r} of run {run_id}")  # a model that does not load is not registered
        if kind == "emotion":
            mlflow.pyfunc.save_model(flavour, signature=EMOTION_SIGNATURE, input_example=pd.DataFrame({"text": [EXAMPLE_TEXT]}),
                                     **common)
            source = found_path
        else:
            policy = loaded.policy
            signature = ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *policy.obs_shape))]),
                outputs=Schema([ColSpec("long", "action"), ColSpec(Array("double"), "q_values")]))
            mlflow.pyfunc.save_model(flavour, data_path=str(local), signature=signature,
                                     input_example=np.zeros((1, *policy.obs_shape), dtype=np.float32), **common)
            source = f"mlflow/{Path(found_path).stem}"
        registry.add_run_artifacts(run_id, flavour, source)
    return registry.register_model(name, run_id=run_id, artifact_path=found_path, kind=kind, source=source,
                                   description=description, tags=tags)
