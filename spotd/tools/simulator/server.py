"""An IMDSv2 simulator: the real wire protocol on loopback, for tests, drills and the demo.

It answers like EC2's metadata service: ``PUT /latest/api/token`` with a TTL header, 401 for a missing,
bad or expired token (when tokens are required), 404 before a notice, JSON bodies as ``text/plain``.
Notices and faults are armed from Python (:class:`ImdsSimulator`, :class:`SimulatorThread`) or over a
small JSON control API under ``/_sim/``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from aiohttp import web

from spotd.events import region_of_zone

__all__ = ["FAULT_MODES", "HUGE_BODY_BYTES", "LIFE_CYCLES", "SPOT_ACTIONS", "ImdsSimulator"]

TOKEN_HEADER: Final = "X-aws-ec2-metadata-token"
TTL_HEADER: Final = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TTL_S: Final = 21600
#: Faults for metadata GETs; the same names prefixed ``token-`` hit the token PUT instead, and
#: ``token-403``/``token-404``/``token-405`` stand in for IMDS with IMDSv2 unavailable.
FAULT_MODES: Final = frozenset({"500", "503", "slow", "garbage", "huge", "reset"})
TOKEN_FAULT_MODES: Final = frozenset(
    {"token-403", "token-404", "token-405", "token-500", "token-503", "token-slow", "token-reset"}
)
HUGE_BODY_BYTES: Final = 1024 * 1024
SPOT_ACTIONS: Final = frozenset({"terminate", "stop", "hibernate"})
#: What ``instance-life-cycle`` answers on EC2.
LIFE_CYCLES: Final = frozenset({"spot", "on-demand", "scheduled"})

T = TypeVar("T")


def _rfc3339(epoch: float) -> str:
    # IMDS writes whole seconds: 2026-11-25T04:02:00Z
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _maintenance_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%d %b %Y %H:%M:%S GMT")


@dataclass(slots=True)
class _InstanceAction:
    action: str
    visible_at: float
    time: float
    moving: bool
    lead_s: float


@dataclass(slots=True)
class _Maintenance:
    code: str
    event_id: str
    state: str
    not_before: float
    description: str


class ImdsSimulator:
    """An aiohttp server that behaves like IMDSv2. All control methods run on the server's loop."""

    __slots__ = (
        "_clock",
        "_fault",
        "_fault_count",
        "_host",
        "_identity",
        "_instance_action",
        "_maintenance",
        "_notice_first_served_at",
        "_port",
        "_rebalance_at",
        "_requests",
        "_runner",
        "_statuses",
        "_tokens",
        "_tokens_issued",
        "require_token",
        "slow_s",
    )

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        require_token: bool = True,
        instance_id: str = "i-0123456789abcdef0",
        instance_type: str = "g5.2xlarge",
        availability_zone: str = "us-east-1a",
        life_cycle: str = "spot",
        clock: Callable[[], float] = time.time,
        slow_s: float = 3.0,
    ) -> None:
        self._host = host
        self._port = port
        self.require_token = require_token
        #: How long the "slow" fault holds a request: longer than any client timeout a test uses.
        self.slow_s = slow_s
        self._clock = clock
        self._identity: dict[str, str] = {}
        self.set_identity(
            instance_id=instance_id,
            instance_type=instance_type,
            availability_zone=availability_zone,
            life_cycle=life_cycle,
        )
        self._runner: web.AppRunner | None = None
        self._tokens: dict[str, float] = {}
        self._tokens_issued = 0
        self._requests: Counter[str] = Counter()
        self._statuses: Counter[str] = Counter()
        self._instance_action: _InstanceAction | None = None
        self._rebalance_at: float | None = None
        self._maintenance: list[_Maintenance] = []
        self._fault: str | None = None
        self._fault_count: int | None = None
        self._notice_first_served_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/{path:.+}", self._meta_data)
        app.router.add_post("/_sim/{op}", self._control)
        app.router.add_get("/_sim/state", self._state)
        # A "slow" request may still be sleeping at close; don't let it hold shutdown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.Server)
        self._port = int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    # -- control -----------------------------------------------------------------------------------------

    def arm_instance_action(
        self, action: str = "terminate", *, after_s: float = 0.0, lead_s: float = 120.0, moving: bool = False
    ) -> None:
        """Serve ``spot/instance-action`` from ``after_s`` on, with ``time`` = visible + ``lead_s``.

        ``moving`` re-computes ``time`` as now + ``lead_s`` on every request, as some simulators do."""
        if action not in SPOT_ACTIONS:
            raise ValueError(f"action {action!r} is not one of {sorted(SPOT_ACTIONS)}")
        visible_at = self._clock() + after_s
        self._instance_action = _InstanceAction(action, visible_at, visible_at + lead_s, moving, lead_s)
        self._notice_first_served_at = None

    def arm_rebalance(self, *, after_s: float = 0.0) -> None:
        self._rebalance_at = self._clock() + after_s

    def add_maintenance(
        self,
        code: str,
        *,
        not_before_s: float,
        event_id: str | None = None,
        state: str = "active",
        description: str = "",
    ) -> str:
        """Schedule an event ``not_before_s`` from now; returns its EventId."""
        event_id = event_id or f"instance-event-{secrets.token_hex(8)}"
        self._maintenance.append(
            _Maintenance(
                code, event_id, state, self._clock() + not_before_s, description or f"scheduled {code}"
            )
        )
        return event_id

    def set_identity(
        self,
        *,
        instance_id: str | None = None,
        instance_type: str | None = None,
        availability_zone: str | None = None,
        life_cycle: str | None = None,
    ) -> None:
        """Who the simulated instance says it is (None keeps a field), e.g. to match a moto instance; a new
        identity is a new instance, so any armed notice stays as it is and only the answers change."""
        if life_cycle is not None and life_cycle not in LIFE_CYCLES:
            raise ValueError(f"life cycle {life_cycle!r} is not one of {sorted(LIFE_CYCLES)}")
        for path, value in (
            ("instance-id", instance_id),
            ("instance-type", instance_type),
            ("placement/availability-zone", availability_zone),
            ("instance-life-cycle", life_cycle),
        ):
            if value is not None:
                if not value.strip():
                    raise ValueError(f"{path} may not be empty")
                self._identity[path] = value
        # IMDS serves the region beside the zone: us-east-1a → us-east-1 (local zones keep their region too).
        self._identity["placement/region"] = region_of_zone(self._identity["placement/availability-zone"])

    def set_fault(self, mode: str | None, *, count: int | None = None) -> None:
        """Misbehave on the next ``count`` requests (all of them when None); ``None`` heals."""
        if mode is not None and mode not in FAULT_MODES | TOKEN_FAULT_MODES:
            raise ValueError(f"fault {mode!r} is not one of {sorted(FAULT_MODES | TOKEN_FAULT_MODES)}")
        if count is not None and count < 0:
            raise ValueError("count must be >= 0")
        self._fault = mode
        self._fault_count = count

    def clear(self) -> None:
        """Withdraw every notice and heal every fault (tokens stay valid)."""
        self._instance_action = None
        self._rebalance_at = None
        self._maintenance.clear()
        self._fault = None
        self._fault_count = None

    def state(self) -> dict[str, Any]:
        """A snapshot for tests and ``GET /_sim/state``."""
        return {
            "url": self.url,
            "requests": dict(self._requests),
            "statuses": dict(self._statuses),
            "tokens_issued": self._tokens_issued,
            "require_token": self.require_token,
            "fault": self._fault,
            "fault_count": self._fault_count,
            #: Requests the armed fault still hits: 0 when healthy, None while a fault has no count.
            "faults_left": 0 if self._fault is None else self._fault_count,
            "instance_action": self._instance_action.action if self._instance_action else None,
            "notice_first_served_at": self._notice_first_served_at,
            "rebalance_at": self._rebalance_at,
            "maintenance": [m.event_id for m in self._maintenance],
            "identity": dict(self._identity),
        }

    # -- handlers ----------------------------------------------------------------------------------------

    def _take_fault(self, *, token: bool) -> str | None:
        mode = self._fault
        if mode is None or mode.startswith("token-") != token:
            return None
        if self._fault_count is not None:
            if self._fault_count <= 0:
                return None
            self._fault_count -= 1
            if self._fault_count == 0:
                self._fault, self._fault_count = None, None
        return mode.removeprefix("token-")

    async def _apply_fault(self, request: web.Request, mode: str) -> web.StreamResponse | None:
        if mode.isdigit():
            return web.Response(status=int(mode), text="simulated fault\n")
        if mode == "slow":
            await asyncio.sleep(self.slow_s)
            return None
        if mode == "reset":
            if request.transport is not None:
                request.transport.abort()
            # The peer is gone; raising stops aiohttp from writing to the aborted transport.
            raise asyncio.CancelledError
        if mode == "garbage":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/plain")
        if mode == "huge":
            return web.Response(body=b"[" + b" " * (HUGE_BODY_BYTES - 2) + b"]", content_type="text/plain")
        return None

    def _count(self, path: str, response: web.StreamResponse) -> web.StreamResponse:
        self._statuses[f"{path} {response.status}"] += 1
        return response

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self._requests["token"] += 1
        fault = self._take_fault(token=True)
        if fault is not None:
            faulted = await self._apply_fault(request, fault)
            if faulted is not None:
                return self._count("token", faulted)
        raw = request.headers.get(TTL_HEADER)
        try:
            ttl = int(raw) if raw is not None else 0
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TTL_S:
            return self._count(
                "token", web.Response(status=400, text=f"{TTL_HEADER} must be 1..{MAX_TTL_S}\n")
            )
        token = secrets.token_urlsafe(40)
        now = self._clock()
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        self._tokens[token] = now + ttl
        self._tokens_issued += 1
        return self._count(
            "token", web.Response(text=token, content_type="text/plain", headers={TTL_HEADER: str(ttl)})
        )

    async def _meta_data(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self._requests[path] += 1
        token = request.headers.get(TOKEN_HEADER)
        if token is not None or self.require_token:
            expiry = self._tokens.get(token or "")
            if expiry is None or expiry <= self._clock():
                return self._count(path, web.Response(status=401, text="Unauthorized\n"))
        fault = self._take_fault(token=False)
        if fault is not None:
            faulted = await self._apply_fault(request, fault)
            if faulted is not None:
                return self._count(path, faulted)
        body = self._body(path)
        if body is None:
            return self._count(path, web.Response(status=404, text="Not Found\n", content_type="text/html"))
        return self._count(path, web.Response(text=body, content_type="text/plain"))

    def _body(self, path: str) -> str | None:
        now = self._clock()
        if path in self._identity:
            return self._identity[path]
        if path == "spot/instance-action":
            ia = self._instance_action
            if ia is None or now < ia.visible_at:
                return None
            if self._notice_first_served_at is None:
                self._notice_first_served_at = time.time()
            when = now + ia.lead_s if ia.moving else ia.time
            return json.dumps({"action": ia.action, "time": _rfc3339(when)})
        if path == "events/recommendations/rebalance":
            if self._rebalance_at is None or now < self._rebalance_at:
                return None
            return json.dumps({"noticeTime": _rfc3339(self._rebalance_at)})
        if path == "events/maintenance/scheduled":
            if not self._maintenance:
                return None
            events = [
                {
                    "Code": m.code,
                    "Description": m.description,
                    "EventId": m.event_id,
                    "NotAfter": _maintenance_time(m.not_before + 7200),
                    "NotBefore": _maintenance_time(m.not_before),
                    "State": m.state,
                }
                for m in self._maintenance
            ]
            # Real IMDS pretty-prints this one.
            return json.dumps(events, indent=2)
        return None

    async def _control(self, request: web.Request) -> web.StreamResponse:
        op = request.match_info["op"]
        try:
            raw = await request.text()
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            if op == "notice":
                self.arm_instance_action(
                    str(body.get("action", "terminate")),
                    after_s=float(body.get("after", 0.0)),
                    lead_s=float(body.get("lead", 120.0)),
                    moving=bool(body.get("moving", False)),
                )
            elif op == "rebalance":
                self.arm_rebalance(after_s=float(body.get("after", 0.0)))
            elif op == "maintenance":
                self.add_maintenance(
                    str(body.get("code", "system-reboot")),
                    not_before_s=float(body.get("not_before", 600.0)),
                    event_id=body.get("event_id"),
                    state=str(body.get("state", "active")),
                )
            elif op == "fault":
                mode = body.get("mode")
                count = body.get("count")
                self.set_fault(
                    None if mode is None else str(mode), count=None if count is None else int(count)
                )
            elif op == "identity":
                self.set_identity(
                    instance_id=body.get("instance_id"),
                    instance_type=body.get("instance_type"),
                    availability_zone=body.get("availability_zone"),
                    life_cycle=body.get("life_cycle"),
                )
            elif op == "clear":
                self.clear()
            else:
                return web.json_response(
                    {
                        "error": f"unknown control {op!r}; "
                        "use notice, rebalance, maintenance, fault, identity or clear"
                    },
                    status=404,
                )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.state())

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state())
