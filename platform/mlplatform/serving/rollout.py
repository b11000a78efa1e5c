"""Follow a registry alias: load a new version off the request path, check it, swap atomically, keep the old on failure."""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from mlplatform.mlops.registry import ModelRegistry, RegisteredVersion

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT")
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def without_uris(message: str) -> str:
    """``message`` with every ``scheme://...`` replaced by ``<uri>``: a tracking URI can carry credentials, and the
    rollout error is shown to anyone who asks ``GET /v1/models`` (the replica's log keeps the full text)."""
    return _URI.sub("<uri>", message)


class AliasFollower(Generic[ModelT]):
    """Serves whatever version ``ref`` (an alias, or a pinned version number) points at.

    The first version loads in the constructor, so a replica is ready only once it can answer.
    Later versions load in a background thread while the current one keeps serving; a version
    that fails to load or fails ``probe`` is not swapped in, and ``last_error`` says why.
    The swap is one attribute assignment, so every request sees either the old pair or the new.

    Args:
        registry: where versions are looked up and downloaded from.
        name: the registered model.
        ref: alias (``champion``) or version number to follow.
        load: builds the servable model from a downloaded path.
        probe: raises if a freshly loaded model cannot answer (the health check before a swap).
        on_swap: told the new version after each swap (e.g. to set a gauge).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        name: str,
        ref: str,
        *,
        load: Callable[[Path], ModelT],
        probe: Callable[[ModelT], object],
        on_swap: Callable[[RegisteredVersion], None] = lambda version: None,
    ) -> None:
        self.registry, self.name, self.ref = registry, name, ref
        self._load, self._probe, self._on_swap = load, probe, on_swap
        self.last_error: str | None = None
        self._rejected: str | None = None  # a version that failed is not retried until the alias moves again
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._interval_s = 2.0
        self.current: tuple[RegisteredVersion, ModelT] = self._prepare(registry.get_model_version(name, ref))
        on_swap(self.current[0])
        self._watcher = threading.Thread(target=self._watch, name=f"follow-{name}@{ref}", daemon=True)
        self._watcher.start()

    def follow(self, ref: str, *, poll_interval_s: float | None = None) -> None:
        """Follow another alias or version from now on (checked at once, in the background)."""
        if poll_interval_s is not None:
            self._interval_s = poll_interval_s
        if ref != self.ref:
            self.ref = ref
            threading.Thread(target=self.refresh, daemon=True).start()

    def refresh(self) -> bool:
        """Load and swap in the version ``ref`` points at, if it changed; True when a swap happened."""
        with self._refresh_lock:
            try:
                version = self.registry.get_model_version(self.name, self.ref)
                if version.version in (self.current[0].version, self._rejected):
                    return False
                self._rejected = version.version
                prepared = self._prepare(version)
            except Exception as e:  # any failure keeps the serving version; it is reported, not raised
                error = f"{self.name}@{self.ref}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("rollout failed, still serving version %s: %s", self.current[0].version, error)
                self.last_error = without_uris(error)
                return False
            self.current = prepared
            self.last_error = self._rejected = None
            self._on_swap(prepared[0])
            log.info("now serving %s version %s", self.name, prepared[0].version)
            return True

    def info(self) -> dict[str, str | None]:
        """What is serving: name, kind, version, the alias or version followed, and the last rollout error."""
        version = self.current[0]
        return {"name": version.name, "kind": version.kind, "version": version.version, "alias": self.ref,
                "last_rollout_error": self.last_error}

    def stop(self) -> None:
        """End the background watch."""
        self._stop.set()

    def _prepare(self, version: RegisteredVersion) -> tuple[RegisteredVersion, ModelT]:
        # the loaded model holds everything it needs in memory, so the download goes as soon as it is read: disk
        # does not grow with each promotion
        with tempfile.TemporaryDirectory(prefix=f"mlplatform-rollout-{self.name}-v{version.version}-") as scratch:
            _, path = self.registry.download_model(self.name, version.version, scratch)
            model = self._load(path)
        self._probe(model)
        return version, model

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.refresh()
