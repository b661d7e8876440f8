"""EC2 and the Price List API through spotd.aws: moto's EC2 server mode and a loopback Price List server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from spotd.aws.ec2 import Ec2
from spotd.aws.pricing import PriceBook, PriceSettings, on_demand_from_price_list
from spotd.aws.session import ClientSettings
from spotd.errors import AwsError
from tests.fixtures.aws import Ec2 as MotoEc2
from tests.fixtures.aws import PriceList, product_document

NOW = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)


def ec2_of(moto: MotoEc2) -> Ec2:
    return Ec2(settings=ClientSettings(endpoint_url=moto.endpoint_url, region="us-east-1"))


async def test_spot_price_history_is_the_newest_at_or_before_the_session(ec2: MotoEc2) -> None:
    """DescribeSpotPriceHistory for the session's type, zone and hours gives moto's 2006 entry: the newest
    price at or before the session, so it is the one in effect."""
    client = ec2_of(ec2)
    try:
        prices = await client.spot_prices(
            instance_type="g5.2xlarge",
            availability_zone="us-east-1a",
            start=NOW,
            end=NOW + timedelta(hours=2),
        )
    finally:
        await client.close()
    assert len(prices) == 1
    (price,) = prices
    assert price.at.year == 2006 and price.at.tzinfo is not None and price.at <= NOW
    assert price.usd_per_hour == ec2.spot_price("g5.2xlarge", "us-east-1a")


async def test_the_spot_request_is_found_by_its_instance_then_cancelled_and_the_instance_terminated(
    ec2: MotoEc2,
) -> None:
    """moto leaves SpotInstanceRequestId empty on the instance; the request's instance-id filter finds it."""
    request_id, instance_id = ec2.spot_instance()
    described = ec2.client.describe_instances(InstanceIds=[instance_id])
    assert not described["Reservations"][0]["Instances"][0].get("SpotInstanceRequestId")
    client = ec2_of(ec2)
    try:
        found = await client.spot_request_of(instance_id)
        assert found is not None and found.request_id == request_id and found.type == "persistent"
        assert await client.spot_request_of("i-00000000000000000") is None
        assert await client.cancel_spot_request(request_id) == "cancelled"
        assert await client.terminate(instance_id) == "shutting-down"
    finally:
        await client.close()
    assert request_id not in ec2.request_states() or ec2.request_states()[request_id] == "cancelled"
    assert ec2.instance_state(instance_id) in ("shutting-down", "terminated")


async def test_a_failed_call_names_the_call_and_the_fix() -> None:
    """An EC2 endpoint that refuses connections becomes an AwsError naming the call and what to check."""
    client = Ec2(
        settings=ClientSettings(endpoint_url="http://127.0.0.1:9", region="us-east-1", request_attempts=1)
    )
    try:
        with pytest.raises(AwsError, match=r"TerminateInstances i-0abc failed .*fix: check the network"):
            await client.terminate("i-0abc")
    finally:
        await client.close()


async def test_on_demand_price_from_the_price_list_api(price_list: PriceList) -> None:
    """GetProducts with the instance type and region code gives the hourly USD price; asked once, remembered."""
    price_list.prices[("g5.2xlarge", "us-east-1")] = 1.212
    book = PriceBook(settings=PriceSettings(pricing_endpoint_url=price_list.endpoint_url))
    try:
        assert await book.on_demand_hourly(instance_type="g5.2xlarge", region="us-east-1") == 1.212
        assert await book.on_demand_hourly(instance_type="g5.2xlarge", region="us-east-1") == 1.212
        assert await book.on_demand_hourly(instance_type="g5.2xlarge", region="eu-west-1") is None
    finally:
        await book.close()
    assert len(price_list.requests) == 2
    fields = {f["Field"]: f["Value"] for f in price_list.requests[0]["Filters"]}
    assert price_list.requests[0]["ServiceCode"] == "AmazonEC2"
    assert fields["instanceType"] == "g5.2xlarge" and fields["regionCode"] == "us-east-1"
    assert fields["operatingSystem"] == "Linux" and fields["tenancy"] == "Shared"


async def test_the_override_wins_and_asks_nobody(price_list: PriceList) -> None:
    """[cost] on_demand_hourly set: the Price List API is not asked."""
    book = PriceBook(
        settings=PriceSettings(on_demand_hourly=2.5, pricing_endpoint_url=price_list.endpoint_url)
    )
    try:
        assert await book.on_demand_hourly(instance_type="g5.2xlarge", region="us-east-1") == 2.5
    finally:
        await book.close()
    assert price_list.requests == []


def test_price_list_documents_parse_as_strings_or_objects() -> None:
    """A PriceList entry is a JSON document (a string on the wire; botocore may hand it over parsed)."""
    import json

    doc = product_document("g5.2xlarge", "us-east-1", 1.212)
    assert on_demand_from_price_list([doc]) == 1.212
    assert on_demand_from_price_list([json.loads(doc)]) == 1.212
    assert on_demand_from_price_list([]) is None
