"""What an instance costs: the AWS Pricing API, spot price history, the packaged price table."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
from collections.abc import Iterable
from importlib import resources
from typing import Any

from .client import Ec2Client
from .errors import UnknownInstanceTypeError, _aws_errors

log = logging.getLogger(__name__)


def on_demand_hourly_usd(price_list: Iterable[str | dict[str, Any]]) -> float | None:
    """The on-demand USD per hour in a Pricing API ``GetProducts`` ``PriceList`` (JSON strings).

    Prefers the plain ``RunInstances`` operation (no licensed software) when several products
    match; None when no positive hourly price is there.
    """
    found: list[tuple[int, float]] = []
    for item in price_list:
        try:
            product = json.loads(item) if isinstance(item, str) else item
        except ValueError:
            continue
        attrs = (product.get("product") or {}).get("attributes") or {}
        rank = 0 if attrs.get("operation", "RunInstances") == "RunInstances" else 1
        for term in ((product.get("terms") or {}).get("OnDemand") or {}).values():
            for dim in (term.get("priceDimensions") or {}).values():
                if str(dim.get("unit", "Hrs")).lower() not in ("hrs", "hours", "hour"):
                    continue
                try:
                    usd = float((dim.get("pricePerUnit") or {}).get("USD", "0"))
                except ValueError:
                    continue
                if usd > 0:
                    found.append((rank, usd))
    return min(found)[1] if found else None


@functools.lru_cache(maxsize=1)
def packaged_prices() -> dict[str, Any]:
    """The packaged fallback price table (``prices.json``): source, date and $/h per type."""
    text = resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8")
    return json.loads(text)



class Pricing(Ec2Client):
    """$ per hour of an instance type, and the cheapest bigger type (a part of the provider)."""

    # -- cost ---------------------------------------------------------------------------------

    def _pricing_client(self) -> Any:
        from botocore.config import Config

        cfg = Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=self.pricing_timeout,
                     read_timeout=self.pricing_timeout, user_agent_extra="remotemagic")
        return self._client("pricing", region="us-east-1", config=cfg)

    def _pricing_api_price(self, instance_type: str, region: str) -> float | None:
        """On-demand Linux $/h from the AWS Pricing API, or None when it does not answer."""
        if self._pricing_unavailable:
            return None
        from botocore import exceptions as bx

        filters = [
            ("instanceType", instance_type), ("regionCode", region), ("operatingSystem", "Linux"),
            ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"),
        ]
        try:
            resp = self._pricing_client().get_products(
                ServiceCode="AmazonEC2", MaxResults=10,
                Filters=[{"Type": "TERM_MATCH", "Field": f, "Value": v} for f, v in filters],
            )
        except (bx.BotoCoreError, bx.ClientError) as exc:
            self._pricing_unavailable = True
            log.debug("AWS Pricing API unavailable, using the packaged price table: %s", exc)
            return None
        return on_demand_hourly_usd(resp.get("PriceList", []))

    def _spot_price(self, instance_type: str, az: str | None) -> float | None:
        from botocore import exceptions as bx

        kwargs: dict[str, Any] = {
            "InstanceTypes": [instance_type], "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            "StartTime": _dt.datetime.now(_dt.timezone.utc), "MaxResults": 10,
        }
        if az:
            kwargs["AvailabilityZone"] = az
        try:
            hist = self.ec2.describe_spot_price_history(**kwargs).get("SpotPriceHistory", [])
        except (bx.BotoCoreError, bx.ClientError) as exc:
            log.debug("spot price history unavailable: %s", exc)
            return None
        prices = [float(h["SpotPrice"]) for h in hist if h.get("SpotPrice")]
        return max(prices) if prices else None

    @_aws_errors
    def hourly_price(self, instance_type: str, lifecycle: str = "on-demand",
                     availability_zone: str | None = None) -> tuple[float | None, str]:
        """``(USD per hour, source)`` for the type: spot history, Pricing API, else the packaged table."""
        if lifecycle == "spot":
            p = self._spot_price(instance_type, availability_zone)
            if p is not None:
                return p, "spot price history"
        region = self._region_if_known() or "us-east-1"
        key = (region, instance_type)
        if key not in self._price_cache:
            self._price_cache[key] = self._pricing_api_price(instance_type, region)
        if self._price_cache[key] is not None:
            return self._price_cache[key], "AWS Pricing API (on-demand)"
        table = packaged_prices()
        p = table["prices"].get(instance_type)
        if p is None:
            return None, "unknown"
        src = f"packaged table ({table['date']}, us-east-1 on-demand)"
        if region != "us-east-1":
            src += f", approximate for {region}"
        if lifecycle == "spot":
            src += ", on-demand price as spot upper bound"
        return float(p), src


    @_aws_errors
    def larger_memory_type(self, instance_type: str, peak_bytes: int) -> dict[str, Any] | None:
        """The cheapest type of the packaged price table with the same architecture and at least
        twice the memory of ``instance_type`` (and 1.5x ``peak_bytes``): ``{"type", "memory_gib",
        "price", "current_price"}`` (on-demand $/h), or None if there is none. For the advice
        after a worker was killed near the machine's memory (see :mod:`remotemagic.retry`)."""
        current = self.instance_type_info(instance_type)
        cur_mib = int((current.get("MemoryInfo") or {}).get("SizeInMiB") or 0)
        arch = self.architecture(instance_type)
        need = max(2 * cur_mib, int(1.5 * peak_bytes / 1024**2))
        best: tuple[float, str, int] | None = None
        for name in sorted(packaged_prices()["prices"]):
            try:
                info = self.instance_type_info(name)
            except UnknownInstanceTypeError:
                continue
            mib = int((info.get("MemoryInfo") or {}).get("SizeInMiB") or 0)
            if mib < need or self.architecture(name) != arch:
                continue
            price, _ = self.hourly_price(name)
            if price is not None and (best is None or price < best[0]):
                best = (price, name, mib)
        if best is None:
            return None
        current_price, _ = self.hourly_price(instance_type)
        return {"type": best[1], "memory_gib": best[2] / 1024, "price": best[0], "current_price": current_price}
