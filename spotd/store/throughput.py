"""The store's own upload throughput: bytes/s of each background commit, a moving median.

What a request's deadline is measured against (issue 13 item 4): :meth:`Throughput.estimate` says how long
``n`` bytes would take to send at the rate the recent periodic uploads reached. A median, not a mean: one
commit slowed by a busy disk or a throttled S3 prefix does not swing it; a window, not the whole run: the
rate follows a change of instance type or network.

Each upload also brings the share of its transfer threads' time spent waiting for a core
(:class:`~spotd.store.pacing.CoreWait`): the time it is measured over leaves that share out, and
:meth:`Throughput.core_wait` (the window's median) says how held back the uploads the rate comes from were.

An upload held back to give a busy trainer its cores (``store.yield_to_trainer``) measured the trainer's
appetite, not the wire: it is kept, but the rate comes from the window's other uploads while there are any
(:meth:`Throughput.held` says when there are none).
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Final

__all__ = ["HELD_SHARE", "MIN_BYTES", "WINDOW", "Throughput"]

#: Commits whose rate makes the median.
WINDOW: Final = 9
#: A commit that sent less than this is not measured: per-request latency, not bandwidth, sets its time.
MIN_BYTES: Final = 8 * 1024 * 1024
#: An upload whose transfer threads were held back this share of their time or more to give the trainers
#: their cores is a held sample.
HELD_SHARE: Final = 0.1


class Throughput:
    """Moving median of bytes/s over the last :data:`WINDOW` measured uploads. Not thread-safe (the event
    loop records and reads it)."""

    __slots__ = ("_min_bytes", "_samples")

    def __init__(self, *, window: int = WINDOW, min_bytes: int = MIN_BYTES) -> None:
        self._samples: deque[tuple[float, float, bool]] = deque(maxlen=window)  # (rate, core_wait, held)
        self._min_bytes = min_bytes

    def record(self, nbytes: int, seconds: float, core_wait: float = 0.0, *, held: bool = False) -> bool:
        """One upload of ``nbytes`` that took ``seconds``, its threads waiting for a core a ``core_wait``
        share of their time (left out of the time: the rate is ``nbytes / (seconds * (1 - core_wait))``);
        ``held``: held back to give the trainers their cores. False when too small (or instant) to
        measure."""
        seconds *= 1.0 - min(max(core_wait, 0.0), 1.0)
        if nbytes < self._min_bytes or seconds <= 0:
            return False
        self._samples.append((nbytes / seconds, core_wait, held))
        return True

    def _used(self) -> list[tuple[float, float, bool]]:
        """The samples the rate comes from: those not held back while there are any."""
        free = [s for s in self._samples if not s[2]]
        return free or list(self._samples)

    def core_wait(self) -> float | None:
        """The median share of their time the uploads the rate comes from waited for a core; None before
        the first."""
        used = self._used()
        return statistics.median(s[1] for s in used) if used else None

    def held(self) -> bool:
        """Every upload in the window was held back for the trainers: the rate is theirs, not the wire's."""
        return bool(self._samples) and all(s[2] for s in self._samples)

    @property
    def samples(self) -> int:
        return len(self._samples)

    def bytes_per_second(self) -> float | None:
        """The median rate, or None before the first measured upload."""
        used = self._used()
        return statistics.median(s[0] for s in used) if used else None

    def estimate(self, nbytes: int) -> float | None:
        """Seconds ``nbytes`` would take at the median rate; None while nothing has been measured."""
        rate = self.bytes_per_second()
        if rate is None:
            return None
        return nbytes / rate
