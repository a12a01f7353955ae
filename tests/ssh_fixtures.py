"""Pytest fixtures for SSH tests: real sshd servers, a cuttable TCP proxy, a shared remote root.

Use as a plugin (``pytest_plugins = ["tests.ssh_fixtures"]`` or ``from .ssh_fixtures import *``
in a conftest). Every server a fixture starts, it stops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

import pytest

try:
    from .sshd import SSHServer, TCPProxy, require_sshd
    from .workers import stop_workers
except ImportError:  # imported as a top-level module (rootdir-relative)
    from sshd import SSHServer, TCPProxy, require_sshd  # type: ignore[no-redef]
    from workers import stop_workers  # type: ignore[no-redef]


def _test_python() -> str:
    """An interpreter that has cloudpickle and IPython, so the remote venv needs no pip install."""
    env = os.environ.get("REMOTEMAGIC_TEST_PYTHON")
    if env:
        return env
    if sys.prefix != sys.base_prefix:  # inside a venv: its packages are not the base's
        return getattr(sys, "_base_executable", sys.executable)
    return sys.executable


TEST_PYTHON = _test_python()


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory, wheel_sources: str) -> Iterator[SSHServer]:
    """A real sshd on 127.0.0.1 with its own host key; ``.ssh_config`` has ``Host rmtest``.
    Its sessions install Python packages from the test wheelhouse only (no index)."""
    require_sshd()
    yield from _running(SSHServer(tmp_path_factory.mktemp("sshd"), env=wheelhouse_env()))


def _running(server: SSHServer) -> Iterator[SSHServer]:
    """Start ``server`` with a client config (``Host rmtest``) as ``.ssh_config``; stop it after."""
    server.start()
    server.ssh_config = server.write_ssh_config(alias="rmtest")  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


WHEELHOUSE = os.environ.get("REMOTEMAGIC_TEST_WHEELHOUSE") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "wheelhouse")


def wheelhouse_env() -> dict[str, str]:
    """Session environment of a target that installs only from the test wheelhouse."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELHOUSE, "UV_NO_INDEX": "1", "UV_FIND_LINKS": WHEELHOUSE,
            "UV_PYTHON_DOWNLOADS": "never"}


def require_wheelhouse() -> None:
    if not any(name.startswith("cloudpickle-") for name in (os.listdir(WHEELHOUSE) if os.path.isdir(WHEELHOUSE) else [])):
        pytest.skip(f"no wheelhouse at {WHEELHOUSE}: bash tests/run.sh fills it (the tests themselves stay offline)")


@pytest.fixture(scope="session")
def wheel_sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The client fetches wheels for targets from the test wheelhouse only, into a session cache."""
    require_wheelhouse()
    saved = {k: os.environ.get(k) for k in ("REMOTEMAGIC_WHEELHOUSE", "REMOTEMAGIC_CACHE_DIR")}
    os.environ["REMOTEMAGIC_WHEELHOUSE"] = WHEELHOUSE
    os.environ["REMOTEMAGIC_CACHE_DIR"] = str(tmp_path_factory.mktemp("wheel-cache"))
    try:
        yield WHEELHOUSE
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def offline_sshd(tmp_path_factory: pytest.TempPathFactory, wheel_sources: str) -> Iterator[SSHServer]:
    """An sshd whose sessions install Python packages only from the local wheelhouse that
    ``tests/run.sh`` fills (pip and uv get no index), so bootstrap tests stay on 127.0.0.1."""
    require_sshd()
    yield from _running(SSHServer(tmp_path_factory.mktemp("offline-sshd"), env=wheelhouse_env()))


@pytest.fixture(scope="session")
def jump_sshd(tmp_path_factory: pytest.TempPathFactory, sshd_server: SSHServer) -> Iterator[SSHServer]:
    """A second sshd (own host key, same client key) to use as a ProxyJump host."""
    server = SSHServer(tmp_path_factory.mktemp("jump-sshd"), client_key=sshd_server.client_key)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TCPProxy]]:
    """A factory: ``tcp_proxy(port)`` forwards 127.0.0.1:<proxy.port> to ``port``; ``.cut()`` drops links."""
    proxies: list[TCPProxy] = []

    def make(port: int) -> TCPProxy:
        proxy = TCPProxy(port)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture(scope="session")
def ssh_remote_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A remote root shared by the SSH tests (bootstrapped once); its workers are stopped at the end."""
    root = tmp_path_factory.mktemp("ssh-remote-root") / "root"
    try:
        yield str(root)
    finally:
        stop_workers(root)


__all__ = ["TEST_PYTHON", "jump_sshd", "offline_sshd", "ssh_remote_root", "sshd_server", "stop_workers", "tcp_proxy",
           "wheel_sources", "wheelhouse_env"]
