"""EC2 lifecycle layer against moto's server mode (a real HTTP endpoint on 127.0.0.1).

No real AWS is contacted: every test points boto3 at the moto server through AWS_ENDPOINT_URL
with fake credentials, and the public-IP lookup is injected.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import stat
import subprocess
import time
import urllib.request

import boto3
import pytest
from botocore.exceptions import ClientError

from remotemagic.errors import RemoteMagicError
from remotemagic.providers.ec2 import (
    AL2023_SSM,
    AmbiguousInstanceError,
    AmiNotFoundError,
    AwsCredentialsError,
    AwsError,
    AwsRegionError,
    Ec2Provider,
    HostKeyError,
    IncompatibleAmiError,
    InstanceNotFoundError,
    NotOursError,
    PublicIpError,
    UnknownInstanceTypeError,
    WaitTimeoutError,
    host_keys_from_console,
    idle_check_script,
    idle_stop_user_data,
    login_user_for_image,
    on_demand_hourly_usd,
    packaged_prices,
    record_known_hosts,
)

pytest.importorskip("moto.server")

REGION = "us-east-1"
CALLER_IP = "203.0.113.7"
MOTO_ARN = "arn:aws:sts::123456789012:user/moto"
BASH = shutil.which("bash")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _no_proxy_open(req: urllib.request.Request) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        resp.read()


@pytest.fixture
def aws(moto_url, monkeypatch, tmp_path):
    """A fresh moto state and an environment where boto3 can only reach the moto server."""
    _no_proxy_open(urllib.request.Request(moto_url + "/moto-api/reset", data=b"", method="POST"))
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_url


def provider(**kw) -> Ec2Provider:
    kw.setdefault("public_ip_lookup", lambda: CALLER_IP)
    kw.setdefault("ami_ssm_parameter", AL2023_SSM)  # moto lacks Canonical's Ubuntu parameters
    p = Ec2Provider(**kw)
    p.poll_interval = 0.02
    return p


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2", region_name=REGION)


def describe(ec2, iid: str) -> dict:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def tags_of(d: dict) -> dict:
    return {t["Key"]: t["Value"] for t in d.get("Tags", [])}


def al2023_ami(arch: str = "x86_64") -> str:
    return boto3.client("ssm", region_name=REGION).get_parameter(Name=AL2023_SSM[arch])["Parameter"]["Value"]


# -- launch and secure defaults ---------------------------------------------------------------


def test_launch_has_secure_defaults(ec2):
    p = provider()
    info = p.start("box", disk_gb=40, progress=True)
    assert info.state == "running"
    assert info.name == "box" and info.user == "ec2-user" and info.lifecycle == "on-demand"
    assert info.instance_type == "t3.large" and info.host
    d = describe(ec2, info.instance_id)

    # security group: only TCP 22, only from the caller's /32
    assert len(info.security_group_ids) == 1
    group = ec2.describe_security_groups(GroupIds=info.security_group_ids)["SecurityGroups"][0]
    assert group["GroupName"] == "remotemagic-box"
    perms = group["IpPermissions"]
    assert len(perms) == 1
    assert (perms[0]["IpProtocol"], perms[0]["FromPort"], perms[0]["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in perms[0]["IpRanges"]] == [f"{CALLER_IP}/32"]
    assert not perms[0].get("Ipv6Ranges") and not perms[0].get("UserIdGroupPairs")

    assert d["MetadataOptions"]["HttpTokens"] == "required"
    attr = ec2.describe_instance_attribute(InstanceId=info.instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"

    # root volume: encrypted, deleted with the instance, the requested size, tagged
    (mapping,) = d["BlockDeviceMappings"]
    assert mapping["Ebs"]["DeleteOnTermination"] is True
    (vol,) = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
    assert vol["Encrypted"] is True and vol["Size"] == 40

    want = {"created-by": "remotemagic", "remotemagic:name": "box", "Name": "box", "owner": MOTO_ARN}
    assert want.items() <= tags_of(d).items()
    assert want.items() <= tags_of(vol).items()

    user_data = ec2.describe_instance_attribute(InstanceId=info.instance_id, Attribute="userData")
    assert base64.b64decode(user_data["UserData"]["Value"]).decode() == idle_stop_user_data(60, "ec2-user")


def test_find_and_attach_return_the_same_instance_and_refresh_the_ssh_rule(ec2):
    p = provider()
    assert p.find("box") is None
    first = p.start("box", progress=False)
    assert p.find("box").instance_id == first.instance_id

    # someone opened a port to the world by hand: the next attach takes it back
    ec2.authorize_security_group_ingress(GroupId=first.security_group_ids[0], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 8888, "ToPort": 8888, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
    ])
    moved = provider(public_ip_lookup=lambda: "198.51.100.23")  # the laptop changed networks
    again = moved.start("box", progress=False)
    assert again.instance_id == first.instance_id
    assert again.user == "ec2-user"
    assert len(p.status()) == 1
    group = ec2.describe_security_groups(GroupIds=again.security_group_ids)["SecurityGroups"][0]
    assert len(group["IpPermissions"]) == 1 and group["IpPermissions"][0]["FromPort"] == 22
    assert [(r["CidrIp"]) for perm in group["IpPermissions"] for r in perm["IpRanges"]] == ["198.51.100.23/32"]


def test_ssh_cidrs_replace_the_lookup_and_offline_lookup_names_the_option(ec2):
    def offline() -> str:
        raise OSError("Network is unreachable")

    with pytest.raises(PublicIpError, match="ssh_cidrs"):
        provider(public_ip_lookup=offline).start("box", progress=False)
    assert provider().status() == []  # nothing launched

    info = provider(public_ip_lookup=offline, ssh_cidrs=["198.51.100.0/24"]).start("box", progress=False)
    group = ec2.describe_security_groups(GroupIds=info.security_group_ids)["SecurityGroups"][0]
    assert [r["CidrIp"] for perm in group["IpPermissions"] for r in perm["IpRanges"]] == ["198.51.100.0/24"]

    # attaching while the lookup fails keeps the rule as it is (with a warning) instead of failing
    p = provider(public_ip_lookup=offline)
    p.stop("box", wait=True, progress=False)
    assert p.start("box", progress=False).instance_id == info.instance_id
    group = ec2.describe_security_groups(GroupIds=info.security_group_ids)["SecurityGroups"][0]
    assert [r["CidrIp"] for perm in group["IpPermissions"] for r in perm["IpRanges"]] == ["198.51.100.0/24"]


def test_stop_start_resize_terminate(ec2):
    p = provider()
    info = p.start("life", progress=False)
    iid = info.instance_id

    stopped = p.stop("life", wait=True, progress=False)
    assert stopped.state == "stopped" and describe(ec2, iid)["State"]["Name"] == "stopped"

    restarted = p.start("life", progress=False)
    assert restarted.instance_id == iid and restarted.state == "running"

    resized = p.resize("life", "t3.xlarge", progress=False)
    assert resized.instance_id == iid and resized.state == "running" and resized.instance_type == "t3.xlarge"
    assert describe(ec2, iid)["InstanceType"] == "t3.xlarge"

    assert p.terminate("life", wait=True, progress=False) == iid
    assert describe(ec2, iid)["State"]["Name"] == "terminated"
    assert p.find("life") is None
    with pytest.raises(ClientError, match="InvalidGroup.NotFound"):  # the security group went with it
        ec2.describe_security_groups(GroupIds=info.security_group_ids)
    with pytest.raises(InstanceNotFoundError):
        p.stop("life")


def test_spot_launch_sets_market_options_and_refuses_resize(ec2):
    p = provider()
    info = p.start("cheap", spot=True, instance_type="c7i.large", progress=False)
    assert info.lifecycle == "spot"
    assert describe(ec2, info.instance_id)["InstanceLifecycle"] == "spot"
    with pytest.raises(AwsError, match="spot instance"):
        p.resize("cheap", "c7i.xlarge")
    p.stop("cheap", wait=True, progress=False)  # persistent + stop interruption behaviour
    assert p.start("cheap", progress=False).instance_id == info.instance_id


def test_graviton_type_gets_an_arm64_image_and_mismatches_are_refused(ec2):
    p = provider()
    info = p.start("arm", instance_type="m7g.large", progress=False)
    assert info.image_id == al2023_ami("arm64")
    with pytest.raises(IncompatibleAmiError, match="x86_64"):
        p.start("arm2", instance_type="m7g.large", ami=al2023_ami("x86_64"), progress=False)
    with pytest.raises(IncompatibleAmiError):
        p.resize("arm", "t3.large")
    assert provider().start("alias", ami="al2023", progress=False).image_id == al2023_ami("x86_64")


def test_status_lists_instances_with_prices_and_cost(ec2):
    p = provider()
    p.start("one", progress=False)
    p.start("two", spot=True, instance_type="c7i.large", progress=False)
    p.stop("two", wait=True, progress=False)
    started = time.monotonic()
    rows = p.status()
    assert time.monotonic() - started < 15  # moto has no Pricing API: the failure must be quick
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"one", "two"}

    one = by_name["one"]
    assert one["type"] == "t3.large" and one["state"] == "running" and one["lifecycle"] == "on-demand"
    assert one["hourly_price"] == pytest.approx(packaged_prices()["prices"]["t3.large"])
    assert "packaged table" in one["price_source"]
    assert one["uptime"] is not None and one["launch_time"] is not None
    assert one["cost_so_far"] >= one["hourly_price"] * 60 / 3600 - 1e-6  # one minute minimum
    assert one["owner"] == MOTO_ARN and one["id"].startswith("i-")

    two = by_name["two"]
    assert two["lifecycle"] == "spot" and two["state"] == "stopped"
    assert two["price_source"] == "spot price history" and two["hourly_price"] > 0
    assert two["uptime"] is None and two["cost_so_far"] is None
    assert p.hourly_price("u-24tb1.112xlarge") == (None, "unknown")


def _price_item(operation: str, usd: str, sw: str = "NA") -> str:
    # the shape of one GetProducts PriceList entry (abridged: Reserved terms and most attributes cut)
    sku = "8TGTBGU9QZ3RKNRP" if operation == "RunInstances" else "Q8VKQNV2PA2WKBSY"
    return json.dumps({
        "product": {
            "productFamily": "Compute Instance",
            "attributes": {"instanceType": "t3.large", "regionCode": "us-east-1", "operatingSystem": "Linux",
                           "tenancy": "Shared", "preInstalledSw": sw, "capacitystatus": "Used",
                           "operation": operation, "usagetype": "BoxUsage:t3.large"},
            "sku": sku,
        },
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {f"{sku}.JRTCKXETXF": {
            "priceDimensions": {f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                "unit": "Hrs", "endRange": "Inf", "beginRange": "0", "appliesTo": [],
                "description": f"${usd} per On Demand Linux t3.large Instance Hour",
                "pricePerUnit": {"USD": usd},
            }},
            "sku": sku, "effectiveDate": "2024-06-01T00:00:00Z", "offerTermCode": "JRTCKXETXF", "termAttributes": {},
        }}},
        "version": "20240605225839", "publicationDate": "2024-06-05T22:58:39Z",
    })


def test_pricing_api_answer_is_parsed():
    licensed = _price_item("RunInstances:0g00", "0.1200000000")
    plain = _price_item("RunInstances", "0.0832000000")
    assert on_demand_hourly_usd([licensed, plain]) == pytest.approx(0.0832)
    assert on_demand_hourly_usd([_price_item("RunInstances", "0.0000000000")]) is None
    assert on_demand_hourly_usd(["not json", {}]) is None


def test_packaged_price_table_is_dated_and_covers_common_types():
    table = packaged_prices()
    assert table["date"] and "us-east-1" in table["source"] and "on-demand" in table["source"].lower()
    prices = table["prices"]
    assert len(prices) >= 40
    for t in ("t3.large", "m7i.xlarge", "c7i.4xlarge", "r7i.2xlarge", "g5.xlarge", "p3.2xlarge"):
        assert prices[t] > 0
    assert all(isinstance(v, float) and 0 < v < 100 for v in prices.values())


# -- errors -----------------------------------------------------------------------------------


def test_missing_credentials(aws, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AwsCredentialsError) as err:
        provider().find("box")
    assert "aws configure" in str(err.value) and "AWS_PROFILE" in str(err.value)
    assert isinstance(err.value, RemoteMagicError)


def test_unknown_profile(aws):
    with pytest.raises(AwsCredentialsError, match="nosuchprofile"):
        provider(profile="nosuchprofile").find("box")


def test_no_region(aws, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(AwsRegionError) as err:
        provider().status()
    assert "`region` option" in str(err.value) and "AWS_DEFAULT_REGION" in str(err.value)


def test_unknown_instance_type_suggests_close_matches(ec2):
    with pytest.raises(UnknownInstanceTypeError) as err:
        provider().start("box", instance_type="t3.lrge", progress=False)
    assert "t3.large" in err.value.suggestions
    assert "'t3.lrge' does not exist in region us-east-1" in str(err.value)
    assert "t3.large" in str(err.value)
    assert provider().status() == []


def test_missing_ami(ec2):
    p = provider()
    with pytest.raises(AmiNotFoundError) as err:
        p.start("box", ami="ami-0123456789abcdef0", progress=False)
    assert str(err.value) == "AMI ami-0123456789abcdef0 does not exist in region us-east-1"
    with pytest.raises(AmiNotFoundError, match="aliases"):
        p.start("box", ami="gentoo", progress=False)
    # the real default (Canonical's public parameter) is missing in moto: a clear error, not a crash
    with pytest.raises(AmiNotFoundError, match="canonical/ubuntu/server/24.04"):
        Ec2Provider(public_ip_lookup=lambda: CALLER_IP).start("box", progress=False)
    assert p.status() == []
    assert not ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["remotemagic-box"]}])[
        "SecurityGroups"]


def test_instances_not_ours_are_refused(ec2):
    foreign = ec2.run_instances(
        ImageId=al2023_ami(), MinCount=1, MaxCount=1, InstanceType="t3.micro",
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "precious"}]}],
    )["Instances"][0]["InstanceId"]
    p = provider()
    assert p.find("precious") is None
    assert p.status() == []
    with pytest.raises(NotOursError, match="not created by remotemagic"):
        p.stop("precious")
    with pytest.raises(NotOursError, match=foreign):
        p.terminate(foreign)
    with pytest.raises(NotOursError):
        p.stop(foreign)
    with pytest.raises(NotOursError):
        p.resize("precious", "t3.large")
    assert describe(ec2, foreign)["State"]["Name"] == "running"
    assert describe(ec2, foreign)["InstanceType"] == "t3.micro"

    # a security group squatting on our name is not taken over either
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    ec2.create_security_group(GroupName="remotemagic-squat", Description="someone else's", VpcId=vpc)
    with pytest.raises(NotOursError, match="security group remotemagic-squat"):
        p.start("squat", progress=False)


def test_ambiguous_name(ec2):
    tags = [{"Key": "created-by", "Value": "remotemagic"}, {"Key": "remotemagic:name", "Value": "twin"}]
    ids = [
        ec2.run_instances(ImageId=al2023_ami(), MinCount=1, MaxCount=1, InstanceType="t3.micro",
                          TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])["Instances"][0]["InstanceId"]
        for _ in range(2)
    ]
    p = provider()
    with pytest.raises(AmbiguousInstanceError) as err:
        p.find("twin")
    assert all(i in str(err.value) for i in ids)
    with pytest.raises(AmbiguousInstanceError):
        p.stop("twin")
    p.terminate(ids[0], wait=True, progress=False)  # by id still works, and resolves it
    assert p.find("twin").instance_id == ids[1]


def test_bad_arguments_are_refused_before_aws_is_called():
    with pytest.raises(ValueError, match="idle_stop_minutes"):
        Ec2Provider(idle_stop_minutes=-1)
    with pytest.raises(ValueError, match="ssh_cidrs"):
        Ec2Provider(ssh_cidrs=["not-an-address"])
    with pytest.raises(ValueError, match="instance name"):
        Ec2Provider().find("../etc")


# -- waiting, host keys, instance connect -----------------------------------------------------


def test_wait_ssh_tcp_loop():
    p = Ec2Provider()
    p.poll_interval = 0.05
    with socket.create_server(("127.0.0.1", 0)) as srv:
        p.wait_ssh("127.0.0.1", srv.getsockname()[1], timeout=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError, match="did not open"):
        p.wait_ssh("127.0.0.1", closed_port, timeout=0.3, progress=False)
    assert time.monotonic() - started < 3


def test_learn_host_key_times_out_on_a_console_without_keys(ec2, tmp_path):
    p = provider()
    info = p.start("keys", progress=False)
    with pytest.raises(HostKeyError, match=info.instance_id):
        p.learn_host_key(info.instance_id, tmp_path / "known_hosts", info.host, timeout=0.2, progress=False)
    assert not (tmp_path / "known_hosts").exists()


def test_send_ephemeral_key(ec2):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " remotemagic-test"
    p = provider()
    info = p.start("eic", progress=False)
    assert p.send_ephemeral_key(info.instance_id, info.user, pub, info.availability_zone) is True


def _public_keys() -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    enc, fmt = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    return {
        "ecdsa": ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(enc, fmt).decode(),
        "ed25519": ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(enc, fmt).decode(),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(enc, fmt)
        .decode(),
    }


CONSOLE_TEMPLATE = """\
[    0.000000] Linux version 6.8.0-1012-aws (buildd@lcy02-amd64-072) (x86_64-linux-gnu-gcc-13 (Ubuntu 13.2.0-23ubuntu4) 13.2.0) #13-Ubuntu SMP Mon Jul 15 13:40:27 UTC 2024 (Ubuntu 6.8.0-1012.13-aws 6.8.12)
[    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-1012-aws root=PARTUUID=1f0e1a7b-01 ro console=tty1 console=ttyS0 nvme_core.io_timeout=4294967295 panic=-1
[   12.802211] cloud-init[596]: Cloud-init v. 24.1.3-0ubuntu3.3 running 'init' at Tue, 06 Aug 2024 09:14:02 +0000. Up 12.71 seconds.
[   13.404455] cloud-init[596]: Generating public/private ed25519 key pair.
[   13.409811] cloud-init[596]: The key fingerprint is:
[   13.410066] cloud-init[596]: SHA256:3Wq5xqz0Zq8f0g6w2mJx6bXG5U7pQ4sQmNnq1v0Xx9M root@ip-172-31-22-17
<14>Aug  6 09:14:06 cloud-init: #############################################################
<14>Aug  6 09:14:06 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----
<14>Aug  6 09:14:06 cloud-init: 256 SHA256:Xn1bK2tL1b0Y5fF6oO0c8r4Uq0yJ1zH9g3p2y5dS6aE root@ip-172-31-22-17 (ECDSA)
<14>Aug  6 09:14:06 cloud-init: 256 SHA256:3Wq5xqz0Zq8f0g6w2mJx6bXG5U7pQ4sQmNnq1v0Xx9M root@ip-172-31-22-17 (ED25519)
<14>Aug  6 09:14:06 cloud-init: 3072 SHA256:k7b0Rk2JpTnQ3y0b8cX1vW4zE6fH9gL2mN5pQ8sT1uV root@ip-172-31-22-17 (RSA)
<14>Aug  6 09:14:06 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----
<14>Aug  6 09:14:06 cloud-init: #############################################################
-----BEGIN SSH HOST KEY KEYS-----\r
{ecdsa} root@ip-172-31-22-17\r
[   15.118021] audit: type=1400 audit(1722935647.120:121): apparmor="STATUS" operation="profile_load" name="ssh-rsa AAAAinterleaved" pid=812\r
{ed25519} root@ip-172-31-22-17\r
{rsa} root@ip-172-31-22-17\r
-----END SSH HOST KEY KEYS-----\r
[   15.903312] cloud-init[921]: Cloud-init v. 24.1.3-0ubuntu3.3 finished at Tue, 06 Aug 2024 09:14:07 +0000. Datasource DataSourceEc2Local.  Up 15.89 seconds
"""  # noqa: E501 (a console captured as it is: its lines are as long as the kernel printed them)


def test_host_keys_from_a_realistic_cloud_init_console():
    keys = _public_keys()
    console = CONSOLE_TEMPLATE.format(**keys)
    found = host_keys_from_console(console)
    assert found == [keys["ecdsa"], keys["ed25519"], keys["rsa"]]

    # the last complete block wins (a later boot printed newer keys); a truncated block does not count
    newer = _public_keys()
    two_boots = (console + "\n-----BEGIN SSH HOST KEY KEYS-----\n" + newer["ed25519"]
                 + " root@x\n-----END SSH HOST KEY KEYS-----\n")
    assert host_keys_from_console(two_boots) == [newer["ed25519"]]
    assert host_keys_from_console(console.split("-----END SSH HOST KEY KEYS-----")[0]) == []
    assert host_keys_from_console("") == []
    # a key whose blob does not match its type is dropped
    bogus_rsa = "ssh-rsa " + keys["ed25519"].split()[1]
    assert host_keys_from_console(f"-----BEGIN SSH HOST KEY KEYS-----\n{bogus_rsa}\n"
                                  "-----END SSH HOST KEY KEYS-----") == []


def _hashed(host: str) -> str:
    salt = os.urandom(20)
    mac = hmac.new(salt, host.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()}"


def test_record_known_hosts_replaces_the_address_atomically(tmp_path):
    keys = _public_keys()
    path = tmp_path / "ssh" / "known_hosts"
    path.parent.mkdir()
    old_key = _public_keys()["ed25519"]
    path.write_text(
        f"github.com {old_key}\n"
        f"54.1.2.3 {old_key}\n"
        f"{_hashed('54.1.2.3')} {old_key}\n"
        f"54.1.2.30,other {old_key}\n"
        f"[54.1.2.3]:2222 {old_key}\n"
        f"old-name,54.1.2.3 {old_key}\n"
        f"i-0abc {old_key}\n"
    )
    record_known_hosts(path, ["54.1.2.3", "i-0abc"], [keys["ed25519"], keys["rsa"]])
    lines = path.read_text().splitlines()
    assert lines == [
        f"github.com {old_key}",
        f"54.1.2.30,other {old_key}",
        f"[54.1.2.3]:2222 {old_key}",
        f"old-name {old_key}",
        f"54.1.2.3 {keys['ed25519']}",
        f"54.1.2.3 {keys['rsa']}",
        f"i-0abc {keys['ed25519']}",
        f"i-0abc {keys['rsa']}",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name != "known_hosts"]  # no temporary left behind

    fresh = tmp_path / "new" / "known_hosts"
    record_known_hosts(fresh, "10.0.0.5", [keys["ecdsa"]], port=2222)
    assert fresh.read_text() == f"[10.0.0.5]:2222 {keys['ecdsa']}\n"
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
    with pytest.raises(HostKeyError):
        record_known_hosts(fresh, "10.0.0.5", [])
    with pytest.raises(ValueError):
        record_known_hosts(fresh, "a b", [keys["ecdsa"]])


def test_login_user_from_image():
    noble = {"Name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20240801"}
    assert login_user_for_image(noble) == "ubuntu"
    assert login_user_for_image({"Name": "al2023-ami-2023.5.20240805.0-kernel-6.1-x86_64",
                                 "Description": "Amazon Linux 2023 AMI"}) == "ec2-user"
    assert login_user_for_image({"Name": "debian-12-amd64-20240717-1811"}) == "admin"
    assert login_user_for_image({"Name": "my-golden-image"}) == "ubuntu"


# -- idle auto-stop user-data -----------------------------------------------------------------

needs_bash = pytest.mark.skipif(BASH is None, reason="bash not installed")


def _embedded_check(user_data: str) -> str:
    start = user_data.index("<<'REMOTEMAGIC_IDLE_CHECK_EOF'\n") + len("<<'REMOTEMAGIC_IDLE_CHECK_EOF'\n")
    return user_data[start:user_data.index("REMOTEMAGIC_IDLE_CHECK_EOF\n", start)]


def test_idle_stop_user_data_content():
    ud = idle_stop_user_data(45, "ubuntu")
    assert ud.startswith("#!/bin/bash\n")
    assert "IDLE_MINUTES=45\nRM_USER=ubuntu\n" in ud
    assert "OnUnitActiveSec=1min" in ud and "systemctl enable --now remotemagic-idle.timer" in ud
    assert "/etc/cron.d/remotemagic-idle" in ud  # fallback without systemd
    assert _embedded_check(ud) == idle_check_script()
    check = idle_check_script()
    assert "shutdown -h now" in check
    assert '"$RM_ROOT/activity"' in check and 'WHO_CMD="${WHO_CMD:-who}"' in check
    assert '"$RM_ROOT"/sessions/*/current' in check
    assert len(ud.encode()) < 16 * 1024  # EC2's user-data limit
    assert "IDLE_MINUTES=0" in idle_stop_user_data(0, "ec2-user")
    with pytest.raises(ValueError):
        idle_stop_user_data(-5, "ubuntu")
    with pytest.raises(ValueError):
        idle_stop_user_data(10, "ubuntu; rm -rf /")


@needs_bash
def test_idle_stop_user_data_is_valid_bash(tmp_path):
    for text in (idle_stop_user_data(60, "ubuntu"), idle_stop_user_data(0, "ec2-user"), idle_check_script()):
        script = tmp_path / "ud.sh"
        script.write_text(text)
        res = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_idle_check_script_is_package_data_and_passes_shellcheck(tmp_path):
    from importlib import resources

    packaged = resources.files("remotemagic.providers.ec2").joinpath("idle_check.sh").read_text(encoding="utf-8")
    assert packaged == idle_check_script() and packaged.startswith("#!/bin/bash\n")
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    user_data = tmp_path / "user-data.sh"
    user_data.write_text(idle_stop_user_data(60, "ubuntu"))
    files = resources.as_file(resources.files("remotemagic.providers.ec2").joinpath("idle_check.sh"))
    with files as check:
        res = subprocess.run([shellcheck, "--shell=bash", str(check), str(user_data)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_bash
def test_idle_check_logic_in_bash(tmp_path):
    check = tmp_path / "remotemagic-idle-check"
    check.write_text(_embedded_check(idle_stop_user_data(60, "ubuntu")))
    root = tmp_path / "rm"
    (root / "sessions" / "nb").mkdir(parents=True)
    marker = tmp_path / "shutdown-called"
    fake_shutdown = tmp_path / "fake-shutdown"
    fake_shutdown.write_text(f"#!/bin/bash\necho \"$@\" >> {marker}\n")
    fake_shutdown.chmod(0o755)
    conf = tmp_path / "idle.conf"
    boot = int(time.time()) - 600

    def run(now: int, minutes: int = 60, **env: str) -> str:
        conf.write_text(f"IDLE_MINUTES={minutes}\nRM_USER=ubuntu\n")
        full = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REMOTEMAGIC_IDLE_CONF": str(conf),
            "RM_ROOT": str(root), "STATE_FILE": str(tmp_path / "idle-since"), "NOW": str(now),
            "BOOT_TIME": str(boot), "CHECK_LOGINS": "0", "SHUTDOWN_CMD": str(fake_shutdown), **env,
        }
        res = subprocess.run([BASH, str(check)], env=full, capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    t0 = int(time.time())
    assert run(t0) == f"idle since {t0}"
    assert run(t0 + 30 * 60) == "idle for 30 of 60 minutes"
    assert not marker.exists()
    assert run(t0 + 61 * 60).startswith("idle for 61 minutes: shutting down")
    assert marker.exists()

    # a running job (sessions/*/current written since boot) resets the idle clock
    marker.unlink()
    current = root / "sessions" / "nb" / "current"
    current.write_text("20260101-120000-123-ab12")
    assert run(t0 + 120 * 60) == "busy"
    assert not (tmp_path / "idle-since").exists()
    # ... but one left over from before the last boot is stale
    os.utime(current, (boot - 100, boot - 100))
    assert run(t0 + 121 * 60) == f"idle since {t0 + 121 * 60}"
    current.unlink()

    # someone logged in on a terminal counts as busy; an open remotemagic connection does not
    fake_who = tmp_path / "fake-who"
    fake_who.write_text("#!/bin/bash\necho 'ubuntu   pts/0        2026-01-01 12:00 (203.0.113.7)'\n")
    fake_who.chmod(0o755)
    no_who = tmp_path / "no-who"
    no_who.write_text("#!/bin/bash\nexit 0\n")
    no_who.chmod(0o755)
    assert run(t0 + 200 * 60, CHECK_LOGINS="1", WHO_CMD=str(fake_who)) == "busy"
    assert run(t0 + 201 * 60, CHECK_LOGINS="1", WHO_CMD=str(no_who)).startswith("idle since")
    assert run(t0 + 300 * 60, CHECK_LOGINS="1", WHO_CMD=str(no_who)).startswith("idle for 99 minutes: shutting down")
    assert marker.exists()

    # a client's request (the agent touches $RM_ROOT/activity) restarts the idle clock
    marker.unlink()
    (tmp_path / "idle-since").unlink()
    t1 = t0 + 400 * 60
    assert run(t1) == f"idle since {t1}"
    activity = root / "activity"
    activity.touch()
    os.utime(activity, (t1 + 50 * 60, t1 + 50 * 60))
    assert run(t1 + 70 * 60) == "idle for 20 of 60 minutes"
    assert not marker.exists()
    assert run(t1 + 111 * 60).startswith("idle for 61 minutes: shutting down")
    assert marker.exists()
    # ... an activity file from before the last boot does not count
    (tmp_path / "idle-since").unlink()
    os.utime(activity, (boot - 100, boot - 100))
    assert run(t1 + 200 * 60) == f"idle since {t1 + 200 * 60}"

    # 0 disables it, whatever the clock says
    marker.unlink()
    assert run(t0 + 900 * 60, minutes=0) == "disabled"
    assert not marker.exists()
