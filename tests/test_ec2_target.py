"""EC2 end to end: moto in server mode for AWS, the "instance" reached through the loopback sshd.

The SSH config maps ``Host i-*`` to the test sshd -- the same mechanism that makes SSM
``ProxyCommand`` setups work for real instances.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest

import remotemagic
from remotemagic.providers.ec2 import Ec2Provider
from remotemagic.transport.ec2 import ephemeral_key

from .conftest import run_ok, stop_workers
from .ssh_fixtures import TEST_PYTHON, write_instance_ssh_config
from .test_ec2_provider import AL2023_SSM, CALLER_IP, REGION, aws, moto_url  # noqa: F401 - fixtures


@pytest.fixture
def ec2_env(aws: str, sshd_server: Any, ssh_shared_venv: Path, tmp_path: Path,  # noqa: F811 - imported fixture
            monkeypatch: pytest.MonkeyPatch) -> Any:
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
    yield SimpleNamespace(cfg=cfg, root=root, known=known, sshd=sshd_server)
    stop_workers(root)


@pytest.fixture
def shell(ec2_env: Any) -> Any:
    from IPython.testing import globalipapp

    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "remotemagic")
    for line in (f"Ec2Magics.ssh_config = {str(ec2_env.cfg)!r}", f"Ec2Magics.ssh_cidrs = ['{CALLER_IP}/32']",
                 "Ec2Magics.ami = 'al2023'", f"Ec2Magics.remote_python = {TEST_PYTHON!r}",
                 f"Ec2Magics.remote_root = {str(ec2_env.root)!r}", "Ec2Magics.instance_type = 't3.micro'",
                 f"Ec2Magics.region = {REGION!r}", "Ec2Magics.show_progress = False"):
        ip.run_line_magic("config", line)
    yield ip
    ip.run_line_magic("unload_ext", "remotemagic")
    ip.config.pop("Ec2Magics", None)


def _instance(name: str) -> dict:
    ec2 = boto3.client("ec2", region_name=REGION)
    found = ec2.describe_instances(Filters=[{"Name": "tag:remotemagic:name", "Values": [name]}])
    return [i for r in found["Reservations"] for i in r["Instances"]][-1]


def test_lifecycle_through_the_magics(shell: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(shell, "%ec2 start --name demo")
    out = capsys.readouterr().out
    assert "Using demo (i-" in out and "t3.micro" in out and "stops itself after 60 idle minutes" in out
    d = _instance("demo")
    # secure by default: SSH only, only from the caller, IMDSv2, encrypted, tagged
    ec2 = boto3.client("ec2", region_name=REGION)
    group = ec2.describe_security_groups(GroupIds=[d["SecurityGroups"][0]["GroupId"]])["SecurityGroups"][0]
    assert [(p["IpProtocol"], p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in group["IpPermissions"]] \
        == [("tcp", 22, [f"{CALLER_IP}/32"])]
    assert d["MetadataOptions"]["HttpTokens"] == "required"
    tags = {t["Key"]: t["Value"] for t in d["Tags"]}
    assert tags["created-by"] == "remotemagic" and tags["remotemagic:name"] == "demo"

    run_ok(shell, "%%ec2 run -o v\nimport platform\nv = 41 + 1\nprint('on', platform.node())")
    assert shell.user_ns["v"] == 42
    run_ok(shell, "%ec2 status")
    status = capsys.readouterr().out
    assert "demo" in status and "t3.micro" in status and "running" in status and "Sessions:" in status

    run_ok(shell, "%ec2 stop")
    assert _instance("demo")["State"]["Name"] == "stopped"
    assert "Stopped demo" in capsys.readouterr().out

    run_ok(shell, "%ec2 resize t3.large")
    d = _instance("demo")
    assert d["InstanceType"] == "t3.large" and d["State"]["Name"] == "running"
    run_ok(shell, "%%ec2 run -o w\nw = 'after resize'")
    assert shell.user_ns["w"] == "after resize"

    run_ok(shell, "%ec2 stop")
    run_ok(shell, "%ec2 start --name demo")  # attaches to the stopped instance, starts it
    assert _instance("demo")["InstanceId"] == d["InstanceId"]
    run_ok(shell, "%ec2 terminate -y")
    assert _instance("demo")["State"]["Name"] in ("shutting-down", "terminated")


def test_errors_are_specific(shell: Any) -> None:
    for cell, match in [
        ("%ec2 use ec2 nosuch", "no instance named 'nosuch'"),
        ("%ec2 start --name x --type t3.lrge", "t3.large"),
        ("%ec2 start --name x --ami ami-00000000000000000", "does not exist"),
        ("%ec2 stop", "not an EC2 instance"),
    ]:
        result = shell.run_cell(cell)
        err = result.error_in_exec or result.error_before_exec
        assert err is not None and match in str(err), (cell, err)
    # an instance someone else launched (not tagged ours) is never touched
    ec2 = boto3.client("ec2", region_name=REGION)
    ami = boto3.client("ssm", region_name=REGION).get_parameter(Name=AL2023_SSM["x86_64"])["Parameter"]["Value"]
    theirs = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro",
                               TagSpecifications=[{"ResourceType": "instance",
                                                   "Tags": [{"Key": "Name", "Value": "theirs"}]}])
    iid = theirs["Instances"][0]["InstanceId"]
    result = shell.run_cell(f"%ec2 stop --name {iid}")
    assert "not" in str(result.error_in_exec).lower() and "ours" in str(result.error_in_exec).lower()
    state = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "running"


def test_instance_connect_ephemeral_key(ec2_env: Any, tmp_path: Path) -> None:
    """No key pair: an ephemeral key is pushed with EC2 Instance Connect before connecting.

    The test sshd stands in for the instance, whose sshd would fetch the pushed key from AWS;
    here the test adds it to authorized_keys, the one step moto cannot emulate."""
    p = Ec2Provider(public_ip_lookup=lambda: CALLER_IP, ami_ssm_parameter=AL2023_SSM)
    p.poll_interval = 0.02
    info = p.start("ic", instance_type="t3.micro", ami="al2023", progress=False)
    state = tmp_path / "state"
    _, pub = ephemeral_key(state / "ec2-keys" / info.instance_id)
    cfg = write_instance_ssh_config(tmp_path / "ssh_config_nokey", ec2_env.sshd.port, ec2_env.sshd.user,
                                    ec2_env.known)
    keys = ec2_env.sshd.authorized_keys
    before = keys.read_text()
    keys.write_text(before + pub + "\n")
    try:
        r = remotemagic.connect_ec2("ic", start=False, provider=p, ssh_config=str(cfg), python=TEST_PYTHON,
                                    root=str(ec2_env.root), state_root=str(state), show_progress=False)
        try:
            assert r.transport.ephemeral_public_key == pub
            key_file = state / "ec2-keys" / info.instance_id / "id_ed25519"
            assert key_file.stat().st_mode & 0o777 == 0o600
            assert r.run("x = 1", pull=["x"]).result() == {"x": 1}
            assert r.status()["instances"][0]["name"] == "ic"
        finally:
            r.close()
    finally:
        keys.write_text(before)


def test_start_keeps_its_connection_and_resize_after_use(shell: Any, capsys: pytest.CaptureFixture) -> None:
    """Issue #16 item 7: one place for where cells run."""
    from remotemagic.magics import _loaded

    magics = _loaded[id(shell)]
    run_ok(shell, "%ec2 start --name keep")
    remote = magics.remote
    assert remote is not None and remote.instance.name == "keep"
    conn = remote._conn
    run_ok(shell, "%%ec2 run -o v\nv = 1")
    assert shell.user_ns["v"] == 1
    assert magics.remote is remote and remote._conn is conn  # no second handshake
    # asked for another type on an existing instance: the cell says it is ignored
    capsys.readouterr()
    run_ok(shell, "%ec2 start --name keep --type t3.large")
    err = capsys.readouterr().err
    assert "[remotemagic] warning: keep (i-" in err and "--type t3.large applies to new launches only" in err

    run_ok(shell, "%ec2 use local")
    run_ok(shell, "%ec2 use ec2 keep")
    run_ok(shell, "%ec2 resize t3.large")
    assert "keep is now a t3.large; reattached" in capsys.readouterr().out
    assert _instance("keep")["InstanceType"] == "t3.large"
    resized = magics.remote
    run_ok(shell, "%%ec2 run -o w\nw = 'after resize'")
    assert shell.user_ns["w"] == "after resize" and magics.remote is resized
    run_ok(shell, "%ec2 terminate -y")


def test_ssh_open_to_the_whole_internet_is_told(shell: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(shell, "%config Ec2Magics.ssh_cidrs = ['0.0.0.0/0']")
    result = shell.run_cell("%ec2 stop --name nosuch")
    assert result.error_in_exec is not None  # there is no such instance; the notice came first
    err = capsys.readouterr().err
    assert "[remotemagic] warning: ssh_cidrs contains 0.0.0.0/0: SSH will be open to the whole internet" in err
