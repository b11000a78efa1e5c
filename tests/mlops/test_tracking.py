"""ExperimentTracker on a real MLflow SQLite store: what it logs, where, and under contention."""

import contextlib
import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlplatform.mlops.tracking import (
    ExperimentTracker,
    TrackingError,
    default_tracking_uri,
    job_runs,
    tracking_env_vars,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One store for the module (MLflow's schema creation takes seconds); tests use own names."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"
    ExperimentTracker("warm-up", tracking_uri=uri).finish()
    return uri


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLPLATFORM_ARTIFACT_ROOT", "MLPLATFORM_GIT_COMMIT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tracker(store, request):
    with ExperimentTracker(request.node.name, tracking_uri=store) as tracker:
        yield tracker


def read_run(tracker: ExperimentTracker):
    return MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)


def history(tracker: ExperimentTracker, key: str) -> list[tuple[int, float]]:
    metrics = MlflowClient(tracker.tracking_uri).get_metric_history(tracker.run_id, key)
    return sorted((m.step, m.value) for m in metrics)


def test_params_are_flattened_and_stringified(tracker):
    tracker.log_params({"optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "seed": 1, "note": None})
    with pytest.warns(UserWarning, match="'long' is 6001 characters; MLflow keeps 6000"):
        tracker.log_params({"long": "x" * 6001})
    params = read_run(tracker).data.params
    assert params == {
        "optim.lr": "0.0003",
        "optim.betas": "[0.9, 0.99]",
        "seed": "1",
        "note": "None",
        "long": "x" * 6000,
    }


def test_metrics_are_buffered_then_sent_in_batches_of_at_most_1000(store):
    with ExperimentTracker("batched", tracking_uri=store, flush_every=5000) as tracker:
        for step in range(1200):
            tracker.log_metrics({"loss": 1 / (step + 1), "lr": step * 1e-3}, step=step)
        assert history(tracker, "loss") == []
        tracker.flush()
    assert history(tracker, "loss") == [(s, 1 / (s + 1)) for s in range(1200)]
    assert history(tracker, "lr") == [(s, s * 1e-3) for s in range(1200)]


def test_metrics_flush_on_their_own_every_flush_every_values(store):
    with ExperimentTracker("auto-flush", tracking_uri=store, flush_every=10) as tracker:
        for step in range(25):
            tracker.log_metrics({"x": step}, step=step)
        assert [s for s, _ in history(tracker, "x")] == list(range(20))
    assert len(history(tracker, "x")) == 25


def test_non_finite_values_are_kept(tracker):
    tracker.log_metrics({"loss": float("nan"), "grad": float("inf")}, step=3)
    tracker.flush()
    ((step, loss),) = history(tracker, "loss")
    assert step == 3 and math.isnan(loss)
    assert history(tracker, "grad") == [(3, sys.float_info.max)]


def test_a_value_that_is_not_a_number_is_refused_before_buffering(tracker):
    with pytest.raises(TypeError, match="metric 'b' must be a real number, got 'high'"):
        tracker.log_metrics({"a": 1.0, "b": "high"}, step=0)
    tracker.flush()
    assert history(tracker, "a") == []


def test_a_batch_mlflow_refuses_is_dropped_so_the_run_still_closes(store):
    tracker = ExperimentTracker("refused", tracking_uri=store, flush_every=1000)
    tracker.log_metrics({"loss(train)": 1.0, "loss": 1.0}, step=0)
    with pytest.raises(TrackingError, match=r"loss\(train\).*; 2 metric values dropped") as info:
        tracker.finish()
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert read_run(tracker).info.status == "FINISHED"


def test_learning_curve_png_and_checkpoints_are_artifacts(tracker, tmp_path):
    plot_uri = tracker.log_learning_curve(
        [0, 10, 20], [1.0, 0.5, 0.2], name="loss", xlabel="env steps", ylabel="td loss"
    )
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    folder = tmp_path / "step_20"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    file_uri = tracker.log_checkpoint(checkpoint)
    folder_uri = tracker.log_checkpoint(folder)

    run_id = tracker.run_id
    assert plot_uri == f"runs:/{run_id}/plots/loss.png"
    assert (file_uri, folder_uri) == (
        f"runs:/{run_id}/checkpoints/checkpoint.pt",
        f"runs:/{run_id}/checkpoints/step_20",
    )
    artifacts = Path(read_run(tracker).info.artifact_uri)
    assert (artifacts / "plots/loss.png").read_bytes().startswith(PNG_MAGIC)
    assert (artifacts / "checkpoints/checkpoint.pt").read_bytes() == b"weights"
    assert (artifacts / "checkpoints/step_20/model.safetensors").is_file()


@pytest.mark.parametrize(
    ("env_value", "commit", "dirty"),
    [("0123abcd", "0123abcd", "false"), ("0123abcd-dirty", "0123abcd", "true")],
)
def test_git_commit_tag_comes_from_the_environment(store, monkeypatch, env_value, commit, dirty):
    monkeypatch.setenv("MLPLATFORM_GIT_COMMIT", env_value)
    with ExperimentTracker("git", tracking_uri=store, tags={"team": "rl"}) as tracker:
        tags = read_run(tracker).data.tags
    assert tags["mlflow.source.git.commit"] == tags["mlplatform.git_commit"] == commit
    assert tags["mlplatform.git_dirty"] == dirty
    assert tags["team"] == "rl"


def test_runs_are_tagged_with_the_ray_job_that_logged_them(store, monkeypatch):
    # what Ray's job supervisor hands the driver of `ray job submit`
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_A1"}}')
    with ExperimentTracker("job-tags-a", tracking_uri=store) as first:
        ExperimentTracker("job-tags-a", tracking_uri=store, tags={"mlflow.parentRunId": first.run_id}).finish()
    with ExperimentTracker("job-tags-b", tracking_uri=store) as second:
        pass
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    with ExperimentTracker("job-tags-b", tracking_uri=store) as outside:
        pass
    assert MlflowClient(store).get_run(first.run_id).data.tags["ray.job_submission_id"] == "raysubmit_A1"
    assert "ray.job_submission_id" not in MlflowClient(store).get_run(outside.run_id).data.tags
    assert job_runs("raysubmit_A1", store) == [first.run_id, second.run_id]  # across experiments, nested runs left out
    assert job_runs("raysubmit_none", store) == []


def test_experiment_creation_is_idempotent(store):
    first = ExperimentTracker("idempotent", tracking_uri=store)
    second = ExperimentTracker("idempotent", tracking_uri=store)
    assert first.experiment_id == second.experiment_id
    assert first.run_id != second.run_id
    first.finish()
    second.finish()


def test_store_is_switched_to_wal(store):
    db_path = store.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_writer_holding_the_lock_delays_logging_without_failing_it(tracker):
    locked = threading.Event()

    def hold_the_write_lock(seconds: float) -> None:
        db_path = tracker.tracking_uri.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(seconds)
            other.execute("COMMIT")

    holder = threading.Thread(target=hold_the_write_lock, args=(1.5,))
    holder.start()
    locked.wait()
    started = time.monotonic()
    tracker.log_metrics({"x": 1.0}, step=0)
    tracker.flush()
    holder.join()
    assert time.monotonic() - started >= 1.0
    assert history(tracker, "x") == [(0, 1.0)]


def test_artifacts_stay_beside_the_store_when_the_cwd_changes(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ExperimentTracker("moved-cwd", tracking_uri=store) as tracker:
        tracker.log_artifact(Path(__file__))
    beside_store = Path(store.removeprefix("sqlite:///")).parent / "mlruns"
    experiment = MlflowClient(store).get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == str(beside_store)
    assert (beside_store / tracker.run_id / "artifacts" / Path(__file__).name).is_file()
    assert not list(tmp_path.iterdir())


def test_artifact_root_can_be_set_and_must_be_absolute(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    with ExperimentTracker("own-root", tracking_uri=store) as tracker:
        tracker.log_artifact(Path(__file__), artifact_path="code")
    run_artifacts = tmp_path / "artifacts" / tracker.run_id / "artifacts"
    assert (run_artifacts / "code" / Path(__file__).name).is_file()
    monkeypatch.setenv("MLPLATFORM_ARTIFACT_ROOT", "artifacts")
    with pytest.raises(TrackingError, match="ROOT='artifacts' must be absolute"):
        ExperimentTracker("relative-root", tracking_uri=store)


@pytest.mark.parametrize(
    ("error", "status"), [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_context_manager_flushes_and_sets_the_status(store, error, status):
    with pytest.raises(error) if error else contextlib.nullcontext():
        with ExperimentTracker("status", tracking_uri=store, flush_every=1000) as tracker:
            tracker.log_metrics({"x": 1.0}, step=7)
            if error:
                raise error("boom")
    assert read_run(tracker).info.status == status
    assert history(tracker, "x") == [(7, 1.0)]


def test_a_finished_run_refuses_more_logging(store):
    tracker = ExperimentTracker("closed", tracking_uri=store)
    tracker.finish()
    tracker.finish()
    with pytest.raises(TrackingError, match="is already finished") as info:
        tracker.log_params({"a": 1})
    assert info.value.error_code == "INVALID_STATE"


def test_resume_by_run_id_appends_to_the_same_run(store):
    with ExperimentTracker("resume", tracking_uri=store) as first:
        first.log_params({"lr": 0.1})
        for step in range(5):
            first.log_metrics({"loss": step}, step=step)
    with ExperimentTracker("resume", tracking_uri=store, run_id=first.run_id) as second:
        assert read_run(second).info.status == "RUNNING"
        second.log_params({"lr": 0.1})
        for step in range(5, 10):
            second.log_metrics({"loss": step}, step=step)
    assert second.run_id == first.run_id
    assert history(second, "loss") == [(s, float(s)) for s in range(10)]
    assert read_run(second).info.status == "FINISHED"
    with pytest.raises(TrackingError, match="is not an active run of experiment 'other'"):
        ExperimentTracker("other", tracking_uri=store, run_id=first.run_id)


def test_mlflow_tracking_uri_is_respected(tmp_path, monkeypatch):
    db = tmp_path / "elsewhere" / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLPLATFORM_GIT_COMMIT", "feedbeef")
    assert tracking_env_vars() == {
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "MLPLATFORM_GIT_COMMIT": "feedbeef",
    }
    with ExperimentTracker("env") as tracker:
        pass
    assert tracker.tracking_uri == f"sqlite:///{db}"
    assert MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id).info.status == "FINISHED"
    hint = tracker.ui_hint()
    assert hint.splitlines() == [
        f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000",
        f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}",
    ]


def test_default_store_is_an_absolute_sqlite_file_in_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns.db"


@pytest.mark.parametrize("uri", ["sqlite:///relative.db", "mlruns", "file:./mlruns"])
def test_a_store_relative_to_the_cwd_is_refused(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match="relative to the working folder") as info:
        default_tracking_uri()
    assert str(tmp_path.resolve()) in str(info.value)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_an_unusable_store_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlruns.db'}"
    with pytest.raises(TrackingError) as info:
        ExperimentTracker("x", tracking_uri=uri)
    assert uri in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_arguments_are_refused_early(tracker):
    with pytest.raises(ValueError, match="flush_every must be >= 1, got flush_every=0"):
        ExperimentTracker("bad", tracking_uri=tracker.tracking_uri, flush_every=0)
    with pytest.raises(ValueError, match="status must be one of .*, got status='DONE'"):
        tracker.finish("DONE")


WRITER = textwrap.dedent(
    """
    import sys
    from mlplatform.mlops.tracking import ExperimentTracker

    print("ready", flush=True)
    sys.stdin.readline()
    with ExperimentTracker("shared", tracking_uri=sys.argv[1], flush_every=100) as tracker:
        for step in range(400):
            tracker.log_metrics({"a": step, "b": -step}, step=step)
    print(tracker.run_id)
    """
)


def test_four_processes_share_a_fresh_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    # Start-up (Python, MLflow) takes seconds; release all four together onto the fresh file.
    assert [w.stdout.readline() for w in writers] == ["ready\n"] * 4
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    results = [(w.communicate(timeout=120), w.returncode) for w in writers]
    for (_, stderr), returncode in results:
        assert returncode == 0, stderr
        assert "database is locked" not in stderr
    run_ids = {stdout.strip() for (stdout, _), _ in results}
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "shared"]
    runs = client.search_runs([experiment.experiment_id])
    assert {run.info.run_id for run in runs} == run_ids and len(run_ids) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "a")) == 400
        assert len(client.get_metric_history(run.info.run_id, "b")) == 400
