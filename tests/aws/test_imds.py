"""The IMDS client: tokens, v1 fallback, bounded retries, strict parsing, metrics."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web

from spotd.aws.imds import ImdsClient
from spotd.errors import ImdsMalformed, ImdsUnavailable
from spotd.metrics import Metrics
from spotd.tools.simulator import ImdsSimulator, SimulatorThread
from tests.util import free_port


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def requests(metrics: Metrics, path: str, code: str) -> float:
    return sample(metrics, "spotd_imds_requests_total", path=path, code=code)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_token_cached_across_calls(imds_sim: SimulatorThread) -> None:
    """One token serves many requests, including concurrent ones."""
    metrics = Metrics()
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=1.0, metrics=metrics) as imds:
        identity = await imds.identity()
        assert identity.instance_id == "i-0123456789abcdef0" and identity.life_cycle == "spot"
        assert await imds.instance_action() is None
        assert await imds.rebalance() is None
        assert await imds.scheduled_events() == []
        assert imds.up and imds.last_ok is not None
    assert imds_sim.state()["tokens_issued"] == 1
    assert requests(metrics, "token", "200") == 1
    assert requests(metrics, "spot/instance-action", "404") == 1
    assert sample(metrics, "spotd_imds_up") == 1


async def test_token_renewed_before_expiry(imds_sim: SimulatorThread) -> None:
    """The token is renewed once 80% of its TTL has passed, before IMDS would reject it."""
    clock = FakeClock()
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=1.0, token_ttl_s=100, clock=clock) as imds:
        await imds.get("instance-id", label="instance-id")
        clock.now += 79
        await imds.get("instance-id", label="instance-id")
        assert imds_sim.state()["tokens_issued"] == 1
        clock.now += 2
        await imds.get("instance-id", label="instance-id")
        assert imds_sim.state()["tokens_issued"] == 2


async def test_401_drops_token_and_retries_once() -> None:
    """A token IMDS no longer accepts is dropped and the request retried with a fresh one."""
    sim_now = [1000.0]
    metrics = Metrics()
    with SimulatorThread(clock=lambda: sim_now[0]) as sim:
        async with ImdsClient(endpoint=sim.url, timeout_s=1.0, token_ttl_s=60, metrics=metrics) as imds:
            assert await imds.get("instance-id", label="instance-id") == "i-0123456789abcdef0"
            sim_now[0] += 61  # IMDS expires it while the client still trusts it
            assert await imds.get("instance-id", label="instance-id") == "i-0123456789abcdef0"
        assert sim.state()["tokens_issued"] == 2
    assert requests(metrics, "instance-id", "401") == 1


@pytest.mark.parametrize("code", ["403", "404", "405"])
async def test_v1_fallback_when_token_put_refused(imds_sim: SimulatorThread, code: str) -> None:
    """A token PUT refused with 403/404/405 falls back to IMDSv1 requests without a token."""
    imds_sim.set_require_token(False)
    imds_sim.set_fault(f"token-{code}")
    metrics = Metrics()
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=1.0, metrics=metrics) as imds:
        assert await imds.get("instance-id", label="instance-id") == "i-0123456789abcdef0"
        assert await imds.get("instance-type", label="instance-type") == "g5.2xlarge"
    assert requests(metrics, "token", code) == 1  # v1 is remembered, not re-probed every call
    assert imds_sim.state()["tokens_issued"] == 0


async def test_v1_fallback_when_token_put_times_out(imds_sim: SimulatorThread) -> None:
    """A token PUT that times out (hop limit 1 in a container) falls back to IMDSv1 for that request."""
    imds_sim.set_require_token(False)
    imds_sim.set_fault("token-slow")
    metrics = Metrics()
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=0.2, metrics=metrics) as imds:
        assert await imds.get("instance-id", label="instance-id") == "i-0123456789abcdef0"
    assert requests(metrics, "token", "timeout") == 1


async def test_allow_v1_false_names_the_key(imds_sim: SimulatorThread) -> None:
    """With allow_v1 off, a refused token PUT raises ImdsUnavailable naming imds.allow_v1."""
    imds_sim.set_fault("token-405")
    metrics = Metrics()
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=1.0, allow_v1=False, metrics=metrics) as imds:
        with pytest.raises(ImdsUnavailable, match=r"imds\.allow_v1"):
            await imds.instance_action()
        assert not imds.up
    assert sample(metrics, "spotd_imds_up") == 0


@pytest.mark.parametrize(
    ("mode", "error", "code"),
    [
        ("500", ImdsUnavailable, "500"),
        ("503", ImdsUnavailable, "503"),
        ("slow", ImdsUnavailable, "timeout"),
        ("reset", ImdsUnavailable, "error"),
        ("garbage", ImdsMalformed, "200"),
        ("huge", ImdsMalformed, "200"),
    ],
)
async def test_fault_modes(imds_sim: SimulatorThread, mode: str, error: type[Exception], code: str) -> None:
    """Every simulator fault becomes ImdsUnavailable or ImdsMalformed within the bound, and is counted."""
    imds_sim.arm_instance_action()
    metrics = Metrics()
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=0.2, retries=2, metrics=metrics) as imds:
        await imds.get("instance-id", label="instance-id")  # the token, before the fault
        imds_sim.set_fault(mode)
        started = time.monotonic()
        with pytest.raises(error):
            await imds.instance_action()
        assert time.monotonic() - started <= imds.budget_s
        imds_sim.set_fault(None)
        assert (await imds.instance_action()) is not None
    label = "spot/instance-action"
    if error is ImdsUnavailable:
        assert requests(metrics, label, code) == 3  # retries + 1 attempts
    else:
        assert requests(metrics, label, code) >= 1
        assert sample(metrics, "spotd_imds_malformed_total", path=label) == 1


async def test_transient_fault_is_retried(imds_sim: SimulatorThread) -> None:
    """A single 503 is retried and the call succeeds."""
    imds_sim.arm_instance_action("stop")
    metrics = Metrics()
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=1.0, metrics=metrics) as imds:
        await imds.get("instance-id", label="instance-id")
        imds_sim.set_fault("503", count=1)
        action = await imds.instance_action()
    assert action is not None and action.action == "stop"
    assert requests(metrics, "spot/instance-action", "503") == 1


async def test_nothing_listening_is_unavailable_and_identity_unknown() -> None:
    """A closed port gives ImdsUnavailable, never an aiohttp error; identity() degrades to "unknown"."""
    metrics = Metrics()
    async with ImdsClient(endpoint=f"http://127.0.0.1:{free_port()}", timeout_s=0.2, metrics=metrics) as imds:
        with pytest.raises(ImdsUnavailable, match=r"imds\.endpoint"):
            await imds.instance_action()
        identity = await imds.identity()
    assert identity.instance_id == "unknown" and identity.availability_zone == "unknown"
    assert requests(metrics, "token", "error") >= 1
    assert sample(metrics, "spotd_imds_up") == 0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
async def test_ipv6_endpoint() -> None:
    """An IPv6 endpoint in brackets works, like http://[fd00:ec2::254] on Nitro instances."""
    sim = ImdsSimulator(host="::1")
    await sim.start()
    try:
        assert sim.url.startswith("http://[::1]:")
        sim.arm_instance_action("terminate")
        async with ImdsClient(endpoint=sim.url, timeout_s=1.0) as imds:
            action = await imds.instance_action()
        assert action is not None and action.action == "terminate"
    finally:
        await sim.close()


# -- parsing, against a server that answers whatever a test asks -------------------------------------------


class BodyServer:
    """A loopback IMDS that serves canned bodies, for formats the simulator does not produce."""

    def __init__(self) -> None:
        self.bodies: dict[str, tuple[bytes, str]] = {}
        self.url = ""

    async def token(self, request: web.Request) -> web.Response:
        return web.Response(text="tok")

    async def meta(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        if path not in self.bodies:
            return web.Response(status=404)
        body, ctype = self.bodies[path]
        return web.Response(body=body, content_type=ctype)


@pytest.fixture
async def body_server() -> AsyncIterator[BodyServer]:
    server = BodyServer()
    app = web.Application()
    app.router.add_put("/latest/api/token", server.token)
    app.router.add_get("/latest/meta-data/{path:.+}", server.meta)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


ITN = {"action": "terminate", "time": "2026-11-25T04:02:00Z"}


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (json.dumps(ITN), "text/plain"),
        (json.dumps(ITN), "application/json"),
        (json.dumps(ITN, indent=4) + "\n", "text/plain"),
        ('{\n  "action" : "terminate",\n  "time" : "2026-11-25T04:02:00.000Z"\n}', "application/json"),
    ],
)
async def test_instance_action_formats(body_server: BodyServer, body: str, ctype: str) -> None:
    """Compact or pretty JSON is parsed whether served as text/plain or application/json."""
    body_server.bodies["spot/instance-action"] = (body.encode(), ctype)
    async with ImdsClient(endpoint=body_server.url, timeout_s=1.0) as imds:
        action = await imds.instance_action()
    assert action is not None and action.action == "terminate"
    assert action.time == datetime(2026, 11, 25, 4, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"action": "terminate"}',
        b'{"action": "explode", "time": "2026-11-25T04:02:00Z"}',
        b'{"action": 5, "time": "2026-11-25T04:02:00Z"}',
        b'{"action": "terminate", "time": "soon"}',
        b'{"action": "terminate", "time": 1700000000}',
        b"\xff\xfe",
    ],
)
async def test_malformed_instance_action(body_server: BodyServer, body: bytes) -> None:
    """A body with wrong syntax, fields or types raises ImdsMalformed and is counted."""
    body_server.bodies["spot/instance-action"] = (body, "text/plain")
    metrics = Metrics()
    async with ImdsClient(endpoint=body_server.url, timeout_s=1.0, metrics=metrics) as imds:
        with pytest.raises(ImdsMalformed):
            await imds.instance_action()
        assert imds.up  # IMDS answered; the answer was bad
    assert sample(metrics, "spotd_imds_malformed_total", path="spot/instance-action") == 1


async def test_scheduled_events_parsed(body_server: BodyServer) -> None:
    """Maintenance events parse with EC2's "21 Jan 2019 09:00:43 GMT" times; bad entries are malformed."""
    events = [
        {
            "NotBefore": "21 Jan 2019 09:00:43 GMT",
            "Code": "system-reboot",
            "Description": "scheduled reboot",
            "EventId": "instance-event-0d59937288b749b32",
            "NotAfter": "21 Jan 2019 09:17:23 GMT",
            "State": "active",
        }
    ]
    body_server.bodies["events/maintenance/scheduled"] = (json.dumps(events, indent=2).encode(), "text/plain")
    body_server.bodies["events/recommendations/rebalance"] = (
        b'{"noticeTime": "2020-10-27T08:22:00Z"}',
        "text/plain",
    )
    async with ImdsClient(endpoint=body_server.url, timeout_s=1.0) as imds:
        (event,) = await imds.scheduled_events()
        assert event.code == "system-reboot" and event.disruptive
        assert event.not_before == datetime(2019, 1, 21, 9, 0, 43, tzinfo=UTC)
        rebalance = await imds.rebalance()
        assert rebalance is not None and rebalance.notice_time == datetime(2020, 10, 27, 8, 22, tzinfo=UTC)
        body_server.bodies["events/maintenance/scheduled"] = (b'[{"Code": "system-reboot"}]', "text/plain")
        with pytest.raises(ImdsMalformed):
            await imds.scheduled_events()
        body_server.bodies["events/maintenance/scheduled"] = (b'{"Code": "x"}', "text/plain")
        with pytest.raises(ImdsMalformed):
            await imds.scheduled_events()
