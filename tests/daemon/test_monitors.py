"""Monitors turn IMDS answers into notices; the loop hands each on once and survives IMDS trouble."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from spotd.aws.imds import ImdsClient
from spotd.daemon.monitors import MaintenanceMonitor, Monitor, MonitorLoop, RebalanceMonitor, SpotMonitor
from spotd.events import Notice, NoticeKind, parse_time
from spotd.metrics import Metrics
from spotd.tools.simulator import SimulatorThread
from tests.util import async_wait_until

NOW = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)


@pytest.fixture
async def imds(imds_sim: SimulatorThread) -> AsyncIterator[ImdsClient]:
    async with ImdsClient(endpoint=imds_sim.url, timeout_s=0.3, retries=0) as client:
        yield client


class Running:
    """A MonitorLoop on a task, collecting what it hands to on_notice."""

    def __init__(
        self,
        monitors: list[Monitor],
        *,
        interval_s: float = 0.03,
        metrics: Metrics | None = None,
        on_notice: Callable[[Notice], Any] | None = None,
    ) -> None:
        self.notices: list[Notice] = []
        self.withdrawn: list[Notice] = []

        async def collect(notice: Notice) -> None:
            self.notices.append(notice)
            if on_notice is not None:
                await on_notice(notice)

        async def withdrawn(notice: Notice) -> None:
            self.withdrawn.append(notice)

        self.loop = MonitorLoop(
            monitors=monitors,
            interval_s=interval_s,
            on_notice=collect,
            on_withdrawn=withdrawn,
            metrics=metrics,
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.loop.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_spot_notice_fields(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """A terminate ITN becomes a final spot notice keyed by action whose deadline is the ITN time."""
    monitor = SpotMonitor(imds=imds, clock_wall=lambda: NOW)
    assert await monitor.poll() == []
    imds_sim.arm_instance_action("terminate", lead_s=120)
    (notice,) = await monitor.poll()
    assert (notice.kind, notice.action, notice.key, notice.final) == (
        NoticeKind.SPOT,
        "terminate",
        "spot:terminate",
        True,
    )
    assert notice.not_after is not None and notice.not_after == parse_time(notice.detail["time"])
    assert notice.detected_at == NOW


async def test_hibernate_is_now_and_not_final(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """Hibernation starts at once, so its notice's time is the moment it was seen; it is not final, since a hibernated instance keeps its memory and processes."""
    imds_sim.arm_instance_action("hibernate", lead_s=120)
    (notice,) = await SpotMonitor(imds=imds, clock_wall=lambda: NOW).poll()
    assert notice.key == "spot:hibernate" and notice.not_after == NOW
    assert notice.final is False


async def test_rebalance_notice_fields(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """A rebalance recommendation is a non-final notice carrying its noticeTime."""
    monitor = RebalanceMonitor(imds=imds, clock_wall=lambda: NOW)
    assert await monitor.poll() == []
    imds_sim.arm_rebalance()
    (notice,) = await monitor.poll()
    assert (notice.kind, notice.action, notice.key, notice.final) == (
        NoticeKind.REBALANCE,
        "rebalance",
        "rebalance",
        False,
    )
    assert notice.issued_at is not None and notice.not_after is None


async def test_maintenance_lead_threshold(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """Only disruptive active events whose NotBefore is less than lead_s away become notices."""
    metrics = Metrics()
    soon = imds_sim.add_maintenance("system-reboot", not_before_s=100, event_id="instance-event-soon")
    imds_sim.add_maintenance("instance-stop", not_before_s=3600, event_id="instance-event-later")
    imds_sim.add_maintenance("system-maintenance", not_before_s=10, event_id="instance-event-harmless")
    imds_sim.add_maintenance(
        "instance-reboot", not_before_s=10, event_id="instance-event-done", state="completed"
    )
    monitor = MaintenanceMonitor(imds=imds, lead_s=600, metrics=metrics)
    (notice,) = await monitor.poll()
    assert (notice.kind, notice.action, notice.key, notice.final) == (
        NoticeKind.MAINTENANCE,
        "system-reboot",
        f"maintenance:{soon}",
        True,
    )
    assert notice.not_after is not None
    assert abs(notice.not_after - (datetime.now(UTC) + timedelta(seconds=100))) < timedelta(seconds=3)
    gauge = metrics.registry.get_sample_value
    assert gauge("spotd_maintenance_events", {"code": "system-reboot"}) == 1
    assert gauge("spotd_maintenance_events", {"code": "instance-stop"}) == 1
    assert gauge("spotd_maintenance_events", {"code": "system-maintenance"}) is None
    imds_sim.clear()
    assert await monitor.poll() == []
    assert gauge("spotd_maintenance_events", {"code": "system-reboot"}) == 0


async def test_notice_handed_on_once_though_time_moves(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """A notice whose time moves on every poll is handed on and counted exactly once."""
    metrics = Metrics()
    imds_sim.arm_instance_action("terminate", moving=True)
    with capture_logs() as logs:
        async with Running([SpotMonitor(imds=imds)], metrics=metrics) as running:
            await async_wait_until(
                lambda: imds_sim.state()["requests"].get("spot/instance-action", 0) >= 6, what="several polls"
            )
    assert [n.key for n in running.notices] == ["spot:terminate"]
    assert (
        metrics.registry.get_sample_value("spotd_notices_total", {"kind": "spot", "action": "terminate"}) == 1
    )
    (detected,) = events(logs, "notice.detected")
    assert detected["kind"] == "spot" and detected["action"] == "terminate" and detected["not_after"]


async def test_withdrawn_notice_logged_and_acted_on_again(
    imds_sim: SimulatorThread, imds: ImdsClient
) -> None:
    """A notice that disappears is logged as withdrawn and handed to on_withdrawn, and handed on again if it comes back."""
    with capture_logs() as logs:
        async with Running([SpotMonitor(imds=imds), RebalanceMonitor(imds=imds)]) as running:
            imds_sim.arm_rebalance()
            await async_wait_until(lambda: len(running.notices) == 1, what="rebalance notice")
            imds_sim.clear()
            await async_wait_until(lambda: events(logs, "notice.withdrawn"), what="withdrawn log")
            imds_sim.arm_rebalance()
            await async_wait_until(lambda: len(running.notices) == 2, what="rebalance again")
    assert [n.key for n in running.notices] == ["rebalance", "rebalance"]
    assert events(logs, "notice.withdrawn")[0]["key"] == "rebalance"
    assert [n.key for n in running.withdrawn] == ["rebalance"]


async def test_loop_survives_outage_and_catches_notice_after(
    imds_sim: SimulatorThread, imds: ImdsClient
) -> None:
    """While IMDS fails the loop logs once and keeps polling; a later notice is caught within ~2 s."""
    metrics = Metrics()
    imds_sim.set_fault("503")
    monitors: list[Monitor] = [SpotMonitor(imds=imds), MaintenanceMonitor(imds=imds, lead_s=600)]
    with capture_logs() as logs:
        async with Running(monitors, metrics=metrics) as running:
            await async_wait_until(
                lambda: imds_sim.state()["requests"].get("spot/instance-action", 0) >= 4,
                what="polls during the outage",
            )
            imds_sim.arm_instance_action("stop")
            healed = time.monotonic()
            imds_sim.set_fault(None)
            await async_wait_until(lambda: running.notices, timeout_s=6, what="notice after recovery")
            latency = time.monotonic() - healed
    assert latency < 2.0 + imds.budget_s
    assert running.notices[0].key == "spot:stop"
    down = [e for e in events(logs, "imds.down") if e["monitor"] == "spot"]
    assert len(down) == 1, "an outage is logged once, not on every poll"
    assert [e["monitor"] for e in events(logs, "imds.recovered")].count("spot") == 1


async def test_malformed_answer_not_acted_on(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """A garbage ITN body is logged as malformed and never handed on."""
    imds_sim.arm_instance_action()
    imds_sim.set_fault("garbage")
    with capture_logs() as logs:
        async with Running([SpotMonitor(imds=imds)]) as running:
            await async_wait_until(
                lambda: imds_sim.state()["requests"].get("spot/instance-action", 0) >= 3, what="polls"
            )
            assert running.notices == []
            imds_sim.set_fault(None)
            await async_wait_until(lambda: running.notices, what="the notice once healthy")
    assert len(events(logs, "imds.malformed")) == 1


async def test_slow_handler_does_not_block_polling(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """on_notice runs on its own task: polling goes on while it is still busy."""
    never = asyncio.Event()

    async def stuck(notice: Notice) -> None:
        await never.wait()

    imds_sim.arm_instance_action()
    async with Running([SpotMonitor(imds=imds)], on_notice=stuck) as running:
        await async_wait_until(lambda: running.notices, what="notice")
        seen = imds_sim.state()["requests"]["spot/instance-action"]
        await async_wait_until(
            lambda: imds_sim.state()["requests"]["spot/instance-action"] >= seen + 3,
            what="polls after the notice",
        )


async def test_failing_handler_is_logged(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """An exception from on_notice is logged and does not stop the loop."""

    async def boom(notice: Notice) -> None:
        raise RuntimeError("handler bug")

    imds_sim.arm_instance_action()
    with capture_logs() as logs:
        async with Running([SpotMonitor(imds=imds)], on_notice=boom) as running:
            await async_wait_until(lambda: events(logs, "notice.handler_failed"), what="handler failure log")
            assert running.task is not None and not running.task.done()


async def test_fixed_cadence(imds_sim: SimulatorThread, imds: ImdsClient) -> None:
    """Polls follow the interval's cadence rather than drifting by the work done each round."""
    async with Running([SpotMonitor(imds=imds)], interval_s=0.05):
        start = imds_sim.state()["requests"].get("spot/instance-action", 0)
        began = time.monotonic()
        await async_wait_until(
            lambda: imds_sim.state()["requests"].get("spot/instance-action", 0) >= start + 10,
            what="ten polls",
        )
        elapsed = time.monotonic() - began
    assert 0.4 <= elapsed < 3.0
