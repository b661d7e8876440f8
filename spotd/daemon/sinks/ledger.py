"""The ledger sink: this session's events become records in the job ledger (:mod:`spotd.store.ledger`).

Writes are in order, one at a time, each retried a few times with backoff; a record that still cannot be
written is counted (``spotd_ledger_write_failures_total``) and logged, and the daemon goes on: the ledger is
the job's memory, not a reason to stop protecting the checkpoint. The records built this session stay in
memory too, so the daemon's own view (budgets, job metrics) does not depend on reading them back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

from spotd.errors import StoreError
from spotd.events import SessionEvent, SessionEventKind
from spotd.logs import get_logger
from spotd.metrics import Metrics
from spotd.store.history import HEARTBEAT_S
from spotd.store.ledger import LedgerRecord, LedgerView, SessionWriter

__all__ = ["LEDGER_ATTEMPTS", "LedgerSink"]

log = get_logger("spotd.ledger")

#: Tries of one record write (each a store request botocore retries on its own).
LEDGER_ATTEMPTS: Final = 3
_BACKOFF_S: Final = 0.5


class LedgerSink:
    """:class:`~spotd.daemon.sinks.Sink` writing one session's records."""

    __slots__ = ("_clock", "_metrics", "_sleep", "_writer", "name", "records")

    def __init__(
        self,
        *,
        writer: SessionWriter,
        metrics: Metrics,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = "ledger"
        self._writer = writer
        self._metrics = metrics
        self._clock = wall
        self._sleep = sleep
        #: Every record of this session so far, written or not, oldest first.
        self.records: list[LedgerRecord] = []

    @property
    def session(self) -> str:
        return self._writer.session

    def view(self, prior: LedgerView) -> LedgerView:
        """``prior`` (read at boot) with this session's records, as if read back now."""
        mine = [r for r in prior.records if r.session != self.session]
        beats = {k: v for k, v in prior.heartbeats.items() if k != self.session}
        return LedgerView(
            job_id=prior.job_id,
            records=(*mine, *self.records),
            heartbeats={**beats, self.session: self._clock()},
            end=prior.end,
            unreadable=prior.unreadable,
        )

    async def handle(self, event: SessionEvent) -> None:
        record = self._writer.record(event.kind, event.at, _data(event))
        self.records.append(record)
        await self._retried(f"record {record.seq} ({record.event})", lambda: self._writer.write(record))

    async def _retried(self, what: str, write: Callable[[], Awaitable[Any]]) -> bool:
        for attempt in range(1, LEDGER_ATTEMPTS + 1):
            try:
                await write()
                return True
            except (StoreError, OSError) as exc:
                if attempt == LEDGER_ATTEMPTS:
                    self._metrics.ledger_write_failures.inc()
                    log.error(
                        "ledger.write_failed",
                        what=what,
                        session=self.session,
                        attempts=attempt,
                        error=str(exc),
                        fix="check the store (the same permissions as checkpoints); the daemon goes on",
                    )
                    return False
                await self._sleep(_BACKOFF_S * 2 ** (attempt - 1))
        return False  # pragma: no cover

    async def heartbeats(self, *, interval_s: float = HEARTBEAT_S) -> None:
        """Rewrite the session's heartbeat every ``interval_s`` until cancelled: how long a session that
        dies without a word lasted."""
        while True:
            await self._retried("heartbeat", lambda: self._writer.heartbeat(self._clock()))
            await self._sleep(interval_s)

    def dropped(self, event: SessionEvent) -> None:
        self._metrics.ledger_write_failures.inc()

    async def close(self) -> None:
        return None


def _data(event: SessionEvent) -> dict[str, Any]:
    if event.kind is SessionEventKind.INTERRUPTION and event.record is not None:
        return {**event.record.to_dict(), **event.data}
    return dict(event.data)
