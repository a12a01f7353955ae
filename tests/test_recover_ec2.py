"""Issue 15 on EC2 (moto server on 127.0.0.1): the out-of-memory advice with a bigger type and its $/h."""

from __future__ import annotations

import re

import boto3
import pytest

from remotemagic import retry
from remotemagic.agent.recover import size

from .test_ec2_provider import REGION, aws, moto_url, provider  # noqa: F401 (fixtures)

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
