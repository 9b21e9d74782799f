from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/fixtures.py is imported as `fixtures` by every test module
sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402

# Fixtures that bring real releases from the package index: a test using any of them is
# a `network` test whether or not it says so (`pytest -m "not network"` must pass offline).
NETWORK_FIXTURES = frozenset({
    "seeded_cache", "b70_gemma4_ws", "lunar_lake_moe_ws", "pristine_0190", "patched_0190",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # a module names its own such fixtures in NETWORK_FIXTURES too
        local = getattr(getattr(item, "module", None), "NETWORK_FIXTURES", frozenset())
        if (NETWORK_FIXTURES | local).intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # fixtures.vllm_sdist refuses to run for a test not marked `network`, cached or not,
    # so a missing marker shows on every machine, not only on one with a cold cache
    fixtures.NETWORK_ALLOWED = item.get_closest_marker("network") is not None


@pytest.fixture(autouse=True)
def _no_network_unless_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked `network` may reach this machine's loopback only."""
    if request.node.get_closest_marker("network") is not None:
        return
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(str(host)):
            raise AssertionError(f"test {request.node.nodeid} reached {address} but is not marked `network`")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True, scope="session")
def _private_stackbuild_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes into the user's stackbuild cache: the session gets one of its own
    (tests that need a particular cache still set STACKBUILD_CACHE themselves), and none
    writes bytecode into the shared test data."""
    saved = {k: os.environ.get(k) for k in ("STACKBUILD_CACHE", "XDG_CACHE_HOME", "PYTHONDONTWRITEBYTECODE")}
    os.environ["STACKBUILD_CACHE"] = str(tmp_path_factory.mktemp("session-cache"))
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    # tests import vLLM code straight from the shared pristine trees in STACKBUILD_TEST_CACHE
    # (read-only by convention): no __pycache__ may be written into them, in this process
    # or in the interpreters it starts
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    written, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    yield
    sys.dont_write_bytecode = written
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def seeded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session stackbuild cache pre-seeded with the real vLLM sdists."""
    return fixtures.seed_cache(tmp_path_factory.mktemp("sbcache"))


@pytest.fixture(scope="session")
def b70_gemma4_ws(tmp_path_factory: pytest.TempPathFactory, seeded_cache: Path):  # type: ignore[no-untyped-def]
    """The shipped b70-gemma4 recipe applied with `stackbuild apply` (ApplyResult)."""
    return fixtures.apply_shipped("b70-gemma4", tmp_path_factory.mktemp("ws") / "b70-gemma4", seeded_cache)


@pytest.fixture(scope="session")
def lunar_lake_moe_ws(tmp_path_factory: pytest.TempPathFactory, seeded_cache: Path):  # type: ignore[no-untyped-def]
    """The shipped lunar-lake-moe recipe applied with `stackbuild apply` (ApplyResult)."""
    return fixtures.apply_shipped("lunar-lake-moe", tmp_path_factory.mktemp("ws") / "lunar-lake-moe", seeded_cache)
