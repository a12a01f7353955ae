"""Issue 15 on EC2 (moto server on 127.0.0.1): the out-of-memory advice with a bigger type and its $/h, and a
spot instance reclaimed mid-job that AWS starts again (the job waited through and resubmitted)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest

import remotemagic
from remotemagic import errors, retry
from remotemagic.agent.recover import size

from .test_ec2_provider import REGION, aws, moto_url, provider  # noqa: F401 (fixtures)
from .test_ec2_target import ec2_env, shell  # noqa: F401 (fixtures)
from .test_recover import GATED

pytest.importorskip("moto.server")


def test_memory_advice_names_a_type_with_more_memory_and_its_price(aws) -> None:  # noqa: F811
    p = provider()
    info = p.start("box", instance_type="t3.large", progress=False)
    error = {"ename": "WorkerDied", "signal": 9, "peak_rss": int(7.6 * 1024**3), "mem_total": 8 * 1024**3}
    text = retry.memory_advice(error, p, info)
    assert text is not None
    assert text.startswith(f"the worker was killed after reaching {size(error['peak_rss'])} of the machine's 8.0 GiB")
    m = re.search(r"%ec2 resize (\S+) gives ([\d.]+) GiB \(\$([\d.]+)/h, now t3\.large at \$([\d.]+)/h\)", text)
    assert m, text
    ec2 = boto3.client("ec2", region_name=REGION)
    got = ec2.describe_instance_types(InstanceTypes=[m.group(1)])["InstanceTypes"][0]
    assert got["MemoryInfo"]["SizeInMiB"] >= 16 * 1024 and float(m.group(2)) >= 16
    assert "x86_64" in got["ProcessorInfo"]["SupportedArchitectures"]
    assert float(m.group(3)) == pytest.approx(p.hourly_price(m.group(1))[0], abs=1e-4)
    assert float(m.group(4)) == pytest.approx(p.hourly_price("t3.large")[0], abs=1e-4)
    # far from the machine's memory: a SIGKILL is not put down to memory
    assert retry.memory_advice({**error, "peak_rss": 1024**3}, p, info) is None
    assert retry.memory_advice({**error, "signal": 15}, p, info) is None


class CapacityProxy:
    """A small real HTTP proxy on 127.0.0.1 in front of the moto server: it answers a spot
    RunInstances with an EC2 capacity error (``failures`` times; botocore may retry a 500) and
    passes every other request to moto unchanged."""

    def __init__(self, upstream: str, code: str, status: int, failures: int):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        proxy = self
        self.code, self.status, self.left = code, status, failures
        self.refused: list[str] = []
        self.passed_run_instances: list[bytes] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if b"Action=RunInstances" in body:
                    if b"InstanceMarketOptions" in body and proxy.left > 0:
                        proxy.left -= 1
                        proxy.refused.append(proxy.code)
                        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{proxy.code}'
                               "</Code><Message>There is no Spot capacity available that matches your request."
                               "</Message></Error></Errors><RequestID>proxy-1</RequestID></Response>").encode()
                        self.send_response(proxy.status)
                        self.send_header("Content-Type", "text/xml")
                        self.send_header("Content-Length", str(len(xml)))
                        self.end_headers()
                        self.wfile.write(xml)
                        return
                    proxy.passed_run_instances.append(body)
                self.forward("POST", body)

            def do_GET(self) -> None:
                self.forward("GET", None)

            def forward(self, method: str, body: bytes | None) -> None:
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(method, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.mark.parametrize("code,status", [("InsufficientInstanceCapacity", 500), ("SpotMaxPriceTooLow", 400)])
def test_spot_fallback_launches_on_demand_and_says_so(aws, monkeypatch, code: str, status: int) -> None:  # noqa: F811
    from remotemagic import notices

    proxy = CapacityProxy(aws, code, status, failures=10)  # capacity stays gone for spot
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        p = provider()
        with notices.collect() as said:
            info = p.start("box", instance_type="t3.large", spot=True, fallback=True, progress=False)
        assert proxy.refused and set(proxy.refused) == {code}
        assert len(proxy.passed_run_instances) == 1 and b"InstanceMarketOptions" not in proxy.passed_run_instances[0]
        assert info.lifecycle == "on-demand" and info.state == "running"
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=aws)  # straight to moto
        d = ec2.describe_instances(InstanceIds=[info.instance_id])["Reservations"][0]["Instances"][0]
        assert "InstanceLifecycle" not in d
        texts = [n["text"] for n in said]
        assert len(texts) == 1, texts
        on_demand = p.hourly_price("t3.large")[0]
        assert texts[0].startswith(f"no spot capacity for t3.large ({code}): box ({info.instance_id}) was launched "
                                   f"on-demand instead at ${on_demand:.4f}/h"), texts
        spot = p._spot_price("t3.large", None)  # moto's history may say 0: then "unknown"
        if not spot:
            assert "(the spot price is unknown)" in texts[0]
        else:
            assert f"${on_demand - spot:.4f}/h more than spot (${spot:.4f}/h)" in texts[0]
        # without --fallback the same error is the user's, and nothing is launched
        proxy.left = 10
        with pytest.raises(Exception, match=code):
            provider().start("box2", instance_type="t3.large", spot=True, progress=False)
        assert len(proxy.passed_run_instances) == 1
    finally:
        proxy.close()


# -- a spot instance reclaimed mid-job, stopped by AWS and started again when capacity returns ----------
#
# moto holds the instance's state and the loopback sshd stands in for the machine. The fake
# IMDSv2 of test_spot.py sends the reclaim notice to the worker; "AWS stopping the instance"
# is moto's stop plus what a stop does to the machine's processes (every worker and supervisor
# of the target SIGKILLed); "capacity returns" is moto's start. Each step waits for what the
# client shows (Remote.waiting, the state its waiting line shows): no fixed sleep. The cell is
# test_recover.py's GATED: it waits for a gate file, so a notice always lands mid-job.


@pytest.fixture
def spot_shell(shell: Any, ec2_env: Any) -> Any:  # noqa: F811
    """The magics on a spot instance whose agent (and workers) ask the fake IMDS for a notice."""
    from remotemagic.magics import _loaded

    from .conftest import run_ok
    from .test_spot import FakeIMDS

    imds = FakeIMDS()
    magics = _loaded[id(shell)]
    try:
        run_ok(shell, "%ec2 start --name spotty --spot")
        remote = magics.remote
        assert remote.instance.lifecycle == "spot" and remote.transport.agent_env.get("REMOTEMAGIC_SPOT") == "1"
        remote.provider.reclaim_poll_interval = 0.05
        remote.transport.agent_env.update(REMOTEMAGIC_IMDS_URL=imds.url, REMOTEMAGIC_SPOT_POLL="0.1")
        remote._conn.close()  # the next request starts an agent (and its workers) with that environment
        yield SimpleNamespace(ip=shell, magics=magics, imds=imds, env=ec2_env)
    finally:
        imds.stop()


def _reclaim(spot: Any, started: Path, back: bool = True, gate: Path | None = None) -> None:
    """AWS's side of a reclaim, in step with what the client shows: the notice once the job runs;
    the instance stopped (its processes gone) once the client waits; started again once the
    client has seen it stopped."""
    from .conftest import wait_for
    from .test_spot import NOTICE, final_notice
    from .workers import stop_workers

    remote = spot.magics.remote
    root, session = spot.env.root, remote.session
    wait_for("the job to start", started.exists, timeout=60)
    wait_for("the spot watcher to poll", lambda: spot.imds.count("GET", 404) >= 1, timeout=30)
    spot.imds.notice = NOTICE
    wait_for("the checkpoint at the notice", lambda: final_notice(root, session), timeout=60)
    wait_for("the client to wait for the instance", lambda: remote.waiting, timeout=60)
    stop_workers(root)
    spot.imds.notice = None  # a restarted instance has no notice pending
    ec2 = boto3.client("ec2", region_name=REGION)
    iid = remote.instance.instance_id
    ec2.stop_instances(InstanceIds=[iid])
    wait_for("the client to see the instance stopped", lambda: (remote.waiting or {}).get("state") == "stopped",
             timeout=60)
    if gate is not None:
        gate.touch()
    if back:
        ec2.start_instances(InstanceIds=[iid])


def _cell_jobs(remote: Any) -> list[dict[str, Any]]:
    return [j for j in remote.jobs() if j.get("kind", "cell") == "cell"]


def test_spot_reclaim_waits_for_capacity_then_resubmits(spot_shell: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    import threading

    from .conftest import plain, run_ok, wait_for
    from .test_recover import checkpointed_after

    ip, remote = spot_shell.ip, spot_shell.magics.remote
    run_ok(ip, "%%ec2 run\na = 41")
    first = remote.last_job
    wait_for("the checkpoint after the first cell",
             lambda: checkpointed_after(spot_shell.env.root, remote.session, first.id), timeout=60)
    started, gate = tmp_path / "started", tmp_path / "gate"
    aws_side = threading.Thread(target=_reclaim, args=(spot_shell, started), kwargs={"gate": gate})
    aws_side.start()
    capsys.readouterr()
    try:
        run_ok(ip, "%%ec2 run --retry 1 -o a\n" + GATED.format(started=str(started), gate=str(gate)))
    finally:
        aws_side.join()
    out = capsys.readouterr()
    text = plain(out.out + out.err)
    assert ip.user_ns["a"] == 42  # from the attempt that finished, on the checkpoint's a = 41
    assert text.count("attempt starts, a = 41") == 2, text  # both attempts' output, in the cell
    assert text.count("finished with a = 42") == 1, text
    assert "spot instance reclaim notice: stop at 2026-11-22T04:10:00Z" in text
    iid = remote.instance.instance_id
    waiting = f"spot instance spotty ({iid}) reclaimed, waiting for capacity since "
    assert waiting in text and "(stopped; AWS starts it again when capacity returns)" in text, text
    assert re.search(rf"spot instance spotty \({iid}\) was reclaimed at \d\d:\d\d and is back since \d\d:\d\d", text)
    notes = [ln for ln in text.splitlines() if "attempt 2 of 2" in ln]
    assert len(notes) == 1, text
    assert "attempt 2 of 2: spot reclaim (stop at 2026-11-22T04:10:00Z); restored " in notes[0], notes
    assert re.search(r"restored (\w+, )*a(, \w+)* from the checkpoint of", notes[0]), notes
    assert remote.waiting is None and remote.instance.state == "running"
    jobs = _cell_jobs(remote)
    assert [j["state"] for j in jobs[-2:]] == ["interrupted", "done"]
    reclaimed = remotemagic.Job(remote, jobs[-2]["id"])
    assert reclaimed.wait() == "interrupted" and reclaimed.error().ename == "SpotInterruption"
    # -o is pulled once, from the attempt that finished (the reclaimed one saved a = 41: not taken)
    assert remote.last_job.id == jobs[-1]["id"] and remote.last_job.result() == {"a": 42}


def test_wait_follows_a_reclaimed_job_and_restores_the_session(spot_shell: Any, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    import threading

    from .conftest import plain, run_ok, wait_for
    from .test_recover import checkpointed_after

    ip, remote = spot_shell.ip, spot_shell.magics.remote
    run_ok(ip, "%%ec2 run\na = 41")
    first = remote.last_job
    wait_for("the checkpoint after the first cell",
             lambda: checkpointed_after(spot_shell.env.root, remote.session, first.id), timeout=60)
    started, gate = tmp_path / "started", tmp_path / "gate"
    run_ok(ip, "%%ec2 run --bg\n" + GATED.format(started=str(started), gate=str(gate)))
    job = remote.last_job
    aws_side = threading.Thread(target=_reclaim, args=(spot_shell, started))
    aws_side.start()
    capsys.readouterr()
    try:
        result = ip.run_cell(f"%ec2 wait {job.id}")
    finally:
        aws_side.join()
    out = capsys.readouterr()
    text = plain(out.out + out.err)
    err = result.error_in_exec
    assert isinstance(err, errors.RemoteError) and err.ename == "SpotInterruption", err  # the job's own end
    iid = remote.instance.instance_id
    assert f"spot instance spotty ({iid}) reclaimed, waiting for capacity since " in text, text
    assert re.search(rf"spot instance spotty \({iid}\) was reclaimed at \d\d:\d\d and is back since", text), text
    assert re.search(r"Restored 1 value\(s\) from the checkpoint of [\d-]+ [\d:]+: a\n", text), text
    assert "namespace was lost" not in text, text  # the restore says what came back
    assert len(_cell_jobs(remote)) == 2  # %ec2 wait does not run the job again
    run_ok(ip, "%%ec2 run -o b\nb = a + 1")  # the session resumes from the checkpoint at the notice
    assert ip.user_ns["b"] == 42


@pytest.mark.parametrize("minutes", [0, 0.005])
def test_reclaim_wait_is_bounded(spot_shell: Any, tmp_path: Path, capsys: pytest.CaptureFixture,
                                 minutes: float) -> None:
    """0: not waiting at all; else at the bound (the instance never stopped) a notice ends the wait
    and the job's own error stands; nothing is resubmitted."""
    import threading

    from .conftest import plain, run_ok, wait_for
    from .test_spot import NOTICE

    ip, remote = spot_shell.ip, spot_shell.magics.remote
    run_ok(ip, f"%config Ec2Magics.reclaim_wait_minutes = {minutes}")
    run_ok(ip, "%%ec2 run\na = 41")
    started, gate = tmp_path / "started", tmp_path / "gate"

    def notice() -> None:
        wait_for("the job to start", started.exists, timeout=60)
        wait_for("the spot watcher to poll", lambda: spot_shell.imds.count("GET", 404) >= 1, timeout=30)
        spot_shell.imds.notice = NOTICE

    aws_side = threading.Thread(target=notice)
    aws_side.start()
    capsys.readouterr()
    try:
        result = ip.run_cell("%%ec2 run --retry 2 -o a\n" + GATED.format(started=str(started), gate=str(gate)))
    finally:
        aws_side.join()
    out = capsys.readouterr()
    text = plain(out.out + out.err)
    err = result.error_in_exec
    assert isinstance(err, errors.RemoteError) and err.ename == "SpotInterruption", err
    iid = remote.instance.instance_id
    if minutes:
        assert (f"[remotemagic] warning: spot instance spotty ({iid}) did not come back within {minutes:g} min "
                "(Ec2Magics.reclaim_wait_minutes; it is running): nothing is run again.") in text, text
    else:
        assert (f"[remotemagic] warning: spot instance spotty ({iid}) was reclaimed (spot reclaim (stop at "
                f"{NOTICE['time']})); not waiting for it to come back (reclaim_wait_minutes = 0)") in text, text
        assert "waiting for capacity" not in text
    assert text.count("attempt starts, a = 41") == 1 and "attempt 2" not in text, text
    assert remote.waiting is None and len(_cell_jobs(remote)) == 2


class MachineLink:
    """The way to the "instance": a TCP forwarder to the loopback sshd that can go down like a
    stopped machine (live connections cut, new ones refused) and come back."""

    def __init__(self, port: int):
        from .sshd import TCPProxy

        self.proxy = TCPProxy(port)
        self.proxy.target = ("127.0.0.1", port)
        self.up_port = port

    def down(self) -> None:
        self.proxy.target = ("127.0.0.1", _closed_port())  # new connections are refused upstream
        self.proxy.cut()

    def up(self) -> None:
        self.proxy.target = ("127.0.0.1", self.up_port)

    def close(self) -> None:
        self.proxy.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lost_link(ec2_env: Any, tmp_path: Path) -> Any:  # noqa: F811
    """A spot instance reached through a :class:`MachineLink`, with a first cell (``a = 41``)
    checkpointed; ``stop()`` is AWS stopping it under a job without a notice reaching us."""
    from .conftest import wait_for
    from .ssh_fixtures import TEST_PYTHON, write_instance_ssh_config
    from .test_recover import checkpointed_after
    from .test_spot import FakeIMDS
    from .workers import stop_workers

    link = MachineLink(ec2_env.sshd.port)
    imds = FakeIMDS()  # never sends a notice (and keeps the spot watcher on loopback)
    known = tmp_path / "known_hosts_link"
    known.write_text(f"[127.0.0.1]:{link.proxy.port} {ec2_env.sshd.host_key_line.split(' ', 1)[1]}\n")
    cfg = write_instance_ssh_config(tmp_path / "ssh_config_link", link.proxy.port, ec2_env.sshd.user, known,
                                    ec2_env.sshd.client_key)
    p = provider()
    p.reclaim_poll_interval = 0.05
    r = remotemagic.connect_ec2("lost", provider=p, spot=True, instance_type="t3.micro", ami="al2023",
                                ssh_config=str(cfg), python=TEST_PYTHON, root=str(ec2_env.root),
                                show_progress=False, reconnect_timeout=1.0)
    try:
        r.transport.agent_env.update(REMOTEMAGIC_IMDS_URL=imds.url, REMOTEMAGIC_SPOT_POLL="0.1")
        r._conn.close()
        first = r.run("a = 41")
        wait_for("the checkpoint", lambda: checkpointed_after(ec2_env.root, r.session, first.id), timeout=60)
        iid = r.instance.instance_id
        ec2 = boto3.client("ec2", region_name=REGION)

        def stop(started: Path, gate: Path) -> None:
            """Once the job runs: the instance stops (its processes and link with it); started
            again once the client shows it waiting for the stopped instance."""
            wait_for("the job to start", started.exists, timeout=60)
            ec2.stop_instances(InstanceIds=[iid])
            stop_workers(ec2_env.root)
            link.down()
            wait_for("the client to see the instance stopped", lambda: (r.waiting or {}).get("state") == "stopped",
                     timeout=60)
            gate.touch()
            link.up()
            ec2.start_instances(InstanceIds=[iid])

        yield SimpleNamespace(remote=r, stop=stop, iid=iid)
    finally:
        r.close()
        imds.stop()
        link.close()


def _waiting_lines(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["text/plain"] for e in events if e["type"] in ("display_data", "update_display_data")]


def test_link_lost_as_aws_stops_the_instance_then_resubmitted(lost_link: Any, tmp_path: Path) -> None:
    """No notice reached us: the link drops as the instance stops. With --retry the client asks
    AWS, sees the instance down, waits for it, follows the job to its end (its worker went with
    the machine) and runs it again on the last checkpoint."""
    import threading

    r, started, gate = lost_link.remote, tmp_path / "started", tmp_path / "gate"
    aws_side = threading.Thread(target=lost_link.stop, args=(started, gate))
    aws_side.start()
    events: list[dict[str, Any]] = []
    try:
        job = r.run(GATED.format(started=str(started), gate=str(gate)), pull=["a"], retries=1, on_event=events.append)
    finally:
        aws_side.join()
    assert job.result() == {"a": 42}
    streams = "".join(e.get("text", "") for e in events if e["type"] == "stream")
    assert streams.count("attempt starts, a = 41") == 2 and "finished with a = 42" in streams, streams
    assert any(f"spot instance lost ({lost_link.iid}) reclaimed, waiting for capacity since" in s and "(stopped;" in s
               for s in _waiting_lines(events)), events
    notes = [e["text"] for e in events if e["type"] == "notice"]
    assert len(notes) == 1 and notes[0].startswith(
        "attempt 2 of 2: spot reclaim (the instance was stopped under the job); restored a from the checkpoint of"
    ), notes
    assert [j["state"] for j in r.jobs()[-2:]] == ["failed", "done"]


def test_wait_through_a_lost_link_restores_the_session(lost_link: Any, tmp_path: Path) -> None:
    """``Remote.wait_through_reclaim`` (``%ec2 wait``): the link drops as the instance stops; it
    waits, follows the job to its end (failed with its machine) and restores the checkpoint."""
    import threading

    r, started, gate = lost_link.remote, tmp_path / "started", tmp_path / "gate"
    job = r.run(GATED.format(started=str(started), gate=str(gate)), background=True)
    aws_side = threading.Thread(target=lost_link.stop, args=(started, gate))
    aws_side.start()
    events: list[dict[str, Any]] = []
    try:
        state = r.wait_through_reclaim(job, on_event=events.append)
    finally:
        aws_side.join()
    assert state == "failed" and job.error().ename == "WorkerDied"
    assert any("(stopped;" in s for s in _waiting_lines(events)), events
    streams = "".join(e.get("text", "") for e in events if e["type"] == "stream")
    assert re.search(r"Restored 1 value\(s\) from the checkpoint of [\d-]+ [\d:]+: a\n", streams), streams
    assert r.run("b = a + 1", pull=["b"]).result() == {"b": 42}


def test_wait_until_back_follows_the_instance_states(aws) -> None:  # noqa: F811
    """The provider's side alone: down and up again, a bound, and an instance that will not come back."""
    from remotemagic.providers.ec2 import InstanceStateError, WaitTimeoutError

    p = provider()
    p.reclaim_poll_interval = 0.02
    info = p.start("comeback", instance_type="t3.micro", spot=True, progress=False)
    assert info.lifecycle == "spot"
    ec2 = boto3.client("ec2", region_name=REGION)
    seen: list[str] = []

    def aws_meanwhile(state: str) -> None:  # called at each poll: AWS stops it, then starts it again
        seen.append(state)
        if state == "running" and len(seen) == 1:
            ec2.stop_instances(InstanceIds=[info.instance_id])
        elif state == "stopped":
            ec2.start_instances(InstanceIds=[info.instance_id])

    back = p.wait_until_back(info.instance_id, timeout=30, on_state=aws_meanwhile)
    assert back.state == "running" and back.instance_id == info.instance_id
    assert seen == ["running", "stopped", "running"], seen
    with pytest.raises(WaitTimeoutError, match="is still running after"):
        p.wait_until_back(info.instance_id, timeout=0.1)  # never stopped: the bound ends the wait
    p.terminate(info.instance_id, wait=True, progress=False)
    with pytest.raises(InstanceStateError, match="is terminated.*will not come back"):
        p.wait_until_back(info.instance_id, timeout=30)
