"""Shared fixtures: a real local Ray (in-process) and a real `ray start --head` cluster on loopback."""

import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray reads its authentication mode once per process, when first asked: every Ray this session starts
# or joins uses token authentication, with a token of the session's own (never the user's ~/.ray one).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

import ray  # noqa: E402  (after the authentication settings above)

from mlplatform.raynodes import ray_node_argv, start_ray_head  # noqa: E402
from mlplatform.services import ServiceState, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules marked ``platform`` (minutes each) first, the rest in their order: under `make test`'s
    two processes, which take whole files in this order, the long ones then overlap the many short ones."""
    items.sort(key=lambda item: item.get_closest_marker("platform") is None)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something listens on for the whole test."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


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


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A two-CPU Ray started inside the test process, as a laptop user gets from ray.init()."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Ray head on loopback with token authentication (``ray start --head``), stopped by its own pid at the end.

    Yields the environment a client needs: the dashboard (job API) address and the token.
    """
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    state = ServiceState(str(tmp_path_factory.mktemp("ray")))
    try:
        dashboard = start_ray_head(state, port=free_port(), dashboard_port=free_port(), client_port=free_port(),
                                   node_argv=ray_node_argv(num_cpus=2, resources={}, object_store_bytes=None), env=env,
                                   timeout_s=120)
        yield {**env, "RAY_API_SERVER_ADDRESS": dashboard}
    finally:
        state.stop_all()
