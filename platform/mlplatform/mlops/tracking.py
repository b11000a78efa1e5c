"""Experiment tracking: one MLflow run per job, safe on a shared SQLite store and under Ray jobs.

A job (or a Tune trial) opens one `ExperimentTracker` in the one process that writes for the run,
the driver or rank 0; other workers report to that process through Ray, never to MLflow. SQLite
takes one writer at a time, so the tracker buffers metrics and sends them with
`MlflowClient.log_batch`, switches the store to WAL (readers such as `mlflow ui` stop blocking the
writer), and serialises the store's first-time schema creation, which MLflow cannot run from two
processes at once. MLflow itself sets `PRAGMA busy_timeout = 20000` on every session it opens on
SQLite, so a writer waits up to 20 s for the lock instead of failing.

`ray job submit --working-dir .` runs a job in a temporary copy of the folder, so a store path
relative to the cwd would be written into that copy and deleted with it: relative store and
artifact paths are rejected, and the submitting side hands the job `tracking_env_vars()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "ExperimentTracker", "TrackingError", "default_tracking_uri", "open_client", "tracking_env_vars", "translated_errors",
]

_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_UI_ADDRESS = "http://127.0.0.1:5000"


class TrackingError(RuntimeError):
    """The tracking store could not be used; `error_code` is MLflow's code when MLflow gave one."""

    def __init__(self, message: str, *, error_code: str | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


def default_tracking_uri() -> str:
    """The store to log to: ``MLFLOW_TRACKING_URI`` if set, else ``<cwd>/mlruns.db`` on SQLite.

    Returns:
        A tracking URI whose local paths, if any, are absolute.

    Raises:
        TrackingError: ``MLFLOW_TRACKING_URI`` names a path relative to the working folder.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return _check_absolute(uri) if uri else f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"


def tracking_env_vars() -> dict[str, str]:
    """Environment for a job submitted with ``runtime_env={"env_vars": ...}``, computed here.

    The job then logs to this side's store and tags this side's commit, since its temporary copy
    of the folder has neither a fixed path nor a ``.git``.

    Raises:
        TrackingError: the store or artifact root configured here is a relative path.
    """
    env = {"MLFLOW_TRACKING_URI": default_tracking_uri()}
    if root := _artifact_root():
        env["MLPLATFORM_ARTIFACT_ROOT"] = root
    if commit := _git_commit():
        env["MLPLATFORM_GIT_COMMIT"] = commit
    return env


class ExperimentTracker:
    """One MLflow run: config as params, metrics per step, plots and checkpoints as artifacts.

    Use it as a context manager so buffered metrics are flushed and the run is closed with the
    right status even when training raises. Several trackers may live in one process (each holds
    its own `MlflowClient`, none touches MLflow's global active run); one tracker belongs to one
    thread.

    Args:
        experiment_name: Experiment to log under; created on first use, by any number of
            processes at once.
        run_name: Name shown for a new run; ignored when resuming.
        tracking_uri: Store to log to; `default_tracking_uri()` when None.
        run_id: Resume this run of the same experiment instead of starting one.
        tags: Run tags set at start (also when resuming).
        flush_every: Buffered metric values that trigger a `log_batch`.

    Raises:
        ValueError: ``flush_every`` is below 1.
        TrackingError: the store cannot be opened, the experiment is deleted, or ``run_id`` is
            not an active run of this experiment.
    """

    def __init__(
        self,
        experiment_name: str,
        *,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        flush_every: int = 100,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got flush_every={flush_every}")
        self._uri = _check_absolute(tracking_uri) if tracking_uri else default_tracking_uri()
        self._flush_every = flush_every
        self._pending: list[Metric] = []
        self._finished = False
        with self._calling("open the store"):
            self._client = open_client(self._uri)
            self._experiment_id = self._get_or_create_experiment(experiment_name)
        with self._calling("start the run" if run_id is None else f"find run {run_id!r}"):
            if run_id is None:
                run = self._client.create_run(self._experiment_id, run_name=run_name)
            else:
                run = self._client.get_run(run_id)
        if run.info.experiment_id != self._experiment_id or run.info.lifecycle_stage != "active":
            raise TrackingError(
                f"run {run_id!r} is not an active run of experiment {experiment_name!r}",
                error_code="INVALID_PARAMETER_VALUE",
            )
        self._run_id = run.info.run_id
        if run_id is not None:
            with self._calling("resume the run"):
                self._client.update_run(self._run_id, status="RUNNING")
        self.set_tags({**_git_tags(), **_ray_job_tags(), **(tags or {})})

    @property
    def run_id(self) -> str:
        """The MLflow run this tracker writes to."""
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The experiment that holds the run."""
        return self._experiment_id

    @property
    def tracking_uri(self) -> str:
        """The store, its paths absolute: what a process resuming this run must be given."""
        return self._uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a config; nested mappings become dotted keys (``optim.lr``), values strings.

        Values longer than MLflow's 6000-character limit are cut, with a warning.

        Raises:
            TrackingError: MLflow refused a key, or a key was logged before with another value.
        """
        pairs = _to_strings(_flatten(params), MAX_PARAM_VAL_LENGTH)
        self._log_batch(params=[Param(key, value) for key, value in pairs])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metric values for one step; sent once `flush_every` values are waiting.

        NaN and ±inf are logged as they are, so a diverging loss stays visible; the SQLite store
        reads ±inf back as ±1.8e308.

        Raises:
            TypeError: a value is not a real number.
            TrackingError: the automatic flush failed.
        """
        timestamp_ms = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                entries.append(Metric(key, float(value), timestamp_ms, int(step)))
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric {key!r} must be a real number, got {value!r}") from e
        self._pending.extend(entries)
        if len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics with `log_batch`, at most 1000 per call.

        Raises:
            TrackingError: MLflow refused a batch as invalid (a bad key, say), which is dropped
                after the other batches are sent; or the store failed, and what was not sent
                stays buffered.
        """
        refused, dropped = None, 0
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            try:
                self._log_batch(metrics=chunk)
            except TrackingError as e:
                # MLflow refuses an invalid batch whole and would again; kept, it would block
                # every later flush and the closing of the run.
                if e.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                refused, dropped = refused or e, dropped + len(chunk)
            del self._pending[: len(chunk)]
        if refused:
            message = f"{refused}; {dropped} metric values dropped"
            raise TrackingError(message, error_code=refused.error_code) from refused

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags; values become strings, cut at MLflow's 8000 characters with a warning.

        Raises:
            TrackingError: MLflow refused a tag.
        """
        pairs = _to_strings(tags.items(), MAX_TAG_VAL_LENGTH)
        self._log_batch(tags=[RunTag(key, value) for key, value in pairs])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> str:
        """Copy a file or a directory (under its own name) into the run's artifacts.

        Returns:
            Its ``runs:/<run_id>/...`` URI, the form the model registry takes.

        Raises:
            TrackingError: the path cannot be read or the artifact store cannot be written.
        """
        self._check_open()
        with self._calling(f"log artifact {os.fspath(path)!r}"):
            self._client.log_artifact(self._run_id, os.fspath(path), artifact_path)
        name = Path(path).resolve().name
        return self._runs_uri(f"{artifact_path}/{name}" if artifact_path else name)

    def log_checkpoint(
        self, path: str | os.PathLike[str], artifact_path: str = "checkpoints"
    ) -> str:
        """Log a checkpoint file or directory; see `log_artifact`."""
        return self.log_artifact(path, artifact_path)

    def log_learning_curve(
        self,
        steps: Sequence[float],
        values: Sequence[float],
        *,
        name: str,
        xlabel: str = "step",
        ylabel: str | None = None,
        artifact_path: str = "plots",
    ) -> str:
        """Draw ``values`` against ``steps`` and log the PNG as ``<artifact_path>/<name>.png``.

        Returns:
            The plot's ``runs:/`` URI.

        Raises:
            ValueError: ``steps`` and ``values`` differ in length.
            TrackingError: the artifact store cannot be written.
        """
        from mlplatform.mlops.figures import learning_curves_figure  # matplotlib and scikit-learn: seconds a registry call does not need

        figure = learning_curves_figure(steps, {ylabel or name: values}, title=name, xlabel=xlabel)
        return self.log_figure(figure, f"{artifact_path}/{name}.png")

    def log_figure(self, figure: Figure, artifact_file: str) -> str:
        """Log a matplotlib figure as the PNG ``artifact_file`` (e.g. ``plots/confusion_matrix.png``); returns its ``runs:/`` URI.

        Raises:
            TrackingError: the artifact store cannot be written.
        """
        self._check_open()
        with self._calling(f"log figure {artifact_file!r}"):
            self._client.log_figure(self._run_id, figure, artifact_file)
        return self._runs_uri(artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and close the run; later calls do nothing.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.

        Raises:
            ValueError: unknown status.
            TrackingError: the last flush or closing the run failed; the run is closed whenever
                the store still answers.
        """
        if status not in _RUN_STATUSES:
            raise ValueError(f"status must be one of {_RUN_STATUSES}, got status={status!r}")
        if self._finished:
            return
        try:
            self.flush()
        finally:
            with self._calling("close the run"):
                self._client.set_terminated(self._run_id, status)
            self._finished = True

    def ui_hint(self) -> str:
        """How to look at this run: the ``mlflow ui`` command (loopback only) and the run's URL."""
        run_path = f"#/experiments/{self._experiment_id}/runs/{self._run_id}"
        if urlsplit(self._uri).scheme in ("http", "https"):
            return f"{self._uri.rstrip('/')}/{run_path}"
        store = shlex.quote(self._uri)
        command = f"mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000"
        return f"{command}\n{_UI_ADDRESS}/{run_path}"

    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
            return
        try:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except TrackingError as e:
            # The training error is the one to see; a tracking failure on the way out only warns.
            warnings.warn(f"could not close MLflow run {self._run_id}: {e}", stacklevel=2)

    def _get_or_create_experiment(self, name: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name, _artifact_location(self._uri))
            except MlflowException as e:
                # Another process created it between our lookup and our insert.
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self._client.get_experiment_by_name(name)
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"experiment {name!r} is deleted in {self._uri}; restore it with "
                f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`",
                error_code="INVALID_STATE",
            )
        return experiment.experiment_id

    def _log_batch(
        self,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[Param] = (),
        tags: Sequence[RunTag] = (),
    ) -> None:
        self._check_open()
        with self._calling("log_batch"):
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = params[i : i + MAX_PARAMS_TAGS_PER_BATCH]
                self._client.log_batch(self._run_id, params=chunk, synchronous=True)
            for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = tags[i : i + MAX_PARAMS_TAGS_PER_BATCH]
                self._client.log_batch(self._run_id, tags=chunk, synchronous=True)
            if metrics:
                self._client.log_batch(self._run_id, metrics=metrics, synchronous=True)

    def _check_open(self) -> None:
        if self._finished:
            message = f"run {self._run_id} is already finished"
            raise TrackingError(message, error_code="INVALID_STATE")

    def _runs_uri(self, artifact_path: str) -> str:
        return f"runs:/{self._run_id}/{artifact_path}"

    def _calling(self, action: str) -> contextlib.AbstractContextManager[None]:
        return translated_errors(action, self._uri)


@contextlib.contextmanager
def translated_errors(action: str, uri: str, error: type[TrackingError] = TrackingError) -> Iterator[None]:
    """Turn MLflow's and the file system's errors into one-line ``error`` carrying MLflow's code."""
    try:
        yield
    except MlflowException as e:
        raise error(f"{action} on {uri} failed: {_first_line(e.message)}", error_code=e.error_code) from e
    except (OSError, sqlite3.Error) as e:
        raise error(f"{action} on {uri} failed: {_first_line(str(e))}") from e


def open_client(uri: str) -> MlflowClient:
    """A client on ``uri``; a SQLite file is switched to WAL, and a fresh one gets its schema.

    MLflow builds the schema as the client is constructed, and its migrations break when two
    processes run them on one file at once: the first process to find the file without a schema
    builds it while holding a lock beside the file, and the others wait on that lock.
    """
    db_path = _sqlite_path(uri)
    if db_path is None:
        return MlflowClient(tracking_uri=uri)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db_path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as connection:
            (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            (has_schema,) = connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'"
            ).fetchone()
        if mode != "wal":
            warnings.warn(
                f"{db_path} stays in journal mode {mode!r} (no WAL on this file system?); "
                "readers will block the writer",
                stacklevel=3,
            )
        if not has_schema:
            return MlflowClient(tracking_uri=uri)
    return MlflowClient(tracking_uri=uri)


def _sqlite_path(uri: str) -> Path | None:
    scheme, sep, rest = uri.partition(":///")
    return Path(rest.split("?", 1)[0]) if sep and scheme.startswith("sqlite") else None


def _check_absolute(uri: str) -> str:
    """Return ``uri`` unchanged if every local path in it is absolute."""
    sqlite_path = _sqlite_path(uri)
    path = sqlite_path
    if path is None and urlsplit(uri).scheme in ("", "file"):
        path = Path(urlsplit(uri).path)
    if path is not None and not path.is_absolute():
        absolute = Path.cwd().resolve() / path
        raise TrackingError(
            f"tracking URI {uri!r} is relative to the working folder, which is a temporary copy "
            f"under `ray job submit`; give an absolute one such as "
            f"{f'sqlite:///{absolute}' if sqlite_path else str(absolute)!r}",
            error_code="INVALID_PARAMETER_VALUE",
        )
    return uri


def _artifact_root() -> str | None:
    root = os.environ.get("MLPLATFORM_ARTIFACT_ROOT")
    if root:
        if urlsplit(root).scheme in ("", "file") and not Path(urlsplit(root).path).is_absolute():
            raise TrackingError(
                f"MLPLATFORM_ARTIFACT_ROOT={root!r} must be absolute or a URI",
                error_code="INVALID_PARAMETER_VALUE",
            )
        return root
    return None


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a new experiment: the env override, else ``mlruns/`` beside a SQLite file.

    None leaves the choice to the store (a server's artifact proxy, a file store's own folder).
    """
    db_path = _sqlite_path(uri)
    return _artifact_root() or (str(db_path.parent / "mlruns") if db_path else None)


RAY_JOB_TAG = "ray.job_submission_id"


def job_runs(submission_id: str, tracking_uri: str | None = None) -> list[str]:
    """The top-level runs (nested trial runs left out) that the Ray job ``submission_id`` logged, oldest first.

    Raises:
        TrackingError: the store cannot be read.
    """
    uri = _check_absolute(tracking_uri) if tracking_uri else default_tracking_uri()
    with translated_errors(f"find the runs of job {submission_id!r}", uri):
        client = open_client(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.`{RAY_JOB_TAG}` = '{submission_id}'",
                                  order_by=["attributes.start_time ASC"]) if experiments else []
    return [run.info.run_id for run in runs if "mlflow.parentRunId" not in run.data.tags]


def _ray_job_tags() -> dict[str, str]:
    """The submission id of the Ray job this process is the driver of; Ray hands a job's driver its config in the environment."""
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}
    submission_id = metadata.get("job_submission_id")
    return {RAY_JOB_TAG: str(submission_id)} if submission_id else {}


def _git_tags() -> dict[str, str]:
    commit = _git_commit()
    if commit is None:
        return {}
    sha, dirty = commit.removesuffix("-dirty"), commit.endswith("-dirty")
    return {
        "mlflow.source.git.commit": sha,
        "mlplatform.git_commit": sha,
        "mlplatform.git_dirty": "true" if dirty else "false",
    }


def _git_commit() -> str | None:
    """``MLPLATFORM_GIT_COMMIT``, else this checkout's HEAD; ``-dirty`` marks local changes."""
    return os.environ.get("MLPLATFORM_GIT_COMMIT") or _git_head()


@functools.cache
def _git_head() -> str | None:
    def git(*args: str) -> str:
        package_dir = Path(__file__).resolve().parent
        done = subprocess.run(
            ["git", "-C", str(package_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def _flatten(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _to_strings(items: Iterable[tuple[str, Any]], limit: int) -> list[tuple[str, str]]:
    """Stringify values, cutting (with a warning) what MLflow would refuse as too long."""
    pairs = []
    for key, value in items:
        text = str(value)
        if len(text) > limit:
            message = f"{key!r} is {len(text)} characters; MLflow keeps {limit}, the rest is cut"
            warnings.warn(message, stacklevel=3)
            text = text[:limit]
        pairs.append((str(key), text))
    return pairs


def _first_line(message: str) -> str:
    return str(message).strip().splitlines()[0] if str(message).strip() else "no message"
