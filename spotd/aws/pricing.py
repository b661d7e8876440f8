"""What an hour of an instance costs: on demand from the AWS Price List API (``pricing:GetProducts``, with
``[cost] on_demand_hourly`` as an override), on spot from EC2's price history (:mod:`spotd.aws.ec2`).

:class:`PriceBook` is what ``spotd history`` and the daemon's job metrics ask; it remembers every answer,
so a history of many sessions of one instance type costs one Price List call and one price history call
per session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

import botocore.exceptions

from spotd.aws.ec2 import Ec2, SpotPrice
from spotd.aws.session import ClientSettings, error_code, pricing_client
from spotd.errors import AwsError
from spotd.logs import get_logger

__all__ = ["LINUX_FILTERS", "PriceBook", "PriceSettings", "on_demand_from_price_list"]

log = get_logger("spotd.aws")

T = TypeVar("T")

#: A shared-tenancy Linux instance without pre-installed software, as the Price List names it.
LINUX_FILTERS: Final = {
    "operatingSystem": "Linux",
    "tenancy": "Shared",
    "preInstalledSw": "NA",
    "capacitystatus": "Used",
    "licenseModel": "No License required",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceSettings:
    """Where prices come from: ``[cost]`` and ``[ec2]`` of the config."""

    on_demand_hourly: float = 0.0  # > 0: use it, never ask the Price List API
    pricing_endpoint_url: str = ""
    ec2_endpoint_url: str = ""
    ec2_region: str = ""  # "" : each session's own region
    #: Tries of one request; the daemon asks again at its next refresh anyway, so it needs few.
    request_attempts: int = 6
    connect_timeout_s: float = 5.0


def on_demand_from_price_list(price_list: list[str]) -> float | None:
    """The hourly USD price in a GetProducts ``PriceList`` (one JSON document per product); None if none.

    Each document holds ``terms.OnDemand.<offer>.priceDimensions.<rate>.pricePerUnit.USD``; an offer with
    several dimensions (rare for EC2) gives its hourly one."""
    for doc in price_list:
        product = json.loads(doc) if isinstance(doc, str) else doc
        for offer in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in offer.get("priceDimensions", {}).values():
                if dimension.get("unit", "Hrs") not in ("Hrs", "Hours"):
                    continue
                usd = dimension.get("pricePerUnit", {}).get("USD")
                try:
                    value = float(usd)
                except (TypeError, ValueError):
                    continue
                if value > 0:
                    return value
    return None


class PriceBook:
    """Spot and on-demand prices, asked once each and remembered. ``close()`` when done."""

    __slots__ = ("_ec2", "_executor", "_lock", "_on_demand", "_pricing", "_settings", "_spot")

    def __init__(
        self, *, settings: PriceSettings, executor: concurrent.futures.Executor | None = None
    ) -> None:
        self._settings = settings
        self._executor = executor
        self._ec2: dict[str, Ec2] = {}
        self._pricing: Any = None
        self._lock = threading.Lock()
        self._on_demand: dict[tuple[str, str], float | None] = {}
        self._spot: dict[tuple[str, str, datetime, datetime], list[SpotPrice]] = {}

    def ec2(self, region: str) -> Ec2:
        """The EC2 calls for ``region`` ([ec2] region wins when set)."""
        region = self._settings.ec2_region or region
        if region not in self._ec2:
            self._ec2[region] = Ec2(
                settings=ClientSettings(
                    endpoint_url=self._settings.ec2_endpoint_url,
                    region=region,
                    request_attempts=self._settings.request_attempts,
                    connect_timeout_s=self._settings.connect_timeout_s,
                    read_timeout_s=20.0,
                ),
                executor=self._executor,
            )
        return self._ec2[region]

    async def spot_prices(
        self, *, region: str, instance_type: str, availability_zone: str, start: datetime, end: datetime
    ) -> list[SpotPrice]:
        key = (instance_type, availability_zone, start, end)
        if key not in self._spot:
            self._spot[key] = await self.ec2(region).spot_prices(
                instance_type=instance_type, availability_zone=availability_zone, start=start, end=end
            )
        return self._spot[key]

    async def on_demand_hourly(self, *, instance_type: str, region: str) -> float | None:
        """USD per hour on demand: the override when set, else the Price List's; None when it has none."""
        if self._settings.on_demand_hourly > 0:
            return self._settings.on_demand_hourly
        key = (instance_type, region)
        if key not in self._on_demand:
            self._on_demand[key] = await self._price_list(instance_type, region)
        return self._on_demand[key]

    async def _price_list(self, instance_type: str, region: str) -> float | None:
        filters = [
            {"Type": "TERM_MATCH", "Field": field, "Value": value}
            for field, value in {"instanceType": instance_type, "regionCode": region, **LINUX_FILTERS}.items()
        ]

        def fetch() -> float | None:
            with self._lock:
                if self._pricing is None:
                    self._pricing = pricing_client(
                        ClientSettings(
                            endpoint_url=self._settings.pricing_endpoint_url,
                            request_attempts=self._settings.request_attempts,
                            connect_timeout_s=self._settings.connect_timeout_s,
                            read_timeout_s=20.0,
                        )
                    )
                client = self._pricing
            answer = client.get_products(ServiceCode="AmazonEC2", Filters=filters, MaxResults=10)
            return on_demand_from_price_list(answer.get("PriceList", []))

        try:
            price = await self._run(fetch)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            raise AwsError(
                f"Price List GetProducts for {instance_type} in {region} failed ({code or exc}); fix: grant "
                "pricing:GetProducts to the instance role, or set [cost] on_demand_hourly"
            ) from exc
        except (botocore.exceptions.BotoCoreError, OSError, ValueError) as exc:
            raise AwsError(
                f"Price List GetProducts for {instance_type} in {region} failed ({exc}); fix: check the "
                "network, or set [cost] on_demand_hourly"
            ) from exc
        if price is None:
            log.warning("pricing.not_found", instance_type=instance_type, region=region)
        return price

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def close(self) -> None:
        for ec2 in self._ec2.values():
            await ec2.close()
        self._ec2.clear()
        client, self._pricing = self._pricing, None
        if client is not None:
            await self._run(client.close)
