"""Shared fixtures: a real local Ray (in-process) and a real `ray start --head` cluster on loopback."""

import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadFileScheduling

# Ray reads its authentication mode once per process, when first asked: every Ray this session starts
# or joins uses token authentication, with a token of the session's own (never the user's ~/.ray one).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

import ray  # noqa: E402  (after the authentication settings above)

from mlplatform.raynodes import ray_node_argv, start_ray_head  # noqa: E402
from mlplatform.services import ServiceState, free_port  # noqa: E402

BIN = Path(sys.executable).parent


# The modules that start a whole stack or a multi-node cluster (minutes each). Under `make test`'s processes they
# are one unit of work, taken first: both at once starve each other past the tests' timeouts on two cores, and
# starting the long unit first lets the many short files fill the other process.
PLATFORM_MODULES = ("tests/cluster/test_multinode.py", "tests/test_demo.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The platform modules first, the rest in their order (`make test` keeps this order: --no-loadscope-reorder)."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in PLATFORM_MODULES)


class PlatformUnitScheduling(LoadFileScheduling):
    """pytest-xdist's whole-file units, but the platform modules together form one unit."""

    def _split_scope(self, nodeid: str) -> str:
        module = super()._split_scope(nodeid)
        return "platform" if module in PLATFORM_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> PlatformUnitScheduling | None:
    """`--dist loadfile` (what `make test` asks for) schedules the platform modules as one unit."""
    return PlatformUnitScheduling(config, log) if config.getvalue("dist") == "loadfile" else None


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
