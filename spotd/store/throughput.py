"""The store's own upload throughput: bytes/s of each background commit, a moving median.

What a request's deadline is measured against (issue 13 item 4): :meth:`Throughput.estimate` says how long
``n`` bytes would take to send at the rate the recent periodic uploads reached. A median, not a mean: one
commit slowed by a busy disk or a throttled S3 prefix does not swing it; a window, not the whole run: the
rate follows a change of instance type or network.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Final

__all__ = ["MIN_BYTES", "WINDOW", "Throughput"]

#: Commits whose rate makes the median.
WINDOW: Final = 9
#: A commit that sent less than this is not measured: per-request latency, not bandwidth, sets its time.
MIN_BYTES: Final = 8 * 1024 * 1024


class Throughput:
    """Moving median of bytes/s over the last :data:`WINDOW` measured uploads. Not thread-safe (the event
    loop records and reads it)."""

    __slots__ = ("_min_bytes", "_rates")

    def __init__(self, *, window: int = WINDOW, min_bytes: int = MIN_BYTES) -> None:
        self._rates: deque[float] = deque(maxlen=window)
        self._min_bytes = min_bytes

    def record(self, nbytes: int, seconds: float) -> bool:
        """One upload of ``nbytes`` that took ``seconds``; False when too small (or instant) to measure."""
        if nbytes < self._min_bytes or seconds <= 0:
            return False
        self._rates.append(nbytes / seconds)
        return True

    @property
    def samples(self) -> int:
        return len(self._rates)

    def bytes_per_second(self) -> float | None:
        """The median rate, or None before the first measured upload."""
        return statistics.median(self._rates) if self._rates else None

    def estimate(self, nbytes: int) -> float | None:
        """Seconds ``nbytes`` would take at the median rate; None while nothing has been measured."""
        rate = self.bytes_per_second()
        if rate is None:
            return None
        return nbytes / rate
