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
