"""EC2 for the job's end and its costs: spot price history, the spot request an instance belongs to,
cancelling it, and stopping or terminating the instance.

Every call is one boto3 request on an executor thread (never on the loop), retried by botocore alone
(:mod:`spotd.aws.session`); a failure becomes :class:`~spotd.errors.AwsError` naming the call, the IAM
action it needs and the fix. The client is built on first use, on the executor too: building one costs
about half a second of CPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import botocore.exceptions

from spotd.aws.session import ClientSettings, ec2_client, error_code
from spotd.errors import AwsError
from spotd.logs import get_logger

__all__ = ["LINUX", "Ec2", "SpotPrice", "SpotRequest"]

log = get_logger("spotd.aws")

T = TypeVar("T")

#: The product description of a Linux spot instance in a VPC, as DescribeSpotPriceHistory names it.
LINUX: Final = "Linux/UNIX"


@dataclass(frozen=True, slots=True)
class SpotPrice:
    """One entry of the spot price history: from ``at`` on, an hour of the instance costs ``usd_per_hour``."""

    at: datetime
    usd_per_hour: float


@dataclass(frozen=True, slots=True)
class SpotRequest:
    """The spot request an instance was launched for."""

    request_id: str
    state: str  # open | active | closed | cancelled | failed
    type: str  # one-time | persistent
    instance_id: str | None


class Ec2:
    """The EC2 calls spotd makes, for one region. ``close()`` when done."""

    __slots__ = ("_client", "_executor", "_lock", "_owns_executor", "_settings")

    def __init__(
        self, *, settings: ClientSettings, executor: concurrent.futures.Executor | None = None
    ) -> None:
        self._settings = settings
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="spotd-ec2"
        )
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def region(self) -> str:
        return self._settings.region

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = ec2_client(self._settings)
            return self._client

    async def _call(self, what: str, action: str, fn: Callable[[Any], T]) -> T:
        def run() -> T:
            return fn(self._get_client())

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            fix = (
                f"grant {action} to the instance role (docs/iam-policy.json)"
                if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
                else "check the region ([ec2] region) and the network"
            )
            raise AwsError(f"EC2 {what} failed ({code or exc}); fix: {fix}") from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise AwsError(
                f"EC2 {what}: no AWS credentials found; fix: attach an instance profile with "
                "docs/iam-policy.json"
            ) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise AwsError(
                f"EC2 {what} failed ({exc}); fix: check the network, [ec2] region and [ec2] endpoint_url"
            ) from exc

    async def spot_prices(
        self,
        *,
        instance_type: str,
        availability_zone: str,
        start: datetime,
        end: datetime,
        product: str = LINUX,
    ) -> list[SpotPrice]:
        """Prices in effect from ``start`` to ``end``, oldest first; EC2 includes the last change before
        ``start``, so the price at any moment is the newest entry at or before it."""

        def fetch(client: Any) -> list[SpotPrice]:
            out: list[SpotPrice] = []
            pages = client.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=[instance_type],
                ProductDescriptions=[product],
                Filters=[{"Name": "availability-zone", "Values": [availability_zone]}],
                StartTime=start,
                EndTime=end,
            )
            for page in pages:
                for entry in page.get("SpotPriceHistory", []):
                    # Another zone or product can only come from a server that ignores the filters.
                    if entry.get("AvailabilityZone", availability_zone) != availability_zone:
                        continue
                    at = entry["Timestamp"]
                    at = at if at.tzinfo else at.replace(tzinfo=UTC)
                    out.append(SpotPrice(at=at.astimezone(UTC), usd_per_hour=float(entry["SpotPrice"])))
            return sorted(set(out), key=lambda p: p.at)

        return await self._call(
            f"DescribeSpotPriceHistory for {instance_type} in {availability_zone}",
            "ec2:DescribeSpotPriceHistory",
            fetch,
        )

    async def spot_request_of(self, instance_id: str) -> SpotRequest | None:
        """The spot request ``instance_id`` was launched for; None for an instance without one.

        Found by the request's ``instance-id`` filter: DescribeInstances' SpotInstanceRequestId is not
        reliable everywhere (moto leaves it empty), the request's own record is."""

        def fetch(client: Any) -> SpotRequest | None:
            found = client.describe_spot_instance_requests(
                Filters=[{"Name": "instance-id", "Values": [instance_id]}]
            ).get("SpotInstanceRequests", [])
            if not found:
                return None
            r = found[0]
            return SpotRequest(
                request_id=r["SpotInstanceRequestId"],
                state=r.get("State", "unknown"),
                type=r.get("Type", "unknown"),
                instance_id=r.get("InstanceId"),
            )

        return await self._call(
            f"DescribeSpotInstanceRequests for {instance_id}", "ec2:DescribeSpotInstanceRequests", fetch
        )

    async def cancel_spot_request(self, request_id: str) -> str:
        """Cancel the request (its instances stay until terminated); returns the state EC2 reports."""

        def cancel(client: Any) -> str:
            answer = client.cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])
            states = answer.get("CancelledSpotInstanceRequests", [])
            return str(states[0].get("State", "cancelled")) if states else "cancelled"

        return await self._call(
            f"CancelSpotInstanceRequests {request_id}", "ec2:CancelSpotInstanceRequests", cancel
        )

    async def terminate(self, instance_id: str) -> str:
        """Terminate the instance; returns its new state (``shutting-down``)."""

        def terminate(client: Any) -> str:
            answer = client.terminate_instances(InstanceIds=[instance_id])
            return str(answer["TerminatingInstances"][0]["CurrentState"]["Name"])

        return await self._call(f"TerminateInstances {instance_id}", "ec2:TerminateInstances", terminate)

    async def stop(self, instance_id: str) -> str:
        """Stop the instance (a persistent spot request with interruption behaviour stop allows it)."""

        def stop(client: Any) -> str:
            answer = client.stop_instances(InstanceIds=[instance_id])
            return str(answer["StoppingInstances"][0]["CurrentState"]["Name"])

        try:
            return await self._call(f"StopInstances {instance_id}", "ec2:StopInstances", stop)
        except AwsError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and error_code(cause) in (
                "UnsupportedOperation",
                "IncorrectSpotRequestState",
            ):
                raise AwsError(
                    f"EC2 cannot stop {instance_id} ({error_code(cause)}); fix: a spot instance stops only "
                    'under a persistent request with interruption behaviour "stop"; use on_complete = '
                    '"cancel-request" or "terminate"'
                ) from cause
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, client.close)
        if self._owns_executor:
            self._executor.shutdown(wait=False)
