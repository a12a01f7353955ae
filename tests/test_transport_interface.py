"""What api relies on, the same over every transport (local and a real sshd): ``transport.base.Transport``."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from remotemagic.api import Remote
from remotemagic.transport.base import Transport
from remotemagic.transport.local import LocalTransport
from remotemagic.transport.ssh import SSHTransport

from .conftest import Target


def _transport(target: Target) -> Transport:
    if target.kind == "local":
        return LocalTransport(target.root)
    opts = target.options["connect"]
    return SSHTransport(target.options["target"], root=str(target.root), ssh_config=opts["ssh_config"],
                        python=opts["python"])


def test_agent_env_reaches_the_workers(target: Target) -> None:
    transport = _transport(target)
    assert transport.is_local == (target.kind == "local")
    transport.agent_env["REMOTEMAGIC_TEST_MARK"] = "marked it"
    r = Remote(transport, session="env" + uuid.uuid4().hex[:8], cwd=str(Path.cwd()), show_progress=False)
    try:
        job = r.run("import os\nv = os.environ.get('REMOTEMAGIC_TEST_MARK')", pull=["v"])
        assert job.result() == {"v": "marked it"}
    finally:
        try:
            r.stop_session()
        finally:
            r.close()


def test_forwarding_is_refused_only_where_the_ports_are_here(target: Target) -> None:
    transport = _transport(target)
    try:
        if transport.is_local:
            with pytest.raises(ValueError, match="needs no tunnel"):
                transport.open_forward(8888)
            return
        with pytest.raises(ValueError, match="not a TCP port"):
            transport.open_forward(70000)
        fwd = transport.open_forward(9)  # nothing has to listen there until a connection comes
        try:
            assert fwd.active and fwd.local_port > 0 and fwd.url == f"http://127.0.0.1:{fwd.local_port}/"
        finally:
            fwd.close()
        assert not fwd.active
    finally:
        transport.close()
