"""Pytest fixtures for SSH tests: real sshd servers, a cuttable TCP proxy, a shared remote root.

Use as a plugin (``pytest_plugins = ["tests.ssh_fixtures"]`` or ``from .ssh_fixtures import *``
in a conftest). Every server a fixture starts, it stops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    from .sshd import SSHServer, TCPProxy, require_sshd
    from .workers import stop_workers
except ImportError:  # imported as a top-level module (rootdir-relative)
    from sshd import SSHServer, TCPProxy, require_sshd  # type: ignore[no-redef]
    from workers import stop_workers  # type: ignore[no-redef]


def write_instance_ssh_config(path: Path, port: int, user: str, known_hosts: Path,
                              identity_file: str | os.PathLike[str] | None = None) -> Path:
    """An OpenSSH config mapping ``Host i-*`` (EC2 instance ids, as moto names them) to a test
    sshd on 127.0.0.1:``port``: how the tests stand a loopback sshd in for EC2 instances."""
    key = f"  IdentityFile {identity_file}\n" if identity_file else ""
    path.write_text(f"Host i-*\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n{key}"
                    f"  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n")
    return path


def _test_python() -> str:
    """The base interpreter of this venv: the remote venvs are built from it (isolated from its
    site-packages; package sync fills them from the test wheelhouse at this venv's versions)."""
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
    names = os.listdir(WHEELHOUSE) if os.path.isdir(WHEELHOUSE) else []
    if not any(name.startswith("cloudpickle-") for name in names):
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


__all__ = ["TEST_PYTHON", "bare_sshd", "jump_sshd", "make_bare_python", "offline_sshd", "ssh_remote_root",
           "sshd_server", "stop_workers", "tcp_proxy", "wheel_sources", "wheelhouse_env"]


def make_bare_python(folder: str | os.PathLike[str]) -> str:
    """A real CPython of this version with only its standard library: no ensurepip, venv, pip,
    site-packages, virtualenv or uv (like Ubuntu's cloud-image python3). Returns its bin folder."""
    import shutil
    import sysconfig

    base = sys.base_prefix
    ver = "python{}.{}".format(*sys.version_info[:2])
    stdlib = sysconfig.get_paths(vars={"installed_base": base, "base": base})["stdlib"]
    root = os.path.abspath(folder)
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir, exist_ok=True)
    exe = getattr(sys, "_base_executable", sys.executable)
    shutil.copy2(os.path.realpath(exe), os.path.join(bindir, "python3"))
    skip = {"ensurepip", "venv", "site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "__pycache__"}
    dest = os.path.join(root, "lib", ver)
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel = os.path.relpath(dirpath, stdlib)
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for f in filenames:
            os.symlink(os.path.join(dirpath, f), os.path.join(dest, rel, f))
    os.makedirs(os.path.join(dest, "site-packages"))  # empty, as on a minimal image
    # the host's tools, minus every Python, pip, virtualenv and uv
    tools = os.path.join(root, "tools")
    os.makedirs(tools, exist_ok=True)
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if name.startswith(("python", "pip", "uv", "virtualenv", "pydoc", "2to3", "idle")):
                continue
            link = os.path.join(tools, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(d, name), link)
    return bindir


@pytest.fixture(scope="session")
def bare_sshd(tmp_path_factory: pytest.TempPathFactory, wheel_sources: str) -> Iterator[SSHServer]:
    """An sshd whose sessions find only a bare python3 (no ensurepip/venv/pip/virtualenv/uv) on
    their PATH and no package index or wheel folder: everything must come from the client."""
    require_sshd()
    folder = tmp_path_factory.mktemp("bare-host")
    bindir = make_bare_python(folder / "python")
    home = folder / "home"  # an empty home: no shell profile puts another Python on PATH, no caches
    home.mkdir(mode=0o700)
    env = {"HOME": str(home), "PATH": f"{bindir}:{folder / 'python' / 'tools'}", "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": "/dev/null", "UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never", "PYTHONNOUSERSITE": "1"}
    server = SSHServer(folder / "sshd", env=env)
    server.bare_python = os.path.join(bindir, "python3")  # type: ignore[attr-defined]
    yield from _running(server)
