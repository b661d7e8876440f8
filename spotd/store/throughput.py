"""The store's own upload throughput: bytes/s of each background commit, a moving median.

What a request's deadline is measured against (issue 13 item 4): :meth:`Throughput.estimate` says how long
``n`` bytes would take to send at the rate the recent periodic uploads reached. A median, not a mean: one
commit slowed by a busy disk or a throttled S3 prefix does not swing it; a window, not the whole run: the
rate follows a change of instance type or network.

Each upload also brings the share of its transfer threads' time spent waiting for a core
(:class:`~spotd.store.pacing.CoreWait`): the time it is measured over leaves that share out, and
:meth:`Throughput.core_wait` (the window's median) says how held back the uploads the rate comes from were.
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

    __slots__ = ("_min_bytes", "_rates", "_waits")

    def __init__(self, *, window: int = WINDOW, min_bytes: int = MIN_BYTES) -> None:
        self._rates: deque[float] = deque(maxlen=window)
        self._waits: deque[float] = deque(maxlen=window)
        self._min_bytes = min_bytes

    def record(self, nbytes: int, seconds: float, core_wait: float = 0.0) -> bool:
        """One upload of ``nbytes`` that took ``seconds``, its threads waiting for a core a ``core_wait``
        share of their time (left out of the time: the rate is ``nbytes / (seconds * (1 - core_wait))``);
        False when too small (or instant) to measure."""
        seconds *= 1.0 - min(max(core_wait, 0.0), 1.0)
        if nbytes < self._min_bytes or seconds <= 0:
            return False
        self._rates.append(nbytes / seconds)
        self._waits.append(core_wait)
        return True

    def core_wait(self) -> float | None:
        """The median share of their time the measured uploads' threads waited for a core; None before
        the first."""
        return statistics.median(self._waits) if self._waits else None

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
