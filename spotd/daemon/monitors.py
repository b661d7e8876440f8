"""Monitors turn what IMDS says into :class:`Notice` values; :class:`MonitorLoop` polls them on a cadence.

One monitor per signal behind a two-member interface (``name``, ``poll``). A notice is identified by its
``key``, never its time: IMDS and simulators may move the time on every poll, yet a notice is handed on
exactly once for as long as it stays visible.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from spotd.aws.imds import ImdsClient
from spotd.errors import ImdsError, ImdsMalformed
from spotd.events import Notice, NoticeKind, format_time
from spotd.logs import get_logger
from spotd.metrics import Metrics

__all__ = ["MaintenanceMonitor", "Monitor", "MonitorLoop", "RebalanceMonitor", "SpotMonitor"]

log = get_logger("spotd.monitors")

WallClock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


class Monitor(Protocol):
    """One interruption signal."""

    name: str

    async def poll(self) -> list[Notice]:
        """What the source says now; raises :class:`ImdsError` subclasses when it cannot tell."""
        ...


class SpotMonitor:
    """``spot/instance-action``: terminate, stop or hibernate, two minutes ahead (hibernate: at once).

    Terminate and stop are final: the instance goes away with its memory, so trainers save and stop.
    Hibernate is not: the instance keeps its memory and processes and resumes where it was, so stopping
    training would throw away the very thing hibernation keeps (and a unit with ``Restart=on-failure``
    would not start again after a clean exit). It is a non-final request due *now* (``not_after`` is when
    it was seen): trainers save at once and carry on, the commit goes at emergency priority, and the
    upload continues across the sleep if it has to (see :func:`spotd.daemon.episode.episode_times`).
    """

    __slots__ = ("_clock", "_imds", "name")

    def __init__(self, *, imds: ImdsClient, clock_wall: WallClock = _now) -> None:
        self.name = "spot"
        self._imds = imds
        self._clock = clock_wall

    async def poll(self) -> list[Notice]:
        action = await self._imds.instance_action()
        if action is None:
            return []
        now = self._clock()
        hibernate = action.action == "hibernate"
        # Hibernation starts right away: the ITN time is not a deadline we can use.
        not_after = now if hibernate else action.time
        return [
            Notice(
                kind=NoticeKind.SPOT,
                action=action.action,
                key=f"spot:{action.action}",
                detected_at=now,
                final=not hibernate,
                not_after=not_after,
                detail={"time": format_time(action.time)},
            )
        ]


class RebalanceMonitor:
    """``events/recommendations/rebalance``: elevated interruption risk, no deadline."""

    __slots__ = ("_clock", "_imds", "name")

    def __init__(self, *, imds: ImdsClient, clock_wall: WallClock = _now) -> None:
        self.name = "rebalance"
        self._imds = imds
        self._clock = clock_wall

    async def poll(self) -> list[Notice]:
        rec = await self._imds.rebalance()
        if rec is None:
            return []
        return [
            Notice(
                kind=NoticeKind.REBALANCE,
                action="rebalance",
                key="rebalance",
                detected_at=self._clock(),
                final=False,
                issued_at=rec.notice_time,
            )
        ]


class MaintenanceMonitor:
    """``events/maintenance/scheduled``: a disruptive event becomes a notice ``lead_s`` before NotBefore."""

    __slots__ = ("_clock", "_codes", "_imds", "_lead", "_metrics", "name")

    def __init__(
        self, *, imds: ImdsClient, lead_s: float, metrics: Metrics | None = None, clock_wall: WallClock = _now
    ) -> None:
        self.name = "maintenance"
        self._imds = imds
        self._lead = timedelta(seconds=lead_s)
        self._metrics = metrics
        self._clock = clock_wall
        self._codes: set[str] = set()

    async def poll(self) -> list[Notice]:
        events = await self._imds.scheduled_events()
        now = self._clock()
        counts: dict[str, int] = {}
        notices: list[Notice] = []
        for event in events:
            if not event.disruptive:
                continue
            counts[event.code] = counts.get(event.code, 0) + 1
            if event.not_before - now < self._lead:
                notices.append(
                    Notice(
                        kind=NoticeKind.MAINTENANCE,
                        action=event.code,
                        key=f"maintenance:{event.event_id}",
                        detected_at=now,
                        final=True,
                        not_after=event.not_before,
                        detail={"event_id": event.event_id, "description": event.description[:200]},
                    )
                )
        if self._metrics is not None:
            # Codes that went away drop to 0 rather than keep their last value.
            for code in self._codes | counts.keys():
                self._metrics.maintenance_events.labels(code=code).set(counts.get(code, 0))
        self._codes |= counts.keys()
        return notices


_IMPORTANCE: Final = {"spot": 0, "maintenance": 1, "rebalance": 2}


class MonitorLoop:
    """Polls every monitor concurrently on a fixed cadence and hands each new notice to ``on_notice`` once,
    and to ``on_withdrawn`` once it is no longer there (a maintenance event cancelled, an ITN taken back).

    Both run as their own tasks so a slow handler never delays the next poll."""

    __slots__ = (
        "_cap_s",
        "_down_streak",
        "_errors",
        "_handlers",
        "_interval",
        "_metrics",
        "_monitors",
        "_on_notice",
        "_on_withdrawn",
        "_seen",
        "_wall",
    )

    def __init__(
        self,
        *,
        monitors: Sequence[Monitor],
        interval_s: float,
        on_notice: Callable[[Notice], Awaitable[None]],
        on_withdrawn: Callable[[Notice], Awaitable[None]] | None = None,
        metrics: Metrics | None = None,
        wall_clock: WallClock = _now,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0 (imds.poll_interval)")
        names = [m.name for m in monitors]
        if len(set(names)) != len(names):
            raise ValueError(f"monitor names must be unique, got {names}")
        # Spot first: it has the shortest window, so its result is handled before the others.
        self._monitors = sorted(monitors, key=lambda m: _IMPORTANCE.get(m.name, 99))
        self._interval = interval_s
        self._on_notice = on_notice
        self._on_withdrawn = on_withdrawn
        self._metrics = metrics
        self._wall = wall_clock
        #: While IMDS is down, never wait longer than this between attempts.
        self._cap_s = max(2 * interval_s, 2.0)
        self._seen: dict[str, dict[str, Notice]] = {m.name: {} for m in self._monitors}
        #: The error class name each monitor's last poll ended with (None: it answered).
        self._errors: dict[str, str | None] = {m.name: None for m in self._monitors}
        self._down_streak = 0
        self._handlers: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Poll until cancelled; IMDS errors are logged and polled through, never raised."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                await self.poll_once()
                if all(state == "ImdsUnavailable" for state in self._errors.values()):
                    self._down_streak += 1
                    delay = min(self._cap_s, self._interval * 2 ** min(self._down_streak, 16))
                    next_at = loop.time() + random.uniform(self._interval, max(self._interval, delay))
                else:
                    self._down_streak = 0
                    # Fixed cadence: the next poll is due one interval after the last was due, not after
                    # this one finished; if polls overran, start again from now instead of bursting.
                    next_at = max(next_at + self._interval, loop.time())
                await asyncio.sleep(max(0.0, next_at - loop.time()))
        finally:
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    async def poll_once(self) -> None:
        """Poll every monitor concurrently; handle each result as soon as it arrives."""
        tasks = [asyncio.ensure_future(self._poll(m)) for m in self._monitors]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _poll(self, monitor: Monitor) -> None:
        try:
            notices = await monitor.poll()
        except ImdsError as exc:
            self._failed(monitor.name, exc)
            return
        except Exception as exc:  # a monitor bug must not stop the others from being polled
            log.exception("monitor.crashed", monitor=monitor.name)
            self._failed(monitor.name, exc)
            return
        self._recovered(monitor.name)
        self._update(monitor.name, notices)

    def _failed(self, name: str, exc: Exception) -> None:
        state = type(exc).__name__
        if self._errors[name] != state:
            event = "imds.malformed" if isinstance(exc, ImdsMalformed) else "imds.down"
            log.warning(event, monitor=name, error=str(exc))
        self._errors[name] = state

    def _recovered(self, name: str) -> None:
        if self._errors[name] is not None:
            log.info("imds.recovered", monitor=name, was=self._errors[name])
            self._errors[name] = None

    def _update(self, name: str, notices: list[Notice]) -> None:
        seen = self._seen[name]
        current = {n.key: n for n in notices}
        for key, old in list(seen.items()):
            if key not in current:
                del seen[key]
                log.info("notice.withdrawn", kind=old.kind.value, action=old.action, key=key)
                if self._on_withdrawn is not None:
                    self._start(self._deliver(old, self._on_withdrawn), name=f"withdrawn:{key}")
        for key, notice in current.items():
            if key in seen:
                continue
            seen[key] = notice
            log.warning(
                "notice.detected",
                kind=notice.kind.value,
                action=notice.action,
                key=key,
                final=notice.final,
                not_after=format_time(notice.not_after) if notice.not_after else None,
                issued_at=format_time(notice.issued_at) if notice.issued_at else None,
            )
            if self._metrics is not None:
                self._metrics.notices.labels(kind=notice.kind.value, action=notice.action).inc()
            self._start(self._deliver(notice, self._on_notice), name=f"notice:{key}")

    def _start(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _deliver(self, notice: Notice, handler: Callable[[Notice], Awaitable[None]]) -> None:
        try:
            await handler(notice)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "notice.handler_failed", kind=notice.kind.value, action=notice.action, key=notice.key
            )
