"""What keeps background transfers from slowing training (issue 13 item 5): a bytes/s cap and a lower CPU
priority for the threads that run them.

:class:`RateLimit` paces BACKGROUND parts: every part reserves ``nbytes / rate`` seconds of one schedule
shared by all background threads and waits for its turn, so over any span ``t`` background transfers send
at most ``rate * t`` bytes plus one part. Credit does not build up while nothing is sent (no burst after an
idle hour). EMERGENCY transfers never see it.

:func:`lower_thread_priority` renices the calling thread (Linux: ``setpriority`` on the thread id: nice 0 by
default, below the daemon's -5; up to 19), or puts it under SCHED_IDLE. Raising a nice value needs no
privilege but lowering it back does (CAP_SYS_NICE), so a reniced thread is never handed emergency work:
background transfers run on threads of their own (:mod:`.transfer_pool`).

:class:`CoreWait` keeps the price of that in view: how much of the background threads' time went to waiting
for a core (the scheduler's run_delay). A periodic upload that a busy trainer held back says so, and the
deadline estimate leaves that waiting out (:meth:`CoreWait.share`): an emergency upload runs at the daemon's
priority, and by then the trainer has stopped to save.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Final, Literal, TypeVar

from spotd.logs import get_logger

__all__ = [
    "BACKGROUND_IDLE",
    "BACKGROUND_NICE",
    "STALLING_NICE",
    "CoreWait",
    "Niceness",
    "RateLimit",
    "lower_thread_priority",
    "thread_run_delay",
    "warn_if_stalling",
]

T = TypeVar("T")

log = get_logger("spotd.store")

#: The nice value background transfer threads run at, whatever the daemon's own: that of a trainer started
#: plainly. spotd.service runs the daemon at Nice=-5, which emergency transfers keep; background ones get no
#: more of a core than a trainer thread does. ``store.background_nice`` changes it. At 19 (CFS weight 15
#: against a nice-0 trainer's 1024) they get 1.4 % of a core the trainer wants and the trainer waits 5 %
#: of its time instead of 20 % (bench/background.py), but a nice-19 thread that holds the GIL while it
#: waits for a core holds the daemon's event loop with it: late by 1.8 s at p99 and up to 5-10 s during
#: one upload beside a busy trainer (at nice 0: 40 ms and 0.2-0.6 s), and the systemd watchdog kills the
#: daemon at 30 s.
BACKGROUND_NICE: Final = 0
#: From this nice value on (and under SCHED_IDLE) the daemon says at start that its event loop may stall.
STALLING_NICE: Final = 15

#: Instead of a nice value: the SCHED_IDLE policy, a core only when nothing else wants it (weight 3). A
#: trainer that keeps every core busy then holds periodic uploads back indefinitely.
BACKGROUND_IDLE: Final = "idle"

#: A nice value (0-19), or BACKGROUND_IDLE.
Niceness = int | Literal["idle"]


class RateLimit:
    """A bytes/s cap shared by threads: :meth:`take` blocks the calling thread until its bytes may go."""

    __slots__ = ("_clock", "_lock", "_next", "_sleep", "bytes_per_second", "granted", "waited_s")

    def __init__(
        self,
        *,
        bytes_per_second: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second={bytes_per_second}: give a rate > 0, or no RateLimit")
        self.bytes_per_second = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0  # when the schedule is free again (clock seconds)
        self.granted = 0  # bytes let through so far
        self.waited_s = 0.0  # seconds threads spent waiting here, summed over threads

    def take(self, nbytes: int) -> float:
        """Wait until ``nbytes`` fit under the cap; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + nbytes / self.bytes_per_second
            self.granted += nbytes
            wait = start - now
            self.waited_s += wait
        if wait > 0:
            self._sleep(wait)
        return wait


def warn_if_stalling(nice: Niceness) -> bool:
    """Say (a warning) when ``store.background_nice`` is one that can hold the daemon's event loop: a
    background thread at nice 15-19 or under SCHED_IDLE that holds the GIL while a busy trainer has its core
    keeps every other thread of the daemon waiting. True when it said so. The daemon calls it at start."""
    if nice != BACKGROUND_IDLE and int(nice) < STALLING_NICE:
        return False
    log.warning(
        "store.background_nice_stalls",
        background_nice=nice,
        note="a background thread this nice that holds the GIL while a busy trainer has its core holds the "
        "daemon's event loop with it (seconds late at a notice; the watchdog kills the daemon past 30 s)",
        fix='to spread periodic uploads without that, set store.background_rate (e.g. "20MB") and leave '
        "store.background_nice at 0",
    )
    return True


_warned = False


def lower_thread_priority(nice: Niceness | None = BACKGROUND_NICE) -> bool:
    """Lower the calling thread's CPU priority to nice value ``nice`` (never raise it: a thread already
    nicer stays), or with BACKGROUND_IDLE put it under SCHED_IDLE; None leaves it. False where nothing
    changed or it is not possible (not Linux, or refused; said once in the log). Call it on the thread
    itself (an executor initializer)."""
    global _warned
    if sys.platform != "linux" or nice is None:
        return False
    tid = threading.get_native_id()
    try:
        if nice == BACKGROUND_IDLE:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return True
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current >= nice:
            return False
        os.setpriority(os.PRIO_PROCESS, tid, min(19, int(nice)))
    except OSError as exc:
        if not _warned:
            _warned = True
            log.warning(
                "store.background_nice_failed",
                error=str(exc),
                note="background transfers run at the daemon's own CPU priority",
            )
        return False
    return True


def thread_run_delay() -> float | None:
    """Seconds the calling thread has spent runnable but without a core: run_delay, the second field of
    ``/proc/thread-self/schedstat`` (kept whether or not the schedstats sysctl is on). None where there is
    no such file (not Linux, or a kernel built without it)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class CoreWait:
    """Wall seconds of calls run through :meth:`timed` and the part of them their threads spent waiting for
    a core, summed over threads. Thread-safe."""

    __slots__ = ("_lock", "busy_s", "waited_s")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy_s = 0.0
        self.waited_s = 0.0

    def timed(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the calling thread, its wall time and run-queue wait added to the totals."""
        t0, d0 = time.monotonic(), thread_run_delay()
        try:
            return fn()
        finally:
            d1 = thread_run_delay()
            wall = time.monotonic() - t0
            waited = 0.0 if d0 is None or d1 is None else min(max(d1 - d0, 0.0), wall)
            with self._lock:
                self.busy_s += wall
                self.waited_s += waited

    def totals(self) -> tuple[float, float]:
        """(busy, waited) seconds so far; two of them give :meth:`share` over the span between."""
        with self._lock:
            return self.busy_s, self.waited_s

    @staticmethod
    def share(before: tuple[float, float], after: tuple[float, float]) -> float:
        """The share of the threads' time between two :meth:`totals` that went to waiting for a core."""
        busy = after[0] - before[0]
        return 0.0 if busy <= 0 else min(1.0, max(0.0, (after[1] - before[1]) / busy))
