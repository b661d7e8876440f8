"""The one place spotd builds boto3 clients: retries, connection pool, timeouts, endpoint and region.

Retry budget: botocore retries every request itself (standard mode: connection errors, timeouts, throttling
and 5xx answers, with jittered exponential backoff) up to ``request_attempts`` tries in all, the first one
included. Code that calls a client does not retry a request again on top; retrying a whole operation (a
commit) belongs to whoever knows its deadline.

Imports boto3: import this module only where a client is really built (``import spotd.aws`` stays light).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import boto3
import botocore.config
import botocore.exceptions

from spotd.logs import get_logger

__all__ = [
    "DEFAULT_REQUEST_ATTEMPTS",
    "PRICING_REGIONS",
    "ClientSettings",
    "botocore_config",
    "ec2_client",
    "error_code",
    "pricing_client",
    "request_attempts_from_env",
    "s3_client",
    "tries_made",
]

log = get_logger("spotd.aws")

#: Tries of one request, the first included, unless AWS_MAX_ATTEMPTS says otherwise.
DEFAULT_REQUEST_ATTEMPTS: Final = 6


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    """What every spotd client is built with; empty strings leave boto3's own resolution in charge."""

    endpoint_url: str = ""  # S3-compatible servers and tests
    region: str = ""
    request_attempts: int = DEFAULT_REQUEST_ATTEMPTS
    max_pool_connections: int = 10
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0


def request_attempts_from_env(
    environ: Mapping[str, str] = os.environ, default: int = DEFAULT_REQUEST_ATTEMPTS
) -> int:
    """``AWS_MAX_ATTEMPTS`` (the AWS SDKs' knob: tries in all) when it is a positive integer, else
    ``default``. botocore reads it only when a Config names no attempts, and spotd always names them, so it
    is read here."""
    value = environ.get("AWS_MAX_ATTEMPTS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


def botocore_config(settings: ClientSettings, **service_options: Any) -> botocore.config.Config:
    """The Config of every spotd client; ``service_options`` adds a service's own (``s3={...}``)."""
    return botocore.config.Config(
        # total_max_attempts counts the first try too; the older max_attempts key counts only retries.
        retries={"mode": "standard", "total_max_attempts": settings.request_attempts},
        max_pool_connections=settings.max_pool_connections,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        user_agent_extra="spotd",
        **service_options,
    )


def s3_client(settings: ClientSettings) -> Any:
    """An S3 client. Path-style addressing with an endpoint_url (S3-compatible servers rarely resolve
    bucket subdomains); checksums only where S3 requires them, because spotd computes and sends its own
    from the one buffer it reads and botocore's defaults would hash every body a second time."""
    config = botocore_config(
        settings,
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url or None,
        region_name=settings.region or None,
        config=config,
    )
    client.meta.events.register("after-call.s3", _log_retries)
    return client


def ec2_client(settings: ClientSettings) -> Any:
    """An EC2 client (spot price history, spot requests, stop/terminate); ``region`` is the instance's."""
    client = boto3.session.Session().client(
        "ec2",
        endpoint_url=settings.endpoint_url or None,
        region_name=settings.region or None,
        config=botocore_config(settings),
    )
    client.meta.events.register("after-call.ec2", _log_retries)
    return client


#: The Price List API answers only in these regions, whatever region the instance is in.
PRICING_REGIONS: Final = ("us-east-1", "eu-central-1", "ap-south-1")


def pricing_client(settings: ClientSettings) -> Any:
    """A Price List (``pricing``) client; it lives in us-east-1 unless ``region`` names another of
    :data:`PRICING_REGIONS`."""
    region = settings.region if settings.region in PRICING_REGIONS else PRICING_REGIONS[0]
    client = boto3.session.Session().client(
        "pricing",
        endpoint_url=settings.endpoint_url or None,
        region_name=region,
        config=botocore_config(settings),
    )
    client.meta.events.register("after-call.pricing", _log_retries)
    return client


def _log_retries(*, parsed: Mapping[str, Any], model: Any, **_: Any) -> None:
    """botocore retries silently; a request that needed retries says so, for whoever wonders why an upload
    slowed down (throttling, a flaky network)."""
    meta = parsed.get("ResponseMetadata", {})
    retries = meta.get("RetryAttempts", 0)
    if retries:
        log.warning(
            "aws.request_retried",
            operation=model.name,
            retries=retries,
            status=meta.get("HTTPStatusCode"),
            error=parsed.get("Error", {}).get("Code", ""),
        )


def error_code(exc: BaseException) -> str:
    """The service's error code (``NoSuchKey``, ``SlowDown``…) of a ClientError; "" for anything else."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def tries_made(exc: BaseException, budget: int) -> int:
    """How many tries of a request botocore made before raising ``exc``: counted in the error response,
    else the whole budget for errors standard mode always retries (fewer only if its retry quota ran out
    under a broad outage), else one."""
    if isinstance(exc, botocore.exceptions.ClientError):
        retries = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
        return int(retries) + 1 if isinstance(retries, int) else 1
    if isinstance(exc, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError):
        return budget
    return 1
