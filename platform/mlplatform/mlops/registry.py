"""Model registry on MLflow's: versions of a run's model, aliases (champion, challenger), downloads and safe loads.

A version points at artifacts of a tracked run: a Hugging Face folder (``save_pretrained``, kind
``emotion``) or a checkpoint file (kind ``dqn``). Loading what a version points at is the
serving layer's job; raw checkpoints are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlplatform.mlops.tracking import TrackingError, default_tracking_uri, open_client, translated_errors
from mlplatform.storage import cache_dir

__all__ = ["ModelRegistry", "RegisteredVersion", "RegistryError", "RegistrySource", "parse_model_uri"]

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RegistryError(TrackingError):
    """A registry request that cannot be met; ``error_code`` is MLflow's (e.g. RESOURCE_DOES_NOT_EXIST)."""


@dataclasses.dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model and what it points at."""

    name: str
    version: str
    aliases: tuple[str, ...]
    kind: str
    run_id: str
    artifact_path: str
    description: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return f"models:/{self.name}/{self.version}"


@dataclasses.dataclass(frozen=True)
class RegistrySource:
    """A registered version pinned by number, which whichever node uses it downloads into its own cache.

    Pinned on the driver (see :meth:`ModelRegistry.pinned`), so every node gets the same version even
    if the alias moves mid-run; downloaded from the tracking server, which every node reaches.
    """

    name: str
    version: str
    tracking_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def local_path(self) -> str:
        """The version's model folder on this node, downloaded on first use."""
        return str(ModelRegistry(self.tracking_uri).cached_model(self.uri, cache_dir())[1])


def parse_model_uri(uri: str) -> tuple[str, str]:
    """Split ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` into (name, alias or version).

    Raises:
        RegistryError: anything else.
    """
    match = _MODEL_URI.match(uri)
    if match is None:
        raise RegistryError(f"not a model URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)",
                            error_code="INVALID_PARAMETER_VALUE")
    return match["name"], match["alias"] or match["version"]


INHERITED_TAG_PREFIXES = ("provenance.", "dp.")
"""Run tags a model version carries: whose data trained it, and the privacy guarantee it was trained under."""


class ModelRegistry:
    """Register, alias, find and download model versions (a thin façade over ``MlflowClient``).

    Args:
        tracking_uri: the store (tracking and registry are the same database); ``default_tracking_uri()`` when None.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        with self._calling("open the registry"):
            self._client: MlflowClient = open_client(self.tracking_uri)

    def register_model(
        self,
        name: str,
        *,
        run_id: str,
        artifact_path: str | None = None,
        kind: str | None = None,
        source: str | None = None,
        description: str = "",
        tags: dict[str, Any] | None = None,
    ) -> RegisteredVersion:
        """A new version of ``name`` from a run's artifacts; the registered model is created on first use.

        Args:
            name: registered model name (letters, digits, ``_.-``).
            run_id: the tracked run that produced the model.
            artifact_path: the model inside the run's artifacts; None finds it (a folder holding
                ``config.json`` under ``model/``, else the newest ``.pt`` under ``checkpoints/``).
            kind: ``emotion`` for a Hugging Face folder, ``dqn`` for a checkpoint; None infers it.
            source: the MLflow model (a folder with an ``MLmodel`` file) that MLflow's own loaders open for this
                version, when it is not ``artifact_path`` itself (see :mod:`mlplatform.serving.pyfunc`).
            description: shown with the version.
            tags: extra metadata (metrics, dataset, commit); the run's ``provenance.*`` and ``dp.*`` tags come too.

        Raises:
            RegistryError: a bad name, an unknown run, or no model in its artifacts.
        """
        if not _NAME.match(name):
            raise RegistryError(f"bad model name {name!r}: use letters, digits, '_', '.', '-'", error_code="INVALID_PARAMETER_VALUE")
        with self._calling(f"find run {run_id!r}"):
            run = self._client.get_run(run_id)
        inherited = {k: v for k, v in run.data.tags.items() if k.startswith(INHERITED_TAG_PREFIXES)}
        found_path, found_kind = self.find_model(run_id, artifact_path)
        kind = kind or found_kind
        with self._calling(f"register {name!r}"):
            try:
                self._client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self._client.create_model_version(
                name, source=f"runs:/{run_id}/{source or found_path}", run_id=run_id, description=description,
                tags={"kind": kind, "artifact_path": found_path, **inherited, **{k: str(v) for k, v in (tags or {}).items()}},
            )
        return self.get_model_version(name, str(version.version))

    def set_alias(self, name: str, alias: str, version: str) -> RegisteredVersion:
        """Point ``alias`` (e.g. ``champion``) at ``version``, moving it from any other version."""
        if alias.isdigit():
            raise RegistryError(f"an alias cannot be a number, got {alias!r}", error_code="INVALID_PARAMETER_VALUE")
        with self._calling(f"set {name}@{alias} to version {version}"):
            self._client.set_registered_model_alias(name, alias, str(version))
        return self.get_model_version(name, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` from ``name``."""
        with self._calling(f"delete {name}@{alias}"):
            self._client.delete_registered_model_alias(name, alias)

    def get_model_version(self, name: str, ref: str) -> RegisteredVersion:
        """The version that ``ref`` names: a version number or an alias (``champion`` or ``@champion``)."""
        ref = str(ref).removeprefix("@")
        with self._calling(f"find {name} version {ref}" if ref.isdigit() else f"find {name}@{ref}"):
            found = self._client.get_model_version(name, ref) if ref.isdigit() else self._client.get_model_version_by_alias(name, ref)
        return _registered(found)

    def search_model_versions(self, name: str | None = None) -> list[RegisteredVersion]:
        """Every version of ``name`` (or of every model), newest first within each model."""
        query = None if name is None else f"name = '{name}'"
        with self._calling("search model versions"):
            found = self._client.search_model_versions(query, order_by=["name ASC", "version_number DESC"])
            # search results leave aliases out; the registered model holds them
            aliases = {model: self._client.get_registered_model(model).aliases for model in {v.name for v in found}}
        return [dataclasses.replace(_registered(v), aliases=tuple(sorted(a for a, number in aliases[v.name].items()
                                                                         if str(number) == str(v.version))))
                for v in found]

    def download_model(self, uri_or_name: str, ref: str | None = None, dst: str | Path | None = None) -> tuple[RegisteredVersion, Path]:
        """Copy a version's artifacts to ``dst`` (a new temporary folder when None, which the caller deletes); returns the
        version and the local path."""
        name, ref = parse_model_uri(uri_or_name) if ref is None else (uri_or_name, ref)
        version = self.get_model_version(name, ref)
        folder = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"{name}-v{version.version}-"))
        folder.mkdir(parents=True, exist_ok=True)
        return version, self.download_run_artifact(version.run_id, version.artifact_path, folder)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric a run logged (what a new version is usually judged by)."""
        with self._calling(f"read the metrics of run {run_id!r}"):
            return dict(self._client.get_run(run_id).data.metrics)

    def pinned(self, uri: str) -> RegistrySource:
        """The version ``models:/<name>@<alias>`` (or ``/<version>``) points at now, for nodes to download."""
        version = self.get_model_version(*parse_model_uri(uri))
        return RegistrySource(version.name, version.version, self.tracking_uri)

    def cached_model(self, uri: str, cache: str | Path) -> tuple[RegisteredVersion, Path]:
        """A local copy of the version ``uri`` names, downloaded once into ``cache`` and reused after.

        Copies are keyed by the source run, which no other store or version shares, and appear
        whole or not at all, so processes that ask at once never read half a download.
        """
        version = self.get_model_version(*parse_model_uri(uri))
        target = Path(cache) / "registry" / _cache_part(version.run_id, "run id") / _cache_part(version.artifact_path, "artifact_path")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                _, local = self.download_model(version.name, version.version, scratch)
                try:
                    os.rename(local, target)
                except OSError:  # another process finished the same download first
                    if not target.exists():
                        raise
        return version, target

    def load_checkpoint(self, uri_or_name: str, ref: str | None = None) -> dict[str, Any]:
        """A checkpoint version's contents, read with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

        Raises:
            RegistryError: the version is not a checkpoint file, or the file holds more than tensors and plain values.
        """
        with tempfile.TemporaryDirectory(prefix="mlplatform-checkpoint-") as scratch:
            version, path = self.download_model(uri_or_name, ref, scratch)
            if not path.is_file():
                raise RegistryError(f"{version.uri} is a {version.kind} folder, not a checkpoint file",
                                    error_code="INVALID_PARAMETER_VALUE")
            try:
                import torch  # here, not at the top: the `models` commands never read a checkpoint, and torch costs them 2 s

                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises UnpicklingError or RuntimeError for what weights_only refuses
                raise RegistryError(f"{version.uri}: refused to load {path.name}: {str(e).splitlines()[0]}",
                                    error_code="INVALID_PARAMETER_VALUE") from e

    def find_model(self, run_id: str, artifact_path: str | None = None) -> tuple[str, str]:
        """The model in a run's artifacts and its kind: ``artifact_path`` when given (a ``.pt`` is a ``dqn``
        checkpoint), else a folder holding ``config.json`` under ``model/`` (``emotion``), else the newest
        ``.pt`` under ``checkpoints/``.

        Raises:
            RegistryError: nothing of the kind is there.
        """
        if artifact_path is not None:
            return artifact_path, "dqn" if artifact_path.endswith(".pt") else "emotion"
        with self._calling(f"list the artifacts of run {run_id}"):
            for folder in self._walk(run_id, "model"):
                if any(Path(f.path).name == "config.json" for f in self._client.list_artifacts(run_id, folder)):
                    return folder, "emotion"
            checkpoints = sorted(f.path for f in self._client.list_artifacts(run_id, "checkpoints") if f.path.endswith(".pt"))
        if not checkpoints:
            raise RegistryError(f"run {run_id} has no model folder under model/ and no .pt under checkpoints/",
                                error_code="RESOURCE_DOES_NOT_EXIST")
        return checkpoints[-1], "dqn"

    def download_run_artifact(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        """Copy one artifact (a file or a folder) of a run into the folder ``dst``; returns its local path."""
        with self._calling(f"download {artifact_path!r} of run {run_id}"):
            return Path(self._client.download_artifacts(run_id, artifact_path, str(dst)))

    def add_run_artifacts(self, run_id: str, local_folder: str | Path, artifact_path: str) -> None:
        """Upload the files of ``local_folder`` into a run's artifacts under ``artifact_path`` (a finished run too)."""
        with self._calling(f"add artifacts to run {run_id}"):
            self._client.log_artifacts(run_id, str(local_folder), artifact_path)

    def _walk(self, run_id: str, path: str) -> list[str]:
        """``path`` and every folder below it in the run's artifacts."""
        folders = [path]
        for item in self._client.list_artifacts(run_id, path):
            if item.is_dir:
                folders += self._walk(run_id, item.path)
        return folders

    def _calling(self, action: str) -> Any:
        return translated_errors(action, self.tracking_uri, RegistryError)


def _cache_part(value: str, what: str) -> Path:
    """``value`` as a relative path that stays inside the cache (the tags it comes from can be edited by anyone
    with write access to the registry).

    Raises:
        RegistryError: an empty, absolute or ``..`` path.
    """
    path = Path(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise RegistryError(f"refused {what} {value!r}: a cached model's path must be relative, without '..'",
                            error_code="INVALID_PARAMETER_VALUE")
    return path


def _registered(version: ModelVersion) -> RegisteredVersion:
    tags = dict(version.tags or {})
    return RegisteredVersion(
        name=version.name, version=str(version.version), aliases=tuple(version.aliases or ()),
        kind=tags.pop("kind", "unknown"), run_id=version.run_id, artifact_path=tags.pop("artifact_path", ""),
        description=version.description or "", tags=tags,
    )
