"""The three-node cluster the multi-node tests share, built by the same code as `mlplatform cluster local up`.

A head (1 CPU, the custom resource ``head``) and worker nodes w1 and w2 (2 CPUs each), each worker
in its own mount namespace; an MLflow server with proxied artifacts and an S3 API server that every
node reaches. Ports are free ones, never the defaults a user's own stack may hold.
"""

import dataclasses
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlplatform import localcluster
from mlplatform.localcluster import ClusterConfig, ClusterState
from mlplatform.services import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclasses.dataclass
class Cluster:
    """The running cluster and what tests do to it."""

    state: ClusterState
    token: str
    shell_home: Path
    """HOME of a fresh login on this machine: only the Ray token file in it."""

    @property
    def dashboard(self) -> str:
        return self.state.urls["dashboard"]

    @property
    def tracking_uri(self) -> str:
        return self.state.env["MLFLOW_TRACKING_URI"]

    def fresh_shell(self, script: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """``script`` in a new login's shell in the repository root: the cluster's address, nothing else exported."""
        return subprocess.run(["env", "-i", f"HOME={self.shell_home}", "PATH=/usr/bin:/bin", "RAY_AUTH_MODE=token",
                               f"RAY_ADDRESS={self.dashboard}", "bash", "-e", "-c", script],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout_s)

    def submit(self, *entrypoint: str) -> str:
        """``ray job submit --no-wait`` of an entrypoint from a fresh shell; returns the submission id."""
        import shlex

        submission_id = f"test-{secrets.token_hex(4)}"
        done = self.fresh_shell(f".venv/bin/ray job submit --no-wait --working-dir . --submission-id {submission_id} -- "
                                + shlex.join(entrypoint), timeout_s=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return submission_id

    def jobs(self):  # noqa: ANN201  (Ray's JobSubmissionClient)
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def wait_job(self, submission_id: str, timeout_s: float = 600) -> str:
        """The job's final status, and its logs on failure for the assertion message."""
        deadline = time.monotonic() + timeout_s
        while (status := str(self.jobs().get_job_status(submission_id).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, f"job {submission_id} still {status}: " + self.jobs().get_job_logs(submission_id)[-3000:]
            time.sleep(2)
        return status

    def actors(self, class_name: str) -> list[dict]:
        """Every actor of ``class_name`` the cluster has seen (dead ones too), with its node."""
        from ray.util.state import list_actors

        found = list_actors(address=self.dashboard, filters=[("class_name", "=", class_name)], detail=True, limit=10_000,
                            raise_on_missing_output=False)
        return [dataclasses.asdict(a) if dataclasses.is_dataclass(a) else dict(a) for a in found]

    def node_ids(self) -> dict[str, str]:
        """Node id of each node, by name: head, w1, w2 (the custom resource each carries)."""
        from ray.util.state import list_nodes

        names = {}
        for node in list_nodes(address=self.dashboard, detail=True, limit=100):
            if node.state == "ALIVE":
                name = next((r for r in node.resources_total if r == "head" or r in self.state.nodes), None)
                if name:
                    names[name] = node.node_id
        return names

    def kill(self, name: str) -> float:
        """Lose worker node ``name`` (SIGKILL of all its processes); returns when it happened (``time.time()``)."""
        when = time.time()
        assert localcluster.kill_node(self.state, name), f"{name} was not running"
        return when

    def heal(self) -> None:
        """Start again every worker node a test killed, isolated as before, and wait until all nodes are alive."""
        def start(name: str) -> None:
            localcluster.start_node(self.state, name, self.token, repository=REPO)

        for name in self.state.nodes:
            if not self.state.process(f"ray-{name}").alive():
                start(name)
        localcluster.wait_for_nodes(self.state, 1 + len(self.state.nodes), 120, restart=start)


@pytest.fixture
def cluster(three_nodes: Cluster) -> Cluster:
    """The shared cluster with all three nodes alive, whatever the test before did to it."""
    three_nodes.heal()
    return three_nodes


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory) -> Iterator[Cluster]:
    """A head and two isolated worker nodes, their stores, and a fresh login's HOME holding the token."""
    home = tmp_path_factory.mktemp("cluster")
    token = os.environ["RAY_AUTH_TOKEN"]  # this process's own (tests/conftest.py): its Ray clients reach the cluster
    shell_home = home / "login"
    (shell_home / ".ray").mkdir(parents=True)
    (shell_home / ".ray" / "auth_token").write_text(token)
    config = ClusterConfig(home=str(home), workers=2, num_cpus=1, worker_cpus=2, object_store_mb=300, prometheus=False,
                           ray_port=free_port(), dashboard_port=free_port(), client_port=free_port(), metrics_port=free_port(),
                           mlflow_port=free_port(), s3_port=free_port())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
        try:
            state = localcluster.up(config, lambda line: None, repository=REPO)
            for key, value in state.env.items():  # this process reaches the stores as the nodes do
                patch.setenv(key, value)
            yield Cluster(state, token, shell_home)
        finally:  # whatever started, even when up() failed half-way
            started = time.monotonic()
            localcluster.down(home, lambda line: None)
            print(f"\ncluster down in {time.monotonic() - started:.1f}s")
    assert not ClusterState.load(home)
