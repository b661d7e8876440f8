"""IMDS client: IMDSv2 tokens, bounded retries, strict parsing.

Transport trouble of any kind surfaces as :class:`ImdsUnavailable`; a body that cannot be parsed as
:class:`ImdsMalformed` (and is never acted on); 404 on a notice path is ``None`` — "no notice" is data.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import aiohttp

from spotd.errors import ImdsMalformed, ImdsUnavailable
from spotd.events import InstanceAction, InstanceIdentity, RebalanceRecommendation, ScheduledEvent, parse_time
from spotd.logs import get_logger
from spotd.metrics import Metrics

__all__ = ["MAX_BODY_BYTES", "ImdsClient"]

log = get_logger("spotd.imds")

TOKEN_HEADER: Final = "X-aws-ec2-metadata-token"
TTL_HEADER: Final = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_BODY_BYTES: Final = 64 * 1024
SPOT_ACTIONS: Final = frozenset({"terminate", "stop", "hibernate"})
#: Renew the token once this share of its TTL has passed, so a request never races its expiry.
_RENEW_AT: Final = 0.8
#: Backoff between attempts: full jitter on base * 2**n, capped, so a call stays near its bound.
_BACKOFF_BASE_S: Final = 0.05
_BACKOFF_CAP_S: Final = 0.5
#: After IMDS refuses tokens (403/404/405) use IMDSv1 for this long before probing for v2 again.
_V1_RECHECK_S: Final = 300.0
_V2_MISSING: Final = frozenset({403, 404, 405})


class _Transient(Exception):
    """One attempt failed in a way worth retrying (timeout, connection error, 5xx)."""


class ImdsClient:
    """Talks to IMDS at ``endpoint`` (``http://169.254.169.254`` or ``http://[fd00:ec2::254]``)."""

    __slots__ = (
        "_allow_v1",
        "_budget_s",
        "_clock",
        "_endpoint",
        "_last_ok",
        "_metrics",
        "_retries",
        "_session",
        "_timeout",
        "_timeout_s",
        "_token",
        "_token_lock",
        "_token_renew_at",
        "_token_ttl_s",
        "_up",
        "_v1_until",
    )

    def __init__(
        self,
        *,
        endpoint: str,
        timeout_s: float,
        token_ttl_s: int = 21600,
        allow_v1: bool = True,
        metrics: Metrics | None = None,
        retries: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0 (imds.timeout)")
        if not 1 <= token_ttl_s <= 21600:
            raise ValueError("token_ttl_s must be 1..21600 (imds.token_ttl)")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._endpoint = endpoint.rstrip("/")
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._token_ttl_s = token_ttl_s
        self._allow_v1 = allow_v1
        self._metrics = metrics
        self._retries = retries
        self._clock = clock
        # Every attempt may need a token PUT as well as the GET (plus one 401 re-try): the outer bound
        # covers the worst case so a dead IMDS costs a caller a known, small amount of time.
        self._budget_s = timeout_s * (retries + 2) + _BACKOFF_CAP_S * retries + 0.1
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._token_lock = asyncio.Lock()
        self._v1_until = float("-inf")
        self._up = False
        self._last_ok: float | None = None

    async def __aenter__(self) -> ImdsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def up(self) -> bool:
        """True while the last call got an answer from IMDS."""
        return self._up

    @property
    def last_ok(self) -> float | None:
        """``clock()`` of the last answer from IMDS (None before the first)."""
        return self._last_ok

    @property
    def budget_s(self) -> float:
        """The longest one call may take before it raises :class:`ImdsUnavailable`."""
        return self._budget_s

    # -- public calls ------------------------------------------------------------------------------------

    async def get(self, path: str, *, label: str) -> str | None:
        """The text at ``/latest/meta-data/<path>``; None on 404."""
        body = await self._fetch(path, label=label)
        if body is None:
            return None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise self._malformed(label, "the body is not UTF-8") from None

    async def instance_action(self) -> InstanceAction | None:
        label = "spot/instance-action"
        data = await self._get_json(label)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise self._malformed(label, f"expected a JSON object, got {type(data).__name__}")
        action, when = data.get("action"), data.get("time")
        if not isinstance(action, str) or action not in SPOT_ACTIONS:
            raise self._malformed(label, f"action {action!r} is not one of {sorted(SPOT_ACTIONS)}")
        return InstanceAction(action=action, time=self._time(label, when, "time"))

    async def rebalance(self) -> RebalanceRecommendation | None:
        label = "events/recommendations/rebalance"
        data = await self._get_json(label)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise self._malformed(label, f"expected a JSON object, got {type(data).__name__}")
        return RebalanceRecommendation(notice_time=self._time(label, data.get("noticeTime"), "noticeTime"))

    async def scheduled_events(self) -> list[ScheduledEvent]:
        label = "events/maintenance/scheduled"
        data = await self._get_json(label)
        if data is None:
            return []
        if not isinstance(data, list):
            raise self._malformed(label, f"expected a JSON list, got {type(data).__name__}")
        events: list[ScheduledEvent] = []
        for item in data:
            if not isinstance(item, dict):
                raise self._malformed(label, f"expected event objects, got {type(item).__name__}")
            code, event_id, state = item.get("Code"), item.get("EventId"), item.get("State")
            description = item.get("Description", "")
            if not all(isinstance(v, str) and v for v in (code, event_id, state)) or not isinstance(
                description, str
            ):
                raise self._malformed(label, "an event lacks a string Code, EventId or State")
            assert isinstance(code, str) and isinstance(event_id, str) and isinstance(state, str)
            raw_after = item.get("NotAfter")
            events.append(
                ScheduledEvent(
                    code=code,
                    event_id=event_id,
                    state=state,
                    not_before=self._time(label, item.get("NotBefore"), "NotBefore"),
                    not_after=None if raw_after in (None, "") else self._time(label, raw_after, "NotAfter"),
                    description=description,
                )
            )
        return events

    async def identity(self) -> InstanceIdentity:
        """Who this instance is; never raises: a field IMDS does not give is "unknown"."""
        paths = ("instance-id", "instance-type", "placement/availability-zone", "instance-life-cycle")
        answers = await asyncio.gather(*(self.get(p, label=p) for p in paths), return_exceptions=True)
        values = [
            a.strip() if isinstance(a, str) and a.strip() and len(a) < 256 else "unknown" for a in answers
        ]
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # cancellation is not ours to swallow
        return InstanceIdentity(
            instance_id=values[0], instance_type=values[1], availability_zone=values[2], life_cycle=values[3]
        )

    # -- parsing -----------------------------------------------------------------------------------------

    def _malformed(self, label: str, why: str) -> ImdsMalformed:
        if self._metrics is not None:
            self._metrics.imds_malformed.labels(path=label).inc()
        return ImdsMalformed(f"IMDS {label}: {why}; ignored (IMDS or a proxy in front of it is misbehaving)")

    def _time(self, label: str, value: Any, name: str) -> datetime:
        if not isinstance(value, str) or not value.strip():
            raise self._malformed(label, f"{name} is missing or not a string")
        try:
            return parse_time(value)
        except ValueError:
            raise self._malformed(label, f"{name} {value[:64]!r} is not a time") from None

    async def _get_json(self, label: str) -> Any:
        body = await self._fetch(label, label=label)
        if body is None:
            return None
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self._malformed(label, f"the body is not JSON: {body[:64]!r}") from None

    # -- transport ---------------------------------------------------------------------------------------

    def _count(self, label: str, code: str) -> None:
        if self._metrics is not None:
            self._metrics.imds_requests.labels(path=label, code=code).inc()

    def _set_up(self, up: bool) -> None:
        self._up = up
        if up:
            self._last_ok = self._clock()
        if self._metrics is not None:
            self._metrics.imds_up.set(1 if up else 0)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No proxies from the environment: IMDS is link-local and must be reached directly.
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        return self._session

    async def _send(self, method: str, url: str, *, label: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """One HTTP exchange; the body is read up to MAX_BODY_BYTES + 1 so a huge one is detected cheaply."""
        session = self._ensure_session()
        try:
            async with session.request(method, url, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                chunks: list[bytes] = []
                size = 0
                while size <= MAX_BODY_BYTES:
                    chunk = await resp.content.read(MAX_BODY_BYTES + 1 - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                body = b"".join(chunks)
        except TimeoutError as exc:
            self._count(label, "timeout")
            raise _Transient(f"{method} {label} timed out after {self._timeout_s}s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            self._count(label, "error")
            raise _Transient(f"{method} {label} failed: {exc.__class__.__name__}: {exc}") from exc
        self._count(label, str(status))
        return status, body

    def _unavailable(self, label: str, why: str) -> ImdsUnavailable:
        self._set_up(False)
        return ImdsUnavailable(
            f"IMDS {label} at {self._endpoint}: {why}; check imds.endpoint and that the instance metadata "
            f"service is enabled (http-endpoint=enabled, hop limit >= 2 in containers)"
        )

    async def _auth_headers(self) -> dict[str, str]:
        """Headers for a metadata GET: a cached IMDSv2 token, or none in IMDSv1 mode."""
        if self._clock() < self._v1_until:
            return {}
        async with self._token_lock:
            if self._token is not None and self._clock() < self._token_renew_at:
                return {TOKEN_HEADER: self._token}
            requested_at = self._clock()
            try:
                status, body = await self._send(
                    "PUT",
                    f"{self._endpoint}/latest/api/token",
                    label="token",
                    headers={TTL_HEADER: str(self._token_ttl_s)},
                )
            except _Transient as exc:
                if self._allow_v1 and isinstance(exc.__cause__, TimeoutError):
                    # Like the AWS SDKs: a token PUT that times out (hop limit 1 in a container drops
                    # it) falls back to IMDSv1 for this request; the next one tries a token again.
                    return {}
                raise
            if status in _V2_MISSING:
                if not self._allow_v1:
                    raise self._unavailable(
                        "token",
                        f"the IMDSv2 token PUT answered {status} and imds.allow_v1 is false; enable "
                        "IMDSv2 on the instance or set imds.allow_v1 = true",
                    )
                log.warning("imds.v1_fallback", status=status, recheck_s=_V1_RECHECK_S)
                self._v1_until = self._clock() + _V1_RECHECK_S
                return {}
            if status >= 500:
                raise _Transient(f"token PUT answered {status}")
            token = body.decode("utf-8", "replace").strip()
            if status != 200 or not token or len(body) > MAX_BODY_BYTES:
                raise self._unavailable("token", f"the token PUT answered {status} with {len(body)} bytes")
            self._token = token
            self._token_renew_at = requested_at + _RENEW_AT * self._token_ttl_s
            return {TOKEN_HEADER: token}

    def _drop_token(self) -> None:
        self._token = None
        self._token_renew_at = 0.0
        # A 401 in IMDSv1 mode means tokens are required now: stop using v1.
        self._v1_until = float("-inf")

    async def _fetch(self, path: str, *, label: str) -> bytes | None:
        try:
            async with asyncio.timeout(self._budget_s):
                return await self._fetch_with_retries(path, label=label)
        except TimeoutError:
            raise self._unavailable(label, f"no answer within {self._budget_s:.1f}s") from None

    async def _fetch_with_retries(self, path: str, *, label: str) -> bytes | None:
        url = f"{self._endpoint}/latest/meta-data/{path}"
        last = "no attempt made"
        attempts = self._retries + 1
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt)))
            try:
                status, body = await self._send("GET", url, label=label, headers=await self._auth_headers())
                if status == 401:
                    # The token expired early or IMDS restarted: one fresh token, one more try.
                    self._drop_token()
                    status, body = await self._send(
                        "GET", url, label=label, headers=await self._auth_headers()
                    )
            except _Transient as exc:
                last = str(exc)
                continue
            if status >= 500:
                last = f"GET {label} answered {status}"
                continue
            if status == 200:
                if len(body) > MAX_BODY_BYTES:
                    self._set_up(True)
                    raise self._malformed(label, f"the body is larger than {MAX_BODY_BYTES} bytes")
                self._set_up(True)
                return body
            if status == 404:
                self._set_up(True)
                return None
            if status == 401:
                raise self._unavailable(label, "a fresh IMDSv2 token was rejected (401)")
            raise self._unavailable(label, f"unexpected HTTP {status}")
        raise self._unavailable(label, f"{last} (after {attempts} attempts)")
