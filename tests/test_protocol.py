"""The wire protocol (remotemagic/agent/protocol.py): one contract for both sides.

What the agent really writes -- specs, statuses, every kind of event -- is checked against the
protocol's TypedDicts, the agent refuses a spec with an unknown or missing key, and the shipped
package still imports on its own (protocol.py with nothing but ``typing`` and ``re``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

import remotemagic
from remotemagic.agent import protocol as P
from remotemagic.agent import server
from remotemagic.transport.base import agent_sources

from .workers import stop_workers

AGENT_DIR = Path(remotemagic.__file__).parent / "agent"


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[remotemagic.Remote, Path]]:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = tmp_path / "target"
    remote = remotemagic.connect("local", root=str(root))
    try:
        yield remote, root
    finally:
        remote.close()
        stop_workers(root)


# -- the module itself ----------------------------------------------------------------------------
def test_protocol_imports_only_typing_and_re() -> None:
    tree = ast.parse((AGENT_DIR / "protocol.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if not node.level else ".")
    assert imported <= {"__future__", "typing", "re"}, imported


def test_shipped_agent_has_every_module_and_imports_alone(tmp_path: Path) -> None:
    """Every agent module is shipped (the transport sends ``agent/*.py``) and imports from a
    folder with nothing of the local package; ``python -m ...server`` without a root says how."""
    shipped = agent_sources()
    here = {p.name for p in AGENT_DIR.glob("*.py")}
    assert set(shipped) == here
    assert {"protocol.py", "ops_jobs.py", "ops_sessions.py", "ops_store.py", "ops_files.py", "uploads.py",
            "events.py", "supervisor.py"} <= set(shipped)
    pkg = tmp_path / "remotemagic_agent"
    pkg.mkdir()
    for name, data in shipped.items():
        (pkg / name).write_bytes(data)
        assert not re.search(rb"^\s*(from|import)\s+remotemagic\b(?!_agent)", data, re.M), name
    modules = sorted(name[:-3] for name in shipped if name != "__init__.py")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('remotemagic_agent.' + m)\n"
            "bad = [m for m in sys.modules if m == 'remotemagic' or m.startswith('remotemagic.')]\n"
            "assert not bad, bad\nprint('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    usage = subprocess.run([sys.executable, "-m", "remotemagic_agent.server"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: python -m remotemagic_agent.server ROOT" in usage.stderr


def test_every_op_has_a_handler_and_a_shape() -> None:
    assert set(server.HANDLERS) == set(P.OPS)
    names = {v for k, v in vars(P).items() if k.startswith("OP_")}
    assert names == set(P.OPS) | set(P.UPLOAD_OPS) | {P.OP_CANCEL_STREAM}


def test_state_constants_are_the_real_set() -> None:
    assert set(P.TERMINAL) == {"done", "error", "interrupted", "failed", "timeout", "cancelled"}
    assert P.STATES == ("queued", "running", *P.TERMINAL)
    from remotemagic.agent import files

    assert files.TERMINAL is P.TERMINAL and files.JOB_RE is P.JOB_RE  # re-exported, not copied


# -- the runtime check ----------------------------------------------------------------------------
SPEC = {"id": "20260101-120000-123-ab12", "session": "default", "kind": "cell", "code": "1"}


def test_check_names_missing_and_unknown_keys() -> None:
    assert P.check_spec(dict(SPEC)) == SPEC
    with pytest.raises(ValueError, match=r"invalid job spec: unknown bogus \(known: attempt, "):
        P.check_spec({**SPEC, "bogus": 1})
    with pytest.raises(ValueError, match="invalid job spec: missing session"):
        P.check_spec({k: v for k, v in SPEC.items() if k != "session"})
    with pytest.raises(ValueError, match="unknown kind 'shell'"):
        P.check_spec({**SPEC, "kind": "shell"})
    with pytest.raises(ValueError, match="invalid job id"):
        P.check_spec({**SPEC, "id": "../x"})
    with pytest.raises(ValueError, match="invalid session name"):
        P.check_spec({**SPEC, "session": "a/b"})
    with pytest.raises(ValueError, match="must be a JSON object, not list"):
        P.check_spec([])
    with pytest.raises(ValueError, match="unknown type 'telepathy'"):
        P.check_event({"type": "telepathy"})
    with pytest.raises(ValueError, match="invalid stream event: missing text"):
        P.check_event({"type": "stream", "name": "stdout"})
    with pytest.raises(ValueError, match="unknown state 'sleeping'"):
        P.check_status({"state": "sleeping"})


def test_name_rules() -> None:
    assert P.check_name("session", "a.b-c_1") == "a.b-c_1"
    for bad in ("", ".", "..", "-x", ".hidden", "a/b", "x" * 65, None):
        with pytest.raises(ValueError):
            P.check_name("session", bad)
    assert P.check_identifier("x_1") == "x_1"
    with pytest.raises(ValueError, match="invalid output name '1x'"):
        P.check_identifier("1x", "output")
    assert P.check_object_name("0" * 32) == "0" * 32
    for bad in ("0" * 31, "G" * 32, "../" + "0" * 32):
        with pytest.raises(ValueError, match="invalid object hash"):
            P.check_object_name(bad)


# -- against the real agent -----------------------------------------------------------------------
def _job_files(root: Path) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    for jdir in sorted((root / "jobs").iterdir()):
        spec = json.loads((jdir / "spec.json").read_text())
        status = json.loads((jdir / "status.json").read_text())
        events = [json.loads(line) for line in (jdir / "events.jsonl").read_text().splitlines()]
        yield jdir.name, spec, status, events


def test_what_the_agent_writes_matches_the_protocol(local: tuple[remotemagic.Remote, Path]) -> None:
    remote, root = local
    code = ("import sys\nfrom IPython.display import display, HTML, clear_output\n"
            "print('out'); print('err', file=sys.stderr)\n"
            "h = display(HTML('<b>x</b>'), display_id=True); h.update(HTML('<i>y</i>'))\n"
            "clear_output(wait=True)\nbig = bytes(200_000)\n40 + 2")
    assert remote.run(code, pull=["big"]).state == "done"
    assert remote.run("len?").state == "done"  # the pager: a page event
    assert remote.run("raise ValueError('boom')").state == "error"
    remote.run("x = 1")
    remote.store_from_session(["x"])
    remote.restore_to_session(["x"])
    remote.checkpoint()
    killed = remote.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert killed.state == "failed"  # the supervisor's account: an error with the memory reached
    assert remote.run("1").state == "done"  # starts with a notice: the namespace was lost
    assert "x" in remote.restore_checkpoint()
    kinds: set[str] = set()
    job_kinds: set[str] = set()
    for job_id, spec, status, events in _job_files(root):
        P.check_spec(spec)
        job_kinds.add(spec["kind"])
        assert spec["id"] == job_id
        P.check_status(status)
        assert status["state"] in P.TERMINAL
        if "error" not in status or status["error"]["ename"] != "WorkerDied":  # the worker's own end:
            assert events[-1]["status"] == status  # its last event carries the whole final status
        for event in events:
            P.check_event(event)
            kinds.add(event["type"])
    assert {"stream", "display_data", "update_display_data", "clear_output", "execute_result", "page", "error",
            "output", "status", "notice"} <= kinds
    assert job_kinds == set(P.JOB_KINDS)
    mirrored = [e for j in remote.jobs() for e in remote.job(j["id"]).events()]
    assert mirrored and all(P.check_event(e) for e in mirrored)  # the client's mirror: the same lines


def test_agent_refuses_a_spec_with_an_unknown_or_missing_key(local: tuple[remotemagic.Remote, Path]) -> None:
    remote, root = local
    spec = {**SPEC, "cwd": str(Path.cwd())}
    with pytest.raises(ValueError, match=r"invalid job spec: unknown colour \(known: "):
        remote.request(P.OP_RUN, spec={**spec, "colour": "red"}, follow=False)
    with pytest.raises(ValueError, match="invalid job spec: missing kind"):
        remote.request(P.OP_RUN, spec={k: v for k, v in spec.items() if k != "kind"}, follow=False)
    assert not (root / "jobs" / SPEC["id"]).exists()  # nothing half-made
    assert remote.request(P.OP_RUN, spec=spec, follow=False)["state"] == P.QUEUED


def test_agent_refuses_a_request_with_an_unknown_or_missing_field(local: tuple[remotemagic.Remote, Path]) -> None:
    remote, _ = local
    known = r"\(known: cwd, id, op, partial, path\)"
    with pytest.raises(ValueError, match=r"invalid stat request: unknown recursive " + known):
        remote.request(P.OP_STAT, path="~", recursive=True)
    with pytest.raises(ValueError, match="invalid hash_prefix request: missing size"):
        remote.request(P.OP_HASH_PREFIX, path="~")
    with pytest.raises(remotemagic.errors.RemoteRequestError, match="unknown request 'telepathy'"):
        remote.request("telepathy")
    assert remote.request(P.OP_STAT, path="~")["exists"]  # the connection is fine after all that
