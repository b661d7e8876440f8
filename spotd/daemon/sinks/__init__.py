"""Sinks: what else hears about a session besides the log line. One typed value
(:class:`~spotd.events.SessionEvent`, carrying the :class:`~spotd.events.InterruptionRecord` at an episode's
end), many consumers: the job ledger (:mod:`.ledger`), the webhook (:mod:`.webhook`), the job metrics.

:class:`Sinks` is what the coordinator and the app call: :meth:`Sinks.emit` never waits (each sink has its own
bounded queue and worker task), so a slow store or a webhook that never answers cannot delay the emergency
path; at shutdown :meth:`Sinks.close` gives the queues a deadline, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from spotd.events import SessionEvent, SessionEventKind
from spotd.logs import get_logger

__all__ = ["QUEUE_SIZE", "Sink", "Sinks"]

log = get_logger("spotd.sinks")

#: Events one sink may fall behind by; beyond it the oldest is dropped (and logged), never the caller held.
QUEUE_SIZE: Final = 512


class Sink(Protocol):
    """One consumer of session events. ``handle`` runs in the sink's own task, one event at a time, in
    order; it may take its time (retries, timeouts) but must return or raise, and never block the loop."""

    name: str

    async def handle(self, event: SessionEvent) -> None: ...
    def dropped(self, event: SessionEvent) -> None:
        """``event`` will never be handled (the queue overflowed, or shutdown came first): count it."""

    async def close(self) -> None: ...


class Sinks:
    """Fans events out to sinks; ``emit`` from anywhere on the loop, ``close`` once at shutdown."""

    __slots__ = ("_closed", "_queues", "_sinks", "_workers")

    def __init__(self, *, sinks: Sequence[Sink] = ()) -> None:
        self._sinks = list(sinks)
        self._queues: dict[str, asyncio.Queue[SessionEvent]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for sink in self._sinks:
            queue: asyncio.Queue[SessionEvent] = asyncio.Queue(QUEUE_SIZE)
            self._queues[sink.name] = queue
            self._workers.append(loop.create_task(self._work(sink, queue), name=f"sink-{sink.name}"))

    def emit(self, kind: SessionEventKind, /, *, at: datetime | None = None, **data: Any) -> SessionEvent:
        """Queue an event for every sink; returns it. Never waits, never raises for a sink's sake."""
        record = data.pop("record", None)
        event = SessionEvent(kind=kind, at=at or datetime.now(UTC), data=data, record=record)
        self.put(event)
        return event

    def put(self, event: SessionEvent) -> None:
        if self._closed or not self._sinks:
            return
        if not self._workers:
            self._start()
        for name, queue in self._queues.items():
            if queue.full():
                dropped = queue.get_nowait()
                queue.task_done()
                self._drop(name, dropped, why="queue full")
            queue.put_nowait(event)

    def _drop(self, name: str, event: SessionEvent, *, why: str) -> None:
        log.warning("sink.dropped", sink=name, kind=event.kind.value, why=why)
        sink = next(s for s in self._sinks if s.name == name)
        try:
            sink.dropped(event)
        except Exception as exc:
            log.warning("sink.failed", sink=name, hook="dropped", error=repr(exc))

    async def _work(self, sink: Sink, queue: asyncio.Queue[SessionEvent]) -> None:
        while True:
            event = await queue.get()
            try:
                await sink.handle(event)
            except Exception as exc:
                log.error("sink.failed", sink=sink.name, kind=event.kind.value, error=repr(exc))
            finally:
                queue.task_done()

    async def flush(self, *, timeout_s: float) -> bool:
        """Wait until every queued event was handled, at most ``timeout_s``; True if all were."""
        if not self._queues:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(q.join() for q in self._queues.values()))
        except TimeoutError:
            return False
        return True

    async def close(self, *, grace_s: float) -> None:
        """Handle what is queued within ``grace_s``, then cancel the rest and close every sink."""
        if self._closed:
            return
        done = await self.flush(timeout_s=grace_s)
        self._closed = True
        if not done:
            left = {name: q.qsize() for name, q in self._queues.items()}
            log.warning("sink.unflushed", grace_seconds=grace_s, left=left)
            for name, queue in self._queues.items():
                while not queue.empty():
                    self._drop(name, queue.get_nowait(), why="shutdown")
                    queue.task_done()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sink in self._sinks:
            try:
                await sink.close()
            except Exception as exc:
                log.warning("sink.close_failed", sink=sink.name, error=repr(exc))
