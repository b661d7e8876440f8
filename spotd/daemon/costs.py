"""Prices for a job's history: each session's spot price history and on-demand price, looked up through a
:class:`~spotd.aws.pricing.PriceBook` (``spotd history`` and the daemon's job metrics both use this)."""

from __future__ import annotations

import asyncio

from spotd.aws.pricing import PriceBook, PriceSettings
from spotd.config import Config
from spotd.errors import AwsError
from spotd.events import region_of_zone
from spotd.logs import get_logger
from spotd.store.history import JobHistory, SessionPrices, with_costs

__all__ = ["price_history", "price_settings"]

log = get_logger("spotd.costs")


def price_settings(
    cfg: Config, *, request_attempts: int = 6, connect_timeout_s: float = 5.0
) -> PriceSettings:
    return PriceSettings(
        on_demand_hourly=cfg.cost.on_demand_hourly,
        pricing_endpoint_url=cfg.cost.pricing_endpoint_url,
        ec2_endpoint_url=cfg.ec2.endpoint_url,
        ec2_region=cfg.ec2.region,
        request_attempts=request_attempts,
        connect_timeout_s=connect_timeout_s,
    )


async def price_history(history: JobHistory, book: PriceBook) -> JobHistory:
    """``history`` with costs; a price that cannot be looked up leaves that session (and the totals) unpriced
    and says why in ``pricing_errors``."""
    errors: list[str] = []

    async def one(session_name: str) -> tuple[str, SessionPrices | None]:
        s = next(x for x in history.sessions if x.session == session_name)
        inst = s.instance
        region = s.region or region_of_zone(inst.availability_zone)
        if "unknown" in (inst.instance_type, inst.availability_zone):
            errors.append(f"{s.session}: instance type or zone unknown, so no price")
            return s.session, None
        try:
            on_demand = await book.on_demand_hourly(instance_type=inst.instance_type, region=region)
            spot = None
            if inst.life_cycle != "on-demand":
                points = await book.spot_prices(
                    region=region,
                    instance_type=inst.instance_type,
                    availability_zone=inst.availability_zone,
                    start=s.started_at,
                    end=s.ended_at,
                )
                if not points:
                    errors.append(
                        f"{s.session}: EC2 has no spot price history for {inst.instance_type} in "
                        f"{inst.availability_zone}"
                    )
                    return s.session, None
                spot = tuple((p.at, p.usd_per_hour) for p in points)
        except AwsError as exc:
            errors.append(f"{s.session}: {exc}")
            return s.session, None
        if on_demand is None:
            errors.append(
                f"{s.session}: the Price List has no on-demand price for {inst.instance_type} in {region}"
            )
        return s.session, SessionPrices(spot=spot, on_demand_hourly=on_demand)

    found = await asyncio.gather(*(one(s.session) for s in history.sessions))
    prices = {name: p for name, p in found if p is not None}
    for error in errors:
        log.warning("costs.unpriced", error=error)
    return with_costs(history, prices, errors=errors)
