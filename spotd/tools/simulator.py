"""An IMDSv2 simulator: the real wire protocol on loopback, for tests, drills and the demo.

It answers like EC2's metadata service: ``PUT /latest/api/token`` with a TTL header, 401 for a missing,
bad or expired token (when tokens are required), 404 before a notice, JSON bodies as ``text/plain``.
Notices and faults are armed from Python (:class:`ImdsSimulator`, :class:`SimulatorThread`) or over a
small JSON control API under ``/_sim/``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from aiohttp import web

__all__ = ["FAULT_MODES", "ImdsSimulator", "SimulatorThread", "add_arguments", "main"]

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
        self._identity = {
            "instance-id": instance_id,
            "instance-type": instance_type,
            "placement/availability-zone": availability_zone,
            "instance-life-cycle": life_cycle,
        }
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
            elif op == "clear":
                self.clear()
            else:
                return web.json_response(
                    {"error": f"unknown control {op!r}; use notice, rebalance, maintenance, fault or clear"},
                    status=404,
                )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.state())

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state())


class SimulatorThread:
    """An :class:`ImdsSimulator` on its own event loop in a daemon thread, for sync code and other loops.

    Control methods are thread-safe: each runs on the simulator's loop and returns when done."""

    __slots__ = ("_error", "_loop", "_ready", "_sim", "_thread")

    def __init__(self, **kwargs: Any) -> None:
        self._sim = ImdsSimulator(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, *, timeout_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="imds-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"IMDS simulator did not start within {timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"IMDS simulator failed to start: {self._error}") from self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        # aiohttp's server looks the loop up with get_event_loop() in places.
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._sim.start())
        except BaseException as exc:  # reported to start() in the caller's thread
            self._error = exc
            self._ready.set()
            asyncio.set_event_loop(None)
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._sim.close())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    def close(self, *, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], T], *, timeout_s: float = 5.0) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the simulator is not running; call start() first")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout_s)

    @property
    def url(self) -> str:
        return self._sim.url

    @property
    def port(self) -> int:
        return self._sim.port

    @property
    def simulator(self) -> ImdsSimulator:
        """The simulator itself; touch it only through this thread's methods from other threads."""
        return self._sim

    def arm_instance_action(
        self, action: str = "terminate", *, after_s: float = 0.0, lead_s: float = 120.0, moving: bool = False
    ) -> None:
        self._call(
            lambda: self._sim.arm_instance_action(action, after_s=after_s, lead_s=lead_s, moving=moving)
        )

    def arm_rebalance(self, *, after_s: float = 0.0) -> None:
        self._call(lambda: self._sim.arm_rebalance(after_s=after_s))

    def add_maintenance(
        self, code: str, *, not_before_s: float, event_id: str | None = None, state: str = "active"
    ) -> str:
        return self._call(
            lambda: self._sim.add_maintenance(code, not_before_s=not_before_s, event_id=event_id, state=state)
        )

    def set_fault(self, mode: str | None, *, count: int | None = None) -> None:
        self._call(lambda: self._sim.set_fault(mode, count=count))

    def set_require_token(self, value: bool) -> None:
        def apply() -> None:
            self._sim.require_token = value

        self._call(apply)

    def clear(self) -> None:
        self._call(self._sim.clear)

    def state(self) -> dict[str, Any]:
        return self._call(self._sim.state)


# -- `spotd simulate-imds` -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1338, help="port (default 1338; 0 picks a free one)")
    parser.add_argument(
        "--action",
        choices=sorted(SPOT_ACTIONS),
        default=None,
        help="arm a spot interruption notice with this action",
    )
    parser.add_argument(
        "--after",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds until the spot notice appears (with --action)",
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds from the notice to the interruption time it announces (default 120)",
    )
    parser.add_argument(
        "--rebalance-after",
        type=float,
        default=None,
        metavar="S",
        help="serve a rebalance recommendation after S seconds",
    )
    parser.add_argument(
        "--maintenance",
        default=None,
        metavar="CODE",
        help="schedule a maintenance event, e.g. system-reboot or instance-stop",
    )
    parser.add_argument(
        "--maintenance-after",
        type=float,
        default=600.0,
        metavar="S",
        help="NotBefore of the maintenance event, seconds from now (default 600)",
    )
    parser.add_argument(
        "--no-require-token", action="store_true", help="also serve IMDSv1 requests that carry no token"
    )


async def _serve(
    args: argparse.Namespace, started: Callable[[ImdsSimulator], Awaitable[None] | None]
) -> None:
    sim = ImdsSimulator(host=args.host, port=args.port, require_token=not args.no_require_token)
    await sim.start()
    try:
        if args.action:
            sim.arm_instance_action(args.action, after_s=args.after, lead_s=args.lead)
        if args.rebalance_after is not None:
            sim.arm_rebalance(after_s=args.rebalance_after)
        if args.maintenance:
            sim.add_maintenance(args.maintenance, not_before_s=args.maintenance_after)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        result = started(sim)
        if result is not None:
            await result
        await stop.wait()
    finally:
        await sim.close()


def main(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT/SIGTERM; print where it listens and how to drive it."""

    def started(sim: ImdsSimulator) -> None:
        url = sim.url
        print(f"IMDS simulator listening on {url}", flush=True)
        print(f"  point spotd at it:   SPOTD_IMDS_ENDPOINT={url} spotd run", flush=True)
        print(
            f'  interrupt:           curl -X POST {url}/_sim/notice -d \'{{"action": "terminate", '
            f'"after": 0, "lead": 120}}\'',
            flush=True,
        )
        print(f"  rebalance:           curl -X POST {url}/_sim/rebalance -d '{{\"after\": 0}}'", flush=True)
        print(
            f'  maintenance:         curl -X POST {url}/_sim/maintenance -d \'{{"code": "system-reboot", '
            f'"not_before": 300}}\'',
            flush=True,
        )
        print(
            f'  fault:               curl -X POST {url}/_sim/fault -d \'{{"mode": "503", "count": 3}}\' '
            f"(modes: {', '.join(sorted(FAULT_MODES | TOKEN_FAULT_MODES))})",
            flush=True,
        )
        print(f"  clear / state:       curl -X POST {url}/_sim/clear ; curl {url}/_sim/state", flush=True)

    try:
        asyncio.run(_serve(args, started))
    except OSError as exc:
        print(
            f"spotd simulate-imds: cannot listen on {args.host}:{args.port}: {exc}; "
            f"choose another --port (0 picks a free one)",
            flush=True,
        )
        return 1
    return 0
