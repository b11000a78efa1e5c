"""Shared fixtures: a real local Ray (in-process) and a real `ray start --head` cluster on loopback."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Iterator[None]:
    """Built vocabularies and models go to a test folder, never to the user's ~/.cache."""
    saved = os.environ.get("MLPLATFORM_HOME")
    os.environ["MLPLATFORM_HOME"] = str(tmp_path_factory.mktemp("mlplatform-home"))
    yield
    if saved is None:
        os.environ.pop("MLPLATFORM_HOME")
    else:
        os.environ["MLPLATFORM_HOME"] = saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A two-CPU Ray started inside the test process, as a laptop user gets from ray.init()."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Ray head on loopback with token authentication, stopped by its own pid at the end.

    Yields the environment a client needs: the dashboard (job API) address and the token.
    """
    dashboard_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    client_env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    # Ready means a job can run end to end: the job API answers before its agent can take jobs.
    deadline = time.monotonic() + 120
    probe = [str(BIN / "ray"), "job", "submit", "--", "python", "-c", "print('ready')"]
    while subprocess.run(probe, env=client_env, capture_output=True).returncode != 0:
        assert head.poll() is None and time.monotonic() < deadline, "ray head did not come up"
        time.sleep(2)
    yield client_env
    head.send_signal(signal.SIGTERM)
    head.wait(timeout=60)
    log.close()
