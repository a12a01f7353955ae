"""``%ec2 cluster``: a real Dask distributed cluster on our targets (loopback only).

The scheduler and nannies are real Dask processes started detached through our agent; the
tests compute with them, kill them, cut the SSH link under them and stop them. Every cluster a
test starts, it stops (fixture finalizers), and no Dask process of ours outlives the test.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

distributed = pytest.importorskip("distributed")
np = pytest.importorskip("numpy")
da = pytest.importorskip("dask.array")

import remotemagic  # noqa: E402
from remotemagic import cluster  # noqa: E402
from remotemagic.agent import services  # noqa: E402
from remotemagic.cluster.tls import ClusterTLS  # noqa: E402

from .conftest import plain, run_ok, wait_for  # noqa: E402
from .workers import stop_workers  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _agents_serving(root: Path) -> list[int]:
    """Agent servers (one per open connection) on the target folder ``root``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"remotemagic_agent.server" in argv and str(root).encode() in argv:
            found.append(int(entry))
    return found


def _dask_processes(root: Path) -> list[int]:
    """Supervisors and Dask processes (worker processes of nannies included) of ``root`` that still
    run: every one has ``REMOTEMAGIC_ROOT=<root>`` in its environment."""
    marker = f"REMOTEMAGIC_ROOT={root}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if marker in env and not zombie:
            found.append(int(entry))
    return found


def _kill_leftovers(root: Path) -> None:
    """A failed test's processes: stop every service group under ``root``."""
    for group in services.groups(str(root)):
        services.stop(str(root), group, grace=2)


@pytest.fixture
def local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = tmp_path / "target"
    yield root
    _kill_leftovers(root)
    stop_workers(root)


@pytest.fixture
def local_cluster(local_root: Path) -> Iterator[cluster.Cluster]:
    remote = remotemagic.connect("local", root=str(local_root))
    c = cluster.start_local(2, remote=remote)
    try:
        yield c
    finally:
        c.stop()
        remote.close()
        assert not _dask_processes(local_root)


def _write_module(folder: Path, name: str) -> Any:
    """A module beside the notebook (not installed): its functions must travel by value."""
    (folder / f"{name}.py").write_text(textwrap.dedent("""
        def collatz_steps(n):
            steps = 0
            while n != 1:
                n = n // 2 if n % 2 == 0 else 3 * n + 1
                steps += 1
            return steps
    """))
    sys.path.insert(0, str(folder))
    try:
        __import__(name)
    finally:
        sys.path.remove(str(folder))
    return sys.modules[name]


# -- --local ----------------------------------------------------------------------------------------
def test_local_cluster_computes_like_numpy_and_python(local_cluster: cluster.Cluster, tmp_path: Path) -> None:
    client = local_cluster.connect()
    x = np.arange(2_000_000, dtype="float64").reshape(2000, 1000)
    dx = da.from_array(x, chunks=(250, 250))
    assert float((dx ** 2).sum().compute()) == pytest.approx(float((x ** 2).sum()))
    assert np.allclose(dx.mean(axis=0).compute(), x.mean(axis=0))

    helpers = _write_module(tmp_path, "rm_cluster_helpers")
    local_cluster.connect()  # registers the notebook's local modules for pickling by value
    try:
        got = client.gather(client.map(helpers.collatz_steps, range(1, 300)))
        assert got == [helpers.collatz_steps(i) for i in range(1, 300)]
        # the workers never saw the file: it came by value
        assert client.run(lambda: "rm_cluster_helpers" in sys.modules) and True
    finally:
        sys.modules.pop("rm_cluster_helpers", None)

    def square(v: int) -> int:
        return v * v

    assert client.gather(client.map(square, range(100))) == [v * v for v in range(100)]


def test_local_cluster_tls_files_and_processes(local_cluster: cluster.Cluster, local_root: Path) -> None:
    files_dir = Path(local_cluster.primary.paths["ca.pem"]).parent
    for name in ("ca.pem", "scheduler.key", "worker.key", "client.key"):
        assert (files_dir / name).stat().st_mode & 0o777 == 0o600
    assert not (files_dir / "ca.key").exists()  # the CA key stays with the client
    assert (local_cluster.folder / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    # key material never on a command line: only paths
    for pid in _dask_processes(local_root):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"PRIVATE KEY" not in f.read()
    assert local_cluster.address.startswith("tls://127.0.0.1:")
    # every port of the cluster's processes (TLS, and the HTTP servers of scheduler and workers) on loopback
    listening = _listening(local_root)
    assert listening and all(host == "127.0.0.1" for host, _ in listening), listening


def _listening(root: Path) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets that the processes of ``root``'s services listen on."""
    inodes = set()
    for pid in _dask_processes(root):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                addr, port = cols[1].rsplit(":", 1)
                host = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)) if len(addr) == 8 else addr
                out.append((host, int(port, 16)))
    return out


def test_plain_tcp_and_foreign_certificates_are_refused(local_cluster: cluster.Cluster, tmp_path: Path) -> None:
    from distributed import Client
    from distributed.security import Security

    port = local_cluster.address.rsplit(":", 1)[1]
    with pytest.raises((OSError, TimeoutError)):
        Client(f"tcp://127.0.0.1:{port}", timeout=3)
    other = ClusterTLS.generate("intruder").write(tmp_path / "other")
    foreign = Security(tls_ca_file=other["ca.pem"], tls_client_cert=other["client.pem"],
                       tls_client_key=other["client.key"], require_encryption=True)
    with pytest.raises((OSError, TimeoutError, ssl.SSLError)):
        Client(local_cluster.address, security=foreign, timeout=3)
    # a TLS client that trusts the cluster's CA but shows no certificate: the scheduler hangs up
    import socket

    ctx = ssl.create_default_context(cafile=local_cluster.local_paths["ca.pem"])
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"hello")
                if tls.recv(1) == b"":  # TLS 1.3: the refusal comes as an alert or a close
                    raise ConnectionError("closed by the scheduler")
    assert local_cluster.connect().submit(sum, [1, 2]).result() == 3  # ours still works


def test_worker_killed_mid_computation(local_cluster: cluster.Cluster) -> None:
    client = local_cluster.connect()
    pids = client.run(os.getpid)
    assert len(pids) == 2

    def slow_square(v: int) -> int:
        import time as t

        t.sleep(0.05)
        return v * v

    futures = client.map(slow_square, range(80), pure=False)
    wait_for("tasks running on both workers", lambda: len([a for a, ts in client.processing().items() if ts]) == 2)
    victim = next(iter(pids.values()))
    os.kill(victim, signal.SIGKILL)
    assert client.gather(futures) == [v * v for v in range(80)]  # Dask recomputed what was lost
    # the nanny starts a new worker process: back to 2
    wait_for("2 workers again", lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2
             and victim not in client.run(os.getpid).values(), timeout=60)


def test_nanny_killed_comes_back(local_cluster: cluster.Cluster) -> None:
    st = local_cluster._services(local_cluster.primary)["w1"]
    os.kill(st["child_pid"], signal.SIGKILL)  # the nanny itself (the supervisor's child)
    client = local_cluster.connect()
    wait_for("the nanny restarted by its supervisor",
             lambda: local_cluster._services(local_cluster.primary)["w1"]["restarts"] == 1, timeout=30)
    wait_for("2 workers again", lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, timeout=60)
    assert client.submit(sum, [4, 5]).result() == 9


def test_get_client_in_a_run_cell_on_the_primary(local_cluster: cluster.Cluster) -> None:
    job = local_cluster.primary.remote.run(
        "from distributed import get_client\n"
        "import dask.array as da\n"
        "c = get_client()\n"
        "print(int(da.arange(1000, chunks=100).sum().compute()), len(c.scheduler_info()['workers']))\n")
    text = "".join(e.get("text", "") for e in job.events() if e.get("type") == "stream")
    assert job.state == "done", text
    assert text.split() == [str(sum(range(1000))), "2"]


def test_status_scale_logs_and_stop(local_root: Path) -> None:
    remote = remotemagic.connect("local", root=str(local_root))
    c = cluster.start_local(1, remote=remote)
    try:
        st = c.status()
        assert st["scheduler_alive"] and len(st["workers"]) == 1
        assert st["workers"][0]["memory_limit"] > 0 and st["workers"][0]["running"] == 0
        c.scale(3)
        assert len(c.status()["workers"]) == 3
        c.scale(1)
        wait_for("1 worker", lambda: len(c.status()["workers"]) == 1)
        assert not c._services(c.primary)["w2"]["alive"]
        assert "Scheduler at" in c.logs("scheduler", lines=100_000)  # its first lines; scaling adds many
        w0 = c.logs("w0", lines=100_000)
        assert "Start Nanny at" in w0 and "Start worker at" in w0, w0[-2000:]
        with pytest.raises(KeyError):
            c.logs("w9")
        from remotemagic.cluster.magic import format_status

        text = format_status(c.status())
        assert "1 of 1 worker(s)" in text and "w0" in text
    finally:
        c.stop()
        remote.close()
    assert c.stopped and not _dask_processes(local_root)
    assert not (local_root / "services" / c.id).exists()  # keys and logs gone with it


def test_idle_cluster_stops_itself(local_root: Path) -> None:
    remote = remotemagic.connect("local", root=str(local_root))
    c = cluster.start_local(1, remote=remote, idle_stop_minutes=0.4)  # 24 s without tasks
    try:
        c.connect().submit(sum, [1]).result()
        wait_for("the scheduler and its worker to stop after 24 idle seconds",
                 lambda: not any(s["alive"] for s in c._services(c.primary).values()), timeout=90)
        st = c._services(c.primary)
        assert st["scheduler"]["exit"] == 0 and st["scheduler"]["restarts"] == 0
        assert "idle" in c.logs("scheduler").lower()
        # the worker's supervisor saw its scheduler end on this machine: no 30 s wait for it
        assert "scheduler has ended here: not waiting for" in c.logs("w0")
        assert st["w0"]["restarts"] == 0
    finally:
        c.stop()
        remote.close()


# -- the magic ---------------------------------------------------------------------------------------
def _unload(ip: Any) -> None:
    """Stop the kernel's cluster if one still runs, unload the extension, forget its settings and variables."""
    magics = ip.magics_manager.registry.get("Ec2Magics")
    c = getattr(magics, "_dask_cluster", None)
    if c is not None and not c.stopped:
        c.stop()
    ip.run_line_magic("unload_ext", "remotemagic")
    ip.config.pop("Ec2Magics", None)
    ip.user_ns.clear()
    ip.user_ns.update(ip.user_ns_hidden)


@pytest.fixture
def shell(local_root: Path) -> Iterator[Any]:
    from IPython.testing import globalipapp

    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "remotemagic")
    ip.run_line_magic("ec2", f"use local --root {local_root}")
    yield ip
    _unload(ip)


def test_magic_local_cluster(shell: Any, local_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_ok(shell, "%config Ec2Magics.idle_stop_minutes = 0")
    run_ok(shell, "%ec2 cluster start --local 2 --client dc")
    out = plain(capsys.readouterr().out)
    assert "2 worker(s)" in out and "'dc' is its distributed.Client" in out
    assert run_ok(shell, "dc.submit(lambda v: v + 1, 41).result()") == 42
    run_ok(shell, "%%ec2 run -o n\nfrom distributed import get_client\n"
                  "n = len(get_client().scheduler_info()['workers'])")
    assert shell.user_ns["n"] == 2
    capsys.readouterr()
    run_ok(shell, "%ec2 cluster status")
    out = plain(capsys.readouterr().out)
    assert "2 of 2 worker(s) connected" in out and "scheduler  tls://127.0.0.1:" in out
    run_ok(shell, "%ec2 cluster scale 1")
    run_ok(shell, "%ec2 cluster logs w0 --lines 5")
    with pytest.raises(Exception, match="runs already"):
        run_ok(shell, "%ec2 cluster start --local 1")
    run_ok(shell, "%ec2 cluster stop")
    assert "stopped" in plain(capsys.readouterr().out)
    assert not _dask_processes(local_root)
    with pytest.raises(Exception, match="no cluster runs"):
        run_ok(shell, "%ec2 cluster status")
    with pytest.raises(Exception, match="exactly one of"):
        run_ok(shell, "%ec2 cluster start")


# -- --hosts (SSH logins on 127.0.0.1) ----------------------------------------------------------------
@pytest.fixture
def ssh_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd_server: Any, ssh_target_factory: Any,
                tcp_proxy: Any) -> Iterator[dict[str, Any]]:
    """Three roots on the test sshd (three "hosts"): the primary reached through a cuttable proxy."""
    from .ssh_fixtures import TEST_PYTHON

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    targets = [ssh_target_factory(tmp_path / f"host{i}") for i in range(3)]
    proxy = tcp_proxy(sshd_server.port)
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="flaky", Port=proxy.port,
                                       HostKeyAlias=sshd_server.host_key_name)
    primary = remotemagic.connect("ssh:flaky", root=str(targets[0].root), ssh_config=str(cfg), python=TEST_PYTHON,
                                  cwd=str(work), reconnect_timeout=30)
    host1 = targets[1].connect()
    opened = [primary, host1]
    try:
        yield {"primary": primary, "host1": host1, "proxy": proxy, "targets": targets,
               "host2_options": {"ssh_config": str(sshd_server.ssh_config), "python": TEST_PYTHON,
                                 "root": str(targets[2].root), "cwd": str(work)}}
    finally:
        for t in targets:
            _kill_leftovers(t.root)
            stop_workers(t.root)
        for r in opened:
            r.close()


def test_hosts_cluster_survives_a_cut_link(ssh_members: dict[str, Any]) -> None:
    primary, proxy = ssh_members["primary"], ssh_members["proxy"]
    # one host given as a connection, one by name (connect_hosts: the fleet provider's place)
    c = cluster.start_hosts([ssh_members["host1"], "rmtest"], primary=primary, **ssh_members["host2_options"])
    try:
        assert c.local_address.startswith("tls://127.0.0.1:") and c.local_address != c.address  # a tunnel
        roots = {str(t.root) for t in ssh_members["targets"][1:]}
        assert {m.remote.transport.root for m in c.workers.values()} == roots
        client = c.connect()
        x = np.random.default_rng(0).random((1000, 500))
        assert float(da.from_array(x, chunks=100).sum().compute()) == pytest.approx(float(x.sum()))
        assert client.gather(client.map(lambda v: v * 3, range(50))) == [v * 3 for v in range(50)]
        # same versions everywhere
        versions = client.get_versions(check=True)
        assert {w["packages"]["distributed"] for w in versions["workers"].values()} == {distributed.__version__}
        # get_client() inside a %%ec2 run cell on the primary
        job = primary.run("from distributed import get_client\nprint(get_client().submit(sum, [2, 3]).result())")
        assert job.state == "done"
        assert "".join(e.get("text", "") for e in job.events() if e.get("type") == "stream").strip() == "5"

        pids = client.run(os.getpid)
        # a busy client: its event loop learns that its connection died only 3 s after the cut;
        # a task submitted before then would be cancelled ("scheduler-connection-lost")
        client.loop.add_callback(time.sleep, 3)
        proxy.cut()  # the SSH link to the primary (and the tunnel on it) is gone
        client = c.connect()  # reconnects, opens the tunnels again on the same ports
        assert client.submit(sum, [1, 1]).result() == 2
        st = c.status()
        assert st["scheduler_alive"] and len(st["workers"]) == 2
        assert all(s["alive"] and s["restarts"] == 0 for s in st["services"].values())
        assert client.run(os.getpid) == pids  # the same worker processes: nothing restarted
        assert proxy.cuts == 1 and proxy.accepted >= 2
    finally:
        c.stop()
    for t in ssh_members["targets"]:
        assert not _dask_processes(t.root)


# -- the notebook -------------------------------------------------------------------------------------
def test_cluster_notebook_end_to_end(_isolated_state: Path) -> None:
    """notebooks/cluster.ipynb, executed headless by a real Jupyter kernel (nbclient)."""
    import nbformat
    from nbclient import NotebookClient

    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    nb = nbformat.read(notebooks / "cluster.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebooks)}})
    root = _isolated_state / "local-target"
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        _kill_leftovers(root)
        stop_workers(root)
    texts = {c.source.splitlines()[0]: "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
             for c in nb.cells if c.cell_type == "code"}
    assert "2 worker(s)" in texts["%ec2 cluster start --local 2 --client client"]
    assert "same: True" in texts["import numpy as np"]
    assert "same as plain Python: True" in texts["def collatz_steps(n):"]
    assert "workers seen from the target: 2" in texts["%%ec2 run"]
    assert "2 of 2 worker(s) connected" in texts["%ec2 cluster status"]
    assert "3 of 3 worker(s) connected" in texts["%ec2 cluster scale 3"]
    assert "stopped" in texts["%ec2 cluster stop"]
    assert not _dask_processes(root)


# -- EC2 (moto server on 127.0.0.1) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    opener.open(urllib.request.Request(moto_url + "/moto-api/reset", data=b"", method="POST"), timeout=10).read()
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    for k, v in {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    return moto_url


def _provider() -> Any:
    from remotemagic.providers.ec2 import AL2023_SSM, Ec2Provider

    p = Ec2Provider(public_ip_lookup=lambda: "203.0.113.7", ami_ssm_parameter=AL2023_SSM)
    p.poll_interval = 0.02
    return p


def test_ec2_workers_tags_groups_spot_and_stop(aws: str) -> None:
    import boto3

    from remotemagic.cluster import ec2 as cluster_ec2

    ec2 = boto3.client("ec2", region_name="us-east-1")
    p = _provider()
    primary = p.start("head", wait=True, progress=False)
    # someone else's instance, and one of ours of another cluster: never touched
    ami = ec2.describe_instances(InstanceIds=[primary.instance_id])["Reservations"][0]["Instances"][0]["ImageId"]
    tags = [{"ResourceType": "instance", "Tags": [{"Key": cluster_ec2.CLUSTER_TAG, "Value": "dask-x"}]}]
    foreign = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                TagSpecifications=tags)["Instances"][0]["InstanceId"]
    cid = "dask-x"
    infos = cluster_ec2.launch_workers(p, cid, 3, instance_type="t3.medium", spot=True,
                                       primary_id=primary.instance_id)
    assert len(infos) == 3 and all(i.state == "running" for i in infos)
    ids = [i.instance_id for i in infos]
    ds = [r["Instances"][0] for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]]
    gid = ec2.describe_security_groups(Filters=[{"Name": "group-name",
                                                 "Values": [cluster_ec2.group_name(cid)]}])["SecurityGroups"][0]
    for d in ds:
        tags = {t["Key"]: t["Value"] for t in d["Tags"]}
        assert tags["created-by"] == "remotemagic" and tags[cluster_ec2.CLUSTER_TAG] == cid
        assert d["InstanceType"] == "t3.medium" and d.get("InstanceLifecycle") == "spot"
        assert gid["GroupId"] in [g["GroupId"] for g in d["SecurityGroups"]]
        user_data = ec2.describe_instance_attribute(InstanceId=d["InstanceId"], Attribute="userData")
        import base64

        text = base64.b64decode(user_data["UserData"].get("Value", "") or b"").decode(errors="replace")
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text  # no TLS material in user-data
    head = ec2.describe_instances(InstanceIds=[primary.instance_id])["Reservations"][0]["Instances"][0]
    assert gid["GroupId"] in [g["GroupId"] for g in head["SecurityGroups"]]
    assert not any(t["Key"] == cluster_ec2.CLUSTER_TAG for t in head.get("Tags", []))  # the head is not a worker
    # the members' rule references only the group itself; nothing open to an address range
    perms = gid["IpPermissions"]
    assert len(perms) == 1 and perms[0]["IpProtocol"] == "tcp"
    assert [g["GroupId"] for g in perms[0]["UserIdGroupPairs"]] == [gid["GroupId"]]
    assert not perms[0].get("IpRanges") and not perms[0].get("Ipv6Ranges")
    for g in ec2.describe_security_groups()["SecurityGroups"]:
        for perm in g["IpPermissions"]:
            assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm.get("IpRanges", [])), g["GroupName"]
            assert not perm.get("Ipv6Ranges") or all(r["CidrIpv6"] != "::/0" for r in perm["Ipv6Ranges"])

    gone = cluster_ec2.terminate_workers(p, cid, primary.instance_id)
    assert sorted(gone) == sorted(ids)
    states = {d["InstanceId"]: d["State"]["Name"] for r in ec2.describe_instances()["Reservations"]
              for d in r["Instances"]}
    assert all(states[i] == "terminated" for i in ids)
    assert states[primary.instance_id] == "running" and states[foreign] == "running"  # not ours / not a worker
    assert not ec2.describe_security_groups(Filters=[{"Name": "group-name",
                                                      "Values": [cluster_ec2.group_name(cid)]}])["SecurityGroups"]
    head = ec2.describe_instances(InstanceIds=[primary.instance_id])["Reservations"][0]["Instances"][0]
    assert gid["GroupId"] not in [g["GroupId"] for g in head["SecurityGroups"]]


def test_ec2_cluster_needs_the_scheduler_on_our_instance(shell: Any, aws: str) -> None:
    with pytest.raises(Exception, match="must be one of our EC2 instances"):
        run_ok(shell, "%ec2 cluster start -n 2")
    # the current target as connect_ec2 leaves it for a spot instance: the scheduler refuses it
    p = _provider()
    spot = p.start("spot-head", spot=True, wait=True, progress=False)
    assert spot.lifecycle == "spot"
    magics = shell.magics_manager.registry["Ec2Magics"]
    remote = magics.get_remote()
    remote.instance, remote.provider = spot, p
    with pytest.raises(Exception, match="must not run on a spot instance"):
        run_ok(shell, "%ec2 cluster start -n 2 --spot")
    ec2 = p.ec2
    assert len([d for r in ec2.describe_instances()["Reservations"] for d in r["Instances"]]) == 1  # nothing launched


def test_scheduler_killed_comes_back_at_the_same_address(local_root: Path) -> None:
    remote = remotemagic.connect("local", root=str(local_root))
    c = cluster.start_local(2, remote=remote)
    try:
        client = c.connect()
        assert client.submit(sum, [1, 2]).result() == 3
        st = c._services(c.primary)["scheduler"]
        os.kill(st["child_pid"], signal.SIGKILL)
        wait_for("the scheduler started again by its supervisor",
                 lambda: c._services(c.primary)["scheduler"]["restarts"] == 1, timeout=30)
        # the same port: its workers and the notebook's Client find it again by themselves
        wait_for("both workers back", lambda: len(c.identity(c.connect()).get("workers", {})) == 2, timeout=120)
        assert c.connect().submit(sum, [3, 4]).result() == 7
        assert c.identity(c.connect())["address"] == c.address
    finally:
        c.stop()
        remote.close()
    assert not _dask_processes(local_root)


def test_a_new_kernel_finds_the_running_cluster(shell: Any, local_root: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The cluster outlives the kernel that started it; the next kernel re-attaches and stops it."""
    remote = remotemagic.connect("local", root=str(local_root))
    c = cluster.start_local(1, remote=remote)
    c.close()  # the first kernel goes away: its client and forwards close, the processes run on
    remote.close()
    capsys.readouterr()
    run_ok(shell, "%ec2 cluster status")
    got = capsys.readouterr()
    assert f"re-attached to cluster {c.id}" in plain(got.out + got.err)
    assert "1 of 1 worker(s) connected" in plain(got.out)
    assert run_ok(shell, "client.submit(sum, [20, 22]).result()") == 42
    run_ok(shell, "%ec2 cluster stop")
    assert not _dask_processes(local_root)
    run_ok(shell, "%ec2 cluster start --local 1 --client c2")  # nothing left to re-attach to
    run_ok(shell, "%ec2 cluster stop")
    shell.run_line_magic("unload_ext", "remotemagic")  # closes the magics' own connection too
    deadline = time.monotonic() + 30  # the connections the re-attached cluster opened are closed by its stop
    while _agents_serving(local_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _agents_serving(local_root)
    shell.run_line_magic("load_ext", "remotemagic")


def test_magic_hosts_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd_server: Any,
                             ssh_target_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``%ec2 use ssh`` then ``%ec2 cluster start --hosts``: the magic's SSH settings reach the hosts."""
    from IPython.testing import globalipapp

    from .ssh_fixtures import TEST_PYTHON

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    primary, host = ssh_target_factory(tmp_path / "primary"), ssh_target_factory(tmp_path / "host")
    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "remotemagic")
    try:
        run_ok(ip, f"%config Ec2Magics.ssh_config = {str(sshd_server.ssh_config)!r}")
        run_ok(ip, f"%config Ec2Magics.remote_python = {TEST_PYTHON!r}")
        run_ok(ip, f"%config Ec2Magics.remote_root = {str(host.root)!r}")  # the hosts' root
        run_ok(ip, "%config Ec2Magics.idle_stop_minutes = 0")
        run_ok(ip, "%ec2 " + primary.use_line)
        run_ok(ip, "%ec2 cluster start --hosts rmtest --workers 2 --client hc")
        out = plain(capsys.readouterr().out)
        assert "2 worker(s)" in out and "'hc' is its distributed.Client" in out
        assert run_ok(ip, "hc.submit(pow, 2, 10).result()") == 1024
        run_ok(ip, "%ec2 cluster status")
        assert "2 of 2 worker(s) connected" in plain(capsys.readouterr().out)
        run_ok(ip, "%ec2 cluster stop")
    finally:
        _unload(ip)
        for t in (primary, host):
            _kill_leftovers(t.root)
            stop_workers(t.root)
    for t in (primary, host):
        assert not _dask_processes(t.root)


def test_running_tasks_mark_the_target_busy(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance's idle auto-stop reads <root>/activity: while Dask tasks run, it stays fresh."""
    from remotemagic.cluster import launch

    monkeypatch.setattr(launch, "ACTIVITY_EVERY_MS", 200)
    remote = remotemagic.connect("local", root=str(local_root))
    c = cluster.start_local(1, remote=remote)
    try:
        activity = local_root / "activity"
        client = c.connect()
        wait_for("the agent's own touch", activity.exists)
        os.utime(activity, (1_000_000, 1_000_000))  # long ago
        time.sleep(0.6)
        assert activity.stat().st_mtime == 1_000_000  # idle cluster: no touch
        future = client.submit(time.sleep, 3, pure=False)
        wait_for("a touch while the task runs", lambda: activity.stat().st_mtime > 1_000_000, timeout=10)
        future.result()
    finally:
        c.stop()
        remote.close()


# -- EC2 end to end: moto for AWS, the loopback sshd standing in for every instance ---------------------
@pytest.fixture
def ec2_shell(aws: str, sshd_server: Any, ssh_shared_venv: Path, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The magics with ``Host i-*`` mapped to the test sshd (as tests/test_ec2_target.py does):
    every instance moto launches is "reached" there, all under one root. Dask peers reach an
    instance at its private address; here every instance is 127.0.0.1."""
    from IPython.testing import globalipapp

    from remotemagic.cluster import ec2 as cluster_ec2

    from .ssh_fixtures import TEST_PYTHON, write_instance_ssh_config

    known = tmp_path / "known_hosts"
    known.write_text(sshd_server.host_key_line + "\n")
    cfg = write_instance_ssh_config(tmp_path / "ssh_config", sshd_server.port, sshd_server.user, known,
                                    sshd_server.client_key)
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    (root / "venv").symlink_to(ssh_shared_venv)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(cluster_ec2, "instance_address", lambda info: "127.0.0.1")
    monkeypatch.setattr(cluster_ec2.Ec2Workers, "interval", 3600.0)  # this test drives the checks itself
    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "remotemagic")
    for line in (f"Ec2Magics.ssh_config = {str(cfg)!r}", "Ec2Magics.ssh_cidrs = ['203.0.113.7/32']",
                 "Ec2Magics.ami = 'al2023'", f"Ec2Magics.remote_python = {TEST_PYTHON!r}",
                 f"Ec2Magics.remote_root = {str(root)!r}", "Ec2Magics.instance_type = 't3.micro'",
                 "Ec2Magics.region = 'us-east-1'", "Ec2Magics.show_progress = False",
                 "Ec2Magics.idle_stop_minutes = 0"):
        ip.run_line_magic("config", line)
    try:
        yield ip, root
    finally:
        _unload(ip)
        _kill_leftovers(root)
        stop_workers(root)


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    got = capsys.readouterr()
    return plain(got.out + got.err)


def test_ec2_lost_worker_instance_is_replaced_and_scale_launches_and_terminates(
        ec2_shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import boto3

    from remotemagic.agent import protocol
    from remotemagic.cluster import ec2 as cluster_ec2

    ip, root = ec2_shell
    ec2 = boto3.client("ec2", region_name="us-east-1")
    run_ok(ip, "%ec2 start --name head")
    run_ok(ip, "%ec2 cluster start -n 2 --client dc")
    magics = ip.magics_manager.registry["Ec2Magics"]
    c = magics._dask_cluster
    assert run_ok(ip, "dc.submit(pow, 2, 10).result()") == 1024
    capsys.readouterr()

    def instances() -> dict[str, dict[str, Any]]:
        return {d["InstanceId"]: d for r in ec2.describe_instances()["Reservations"] for d in r["Instances"]}

    def tags(d: dict[str, Any]) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in d.get("Tags", [])}

    def of_cluster(state: str = "running") -> set[str]:
        return {i for i, d in instances().items() if tags(d).get(cluster_ec2.CLUSTER_TAG) == c.id
                and tags(d).get("created-by") == "remotemagic" and d["State"]["Name"] == state}

    # bystanders: an instance tagged with the cluster but not ours, and one of ours in no cluster
    head = instances()[c.primary.remote.instance.instance_id]
    foreign = ec2.run_instances(ImageId=head["ImageId"], MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                    {"Key": cluster_ec2.CLUSTER_TAG, "Value": c.id}]}])["Instances"][0]["InstanceId"]
    ours_elsewhere = c.ec2.provider.start("bystander", ami="al2023", wait=False, progress=False).instance_id
    before = {w: m.instance_id for w, m in c.workers.items()}
    assert sorted(before) == ["w0", "w1"] and len(set(before.values())) == 2 and set(before.values()) == of_cluster()

    # AWS terminates w1's instance: the machine, and the nanny on it, are gone
    lost = before["w1"]
    ec2.terminate_instances(InstanceIds=[lost])
    c.primary.remote.request(protocol.OP_SERVICE_STOP, group=c.id, names=["w1"])  # (all "instances" share a root)
    run_ok(ip, "%ec2 cluster status")
    out = _said(capsys)
    assert f"w1 on {lost} is terminated: launching a replacement" in out, out
    new = c.workers["w1"].instance_id
    assert new not in (lost, before["w0"]) and f"replacement running: w1 on {new}" in out, out
    d = instances()[new]
    assert d["State"]["Name"] == "running" and tags(d)["created-by"] == "remotemagic"
    assert tags(d)[cluster_ec2.CLUSTER_TAG] == c.id
    group = ec2.describe_security_groups(Filters=[{"Name": "group-name",
                                                   "Values": [cluster_ec2.group_name(c.id)]}])["SecurityGroups"][0]
    assert group["GroupId"] in {g["GroupId"] for g in d["SecurityGroups"]}
    assert of_cluster() == {before["w0"], new}

    def two_connected() -> bool:
        run_ok(ip, "%ec2 cluster status")
        return "2 of 2 worker(s) connected" in plain(capsys.readouterr().out)

    wait_for("the replacement's worker to join", two_connected, timeout=120)
    names = {w["name"] for w in distributed.Client.scheduler_info(ip.user_ns["dc"], n_workers=-1)["workers"].values()}
    assert names == {c.dask_name("w0"), c.dask_name("w1")}
    assert run_ok(ip, "sum(dc.gather(dc.map(lambda v: v * 3, range(20))))") == 3 * sum(range(20))

    # an on-demand worker instance stopped (by hand, its idle auto-stop): started again, its worker too
    w0 = before["w0"]
    c.primary.remote.request(protocol.OP_SERVICE_STOP, group=c.id, names=["w0"])
    ec2.stop_instances(InstanceIds=[w0])
    wait_for("moto to stop it", lambda: instances()[w0]["State"]["Name"] == "stopped")
    run_ok(ip, "%ec2 cluster status")
    out = _said(capsys)
    assert f"w0 on {w0} was stopped: starting it again" in out and f"w0 on {w0}: stopped, starting again since" in out
    wait_for("the instance to run again", lambda: instances()[w0]["State"]["Name"] == "running")
    wait_for("w0 back", two_connected, timeout=120)
    assert c.workers["w0"].instance_id == w0 and of_cluster() == {w0, new}

    # scale launches and terminates instances (only ours, of this cluster)
    run_ok(ip, "%ec2 cluster scale 3")
    assert len(of_cluster()) == 3 and c.workers["w2"].instance_id in of_cluster()
    run_ok(ip, "%ec2 cluster scale 1")
    assert of_cluster() == {before["w0"]}
    out = _said(capsys)
    assert "launching 1 worker instance(s)" in out and "terminating worker instance(s)" in out, out
    run_ok(ip, "%ec2 cluster stop")
    states = {i: d["State"]["Name"] for i, d in instances().items()}
    assert not of_cluster() and states[before["w0"]] in ("shutting-down", "terminated")
    assert states[foreign] == "running" and states[ours_elsewhere] in ("pending", "running")
    assert states[c.primary.remote.instance.instance_id] == "running"
    assert not _dask_processes(root)


def test_ec2_watcher_waits_for_a_reclaimed_spot_worker_and_replaces_a_terminated_one(
        ec2_shell: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The watcher thread alone (no command): a spot worker instance AWS stops is waited for and its
    worker started again when it is back; once terminated, it is replaced."""
    import boto3

    from remotemagic.agent import protocol
    from remotemagic.cluster import ec2 as cluster_ec2

    ip, root = ec2_shell
    monkeypatch.setattr(cluster_ec2.Ec2Workers, "interval", 0.2)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    run_ok(ip, "%ec2 start --name head")
    run_ok(ip, "%ec2 cluster start -n 1 --spot --client dc")
    c = ip.magics_manager.registry["Ec2Magics"]._dask_cluster
    iid = c.workers["w0"].instance_id
    d = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert d.get("InstanceLifecycle") == "spot"
    said = []

    def reads(text: str) -> bool:
        said.append(_said(capsys))
        return text in "".join(said)

    def connected() -> int:
        return len(_identity(c)["workers"])

    # AWS reclaims it (persistent request, interruption behaviour "stop"): the machine's processes are gone
    c.primary.remote.request(protocol.OP_SERVICE_STOP, group=c.id, names=["w0"])  # (one root for all)
    ec2.stop_instances(InstanceIds=[iid])
    wait_for("the watcher to see the reclaim", lambda: reads(f"w0 on {iid}: reclaimed by AWS (spot)"), timeout=60)
    wait_for("the status line", lambda: any("reclaimed, waiting for capacity since" in x for x in c.ec2.lines))
    ours = [x for r in ec2.describe_instances(Filters=[{"Name": f"tag:{cluster_ec2.CLUSTER_TAG}", "Values": [c.id]}])[
        "Reservations"] for x in r["Instances"]]
    assert [x["InstanceId"] for x in ours] == [iid]  # waited for, not replaced
    # capacity is back: AWS starts it, the watcher starts its worker again
    ec2.start_instances(InstanceIds=[iid])
    wait_for("the watcher to restart w0", lambda: reads(f"w0 on {iid} is back: its worker(s) started again"),
             timeout=60)
    wait_for("w0 to rejoin", lambda: connected() == 1, timeout=120)
    assert c.workers["w0"].instance_id == iid
    # terminated: replaced (spot again, or on-demand when there is no spot capacity)
    c.primary.remote.request(protocol.OP_SERVICE_STOP, group=c.id, names=["w0"])
    ec2.terminate_instances(InstanceIds=[iid])
    wait_for("the watcher to replace it", lambda: reads("replacement running: w0 on i-"), timeout=120)
    new = c.workers["w0"].instance_id
    assert new != iid
    wait_for("the replacement to join", lambda: connected() == 1, timeout=120)
    assert run_ok(ip, "dc.submit(pow, 3, 4).result()") == 81
    run_ok(ip, "%ec2 cluster stop")
    assert c.ec2._thread is None  # the watcher ended with the cluster
    state = ec2.describe_instances(InstanceIds=[new])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated")


def _identity(c: cluster.Cluster) -> dict[str, Any]:
    return cluster.Cluster.identity(c.connect())
