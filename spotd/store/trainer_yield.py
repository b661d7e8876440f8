"""Periodic uploads that give way to the trainer (issue 13 item 5): ``store.yield_to_trainer``.

A nice value cannot do it alone. At nice 0 a periodic upload slows a one-core trainer by ~25 %; at nice 19
a background thread that holds the GIL while the trainer has its core holds the daemon's event loop with it
(bench/background.py). A fixed ``store.background_rate`` slows every upload, even on an instance whose
trainer leaves cores idle.

So the daemon watches the trainers themselves. Their pids are known (SO_PEERCRED, one per connected
trainer), and the scheduler counts, for every thread, the time it ran and the time it was runnable without
a core: ``/proc/<pid>/task/<tid>/schedstat``. :func:`trainer_cpu` sums them over the threads of each
trainer process and of its children (DataLoader workers). The *wait share* of an interval is the part of a
process's runnable time spent waiting (of the interval, for one that mostly sleeps). A process that waited
a share ``b`` alone and ``s`` beside an upload ran ``(1 - b) / (1 - s)`` times slower
(:func:`allowed_wait`); each is held to that against its own ``b``, and the most held-back one sets the
window.

:class:`TrainerYield` sets how many background parts may be in flight, as TCP sets its congestion window,
with that wait as the congestion signal:

* An upload starts at :data:`LEVEL_START` (one part in flight half the time), and each process's ``b`` is
  its wait share since the previous upload ended.
* Every :data:`INTERVAL_S` (checked as parts finish) the window shrinks if the trainers were slowed by
  more than ``slowdown`` (5 % by default). The wait they add grows with the share of the time parts run,
  so the cut aims at three quarters of the allowed wait at once: at least halved, at most to an eighth.
  The window grows by half if they were slowed by less than half the allowance (doubles under a
  quarter, quadruples under a tenth), up to every transfer slot. A trainer that is hardly runnable
  (waiting on its GPU) is not slowed.
* Below one part in flight, parts are spaced out: after a part that took ``t``, the next starts
  ``t * (1/level - 1)`` later (at most :data:`MAX_GAP_S`). Down to :data:`LEVEL_MIN` (one part in 32 of
  the time): a periodic upload still gets through beside a trainer that keeps every core busy.

The bytes go out as they would without it, only later. Emergency transfers never see it (they do not run
on background threads), and with no trainer connected nothing is held.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from spotd.logs import get_logger

__all__ = [
    "INTERVAL_S",
    "LEVEL_MIN",
    "LEVEL_START",
    "YIELD_SLOWDOWN",
    "TrainerYield",
    "allowed_wait",
    "trainer_cpu",
    "trainer_processes",
]

log = get_logger("spotd.store")

#: The default ``store.yield_to_trainer``: how much slower periodic uploads may make a trainer.
YIELD_SLOWDOWN: Final = 0.05
#: Parts in flight when an upload starts: one, half the time (the first interval, before anything is
#: known, is the one most likely to slow the trainer).
LEVEL_START: Final = 0.5
#: The lowest level: one part in flight 1/32 of the time.
LEVEL_MIN: Final = 1 / 32
#: How often the window is set again, at the least (it is set as parts finish).
INTERVAL_S: Final = 0.5
#: No background part in flight or waiting for this long: the next one starts a new upload (slow start,
#: and the trainers' wait since then is their wait alone).
IDLE_S: Final = 1.0
#: The longest gap between parts at a level below one.
MAX_GAP_S: Final = 10.0
#: The most of one core reading the trainers' threads may take while an upload runs (the interval grows).
READ_SHARE: Final = 0.02
#: Trainers runnable less than this share of an interval (waiting on a GPU, on I/O) are not slowed by it.
RUNNABLE_MIN: Final = 0.02
#: The growth of the window per interval (fast: the trainer hardly slowed; idle: not at all, e.g. waiting
#: on its GPU, where a slow start would only delay the upload), the share of the allowed wait a cut aims
#: at, and the least and most it is cut by.
_GROW: Final = 1.5
_GROW_FAST: Final = 2.0
_GROW_IDLE: Final = 4.0
_TARGET: Final = 0.75
_CUT_LEAST: Final = 0.5
_CUT_MOST: Final = 0.125
#: A thread waiting for the window looks again at least this often (it is woken whenever it changes).
_POLL_S: Final = 1.0

#: Seconds each trainer process's threads ran and waited for a core, by pid; None where none can be read.
CpuReader = Callable[[Iterable[int]], "dict[int, tuple[float, float]] | None"]
#: The processes to read of the trainers named: themselves and their descendants.
Family = Callable[[Iterable[int]], list[int]]


def _read_small(path: str) -> bytes | None:
    # os.open/os.read: a few microseconds where open() costs tens, read for every trainer thread.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 256)
    except OSError:
        return None
    finally:
        os.close(fd)


def trainer_processes(pids: Iterable[int]) -> list[int]:
    """``pids`` and their descendants (DataLoader workers, from ``/proc/<pid>/task/<tid>/children``) that
    exist now, never this process."""
    out: list[int] = []
    seen = {os.getpid()}
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        out.append(pid)
        for tid in tids:
            children = _read_small(f"/proc/{pid}/task/{tid}/children")
            if children:
                todo.extend(int(c) for c in children.split() if c.isdigit())
    return out


def trainer_cpu(procs: Iterable[int]) -> dict[int, tuple[float, float]] | None:
    """By pid, of ``procs`` (:func:`trainer_processes`): (ran, waited), the seconds its threads spent on a
    core and runnable without one, summed (``/proc/<pid>/task/<tid>/schedstat``). A process or thread
    that is gone is skipped; None when nothing could be read (no such pid, or a kernel without schedstat).
    Eight ranks of 60 threads with eight 10-thread workers each (1,200 threads) take ~10 ms."""
    out: dict[int, tuple[float, float]] = {}
    for pid in procs:
        base = f"/proc/{pid}/task"
        try:
            tids = os.listdir(base)
        except OSError:
            continue
        ran = waited = 0
        found = False
        for tid in tids:
            raw = _read_small(f"{base}/{tid}/schedstat")
            fields = raw.split() if raw else []
            if len(fields) < 2:
                continue
            found = True
            ran += int(fields[0])
            waited += int(fields[1])
        if found:
            out[pid] = (ran / 1e9, waited / 1e9)
    return out or None


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    procs: dict[int, tuple[float, float]]


def _wait_shares(a: _Sample, b: _Sample) -> dict[int, float]:
    """Each trainer process's wait share between two samples: seconds waited over seconds runnable (or over
    the span, if that is longer), of those runnable enough to be slowed (a process hardly runnable, waiting
    on its GPU or on I/O, is not; nor one that came or went in between)."""
    span = b.at - a.at
    out: dict[int, float] = {}
    if span <= 0:
        return out
    for pid, (ran1, waited1) in b.procs.items():
        if pid not in a.procs:
            continue
        ran0, waited0 = a.procs[pid]
        ran, waited = max(0.0, ran1 - ran0), max(0.0, waited1 - waited0)
        if ran + waited >= RUNNABLE_MIN * span:
            # Of its runnable time, but never of less than the span: a process that mostly sleeps (on its
            # GPU) and waits a little at each wake-up is slowed by that wait over the span, not over its
            # few milliseconds of running.
            out[pid] = waited / max(span, ran + waited)
    return out


def allowed_wait(alone: float, slowdown: float) -> float:
    """The wait share of a process that waited ``alone`` without an upload at which it runs ``slowdown``
    slower: its progress is ``1 - share``, so ``(1 - alone) / (1 - share) = 1 + slowdown``."""
    return 1.0 - (1.0 - alone) / (1.0 + slowdown)


class TrainerYield:
    """The window of background parts in flight, set from the trainers' wait for a core (see the module).
    :meth:`enter` and :meth:`exit` run on the transfer threads around each part, :meth:`refresh` on one of
    them; :meth:`trainers` on the event loop. Thread-safe."""

    __slots__ = (
        "_baseline",
        "_clock",
        "_closed",
        "_cond",
        "_family",
        "_idle_mark",
        "_idle_since",
        "_in_flight",
        "_limit",
        "_mark",
        "_pids",
        "_procs",
        "_read",
        "_read_s",
        "_resume_at",
        "_unreadable",
        "_waiting",
        "cuts",
        "level",
        "pressure",
        "slowdown",
        "yielded_s",
    )

    def __init__(
        self,
        *,
        slowdown: float,
        limit: int,
        read: CpuReader = trainer_cpu,
        family: Family = trainer_processes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < slowdown < 1:
            raise ValueError(f"slowdown={slowdown}: give a share between 0 and 1, or no TrainerYield")
        self.slowdown = slowdown
        self._limit = max(1, limit)
        self._read = read
        self._family = family
        self._read_s = 0.0  # how long the last sample took to read
        self._clock = clock
        self._cond = threading.Condition()
        self._pids: frozenset[int] = frozenset()
        self._procs: list[int] = []  # the trainers and their descendants, as of the upload's start
        self._in_flight = 0
        self._waiting = 0
        self._resume_at = 0.0
        self._mark: _Sample | None = None  # start of the interval being measured
        self._idle_mark: _Sample | None = None  # when the last upload ended (or the trainers changed)
        self._idle_since: float | None = None
        self._baseline: dict[int, float] = {}
        self._closed = False
        self._unreadable = False
        #: Parts in flight allowed now (below 1: the share of the time one part is).
        self.level = float(self._limit)
        #: Of the last interval measured: the most any trainer process waited beyond its wait alone, as a
        #: share of what it may (above 1: slowed more than ``slowdown``); None before one.
        self.pressure: float | None = None
        #: Times the window was cut; seconds transfer threads waited here, summed over threads.
        self.cuts = 0
        self.yielded_s = 0.0

    # ---- the event loop

    def trainers(self, pids: Iterable[int]) -> bool:
        """The trainers to give way to now (their pids); none: nothing is held. True when they changed:
        then :meth:`refresh` them, off the event loop."""
        new = frozenset(pids)
        with self._cond:
            if new == self._pids:
                return False
            self._pids = new
            self._procs = []
            log.info("store.yielding_to", pids=sorted(new), slowdown=self.slowdown)
            self._mark = self._idle_mark = None
            if not new:
                self.level = float(self._limit)
                self._resume_at = 0.0
            self._cond.notify_all()
            return True

    def refresh(self) -> None:
        """Find the trainers' processes and start measuring their wait alone (blocking: it reads /proc, tens
        of milliseconds for a large job; a transfer thread runs it)."""
        with self._cond:
            if not self._pids or self._closed:
                return
            self._procs = self._family(self._pids)
            if self._in_flight + self._waiting == 0:
                self._idle_mark = self._sample()

    def close(self) -> None:
        """Hold nothing from now on (the pool is shutting down)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def view(self) -> dict[str, Any]:
        """For ``spotd status``: whom periodic parts give way to, and the window now (``window``: parts in
        flight allowed, below 1 the share of the time one part is; ``slots``: every transfer slot)."""
        with self._cond:
            return {
                "trainers": sorted(self._pids),
                "slowdown": self.slowdown,
                "window": round(self.level, 3),
                "slots": self._limit,
                "pressure": None if self.pressure is None else round(self.pressure, 2),
                "cuts": self.cuts,
                "unreadable": self._unreadable,
            }

    @property
    def baseline(self) -> dict[int, float]:
        """Each trainer process's wait share before the current (or last) upload started, by pid."""
        return dict(self._baseline)

    @property
    def resume_at(self) -> float:
        """When the next part may start, at a level below one (clock seconds; 0: at once)."""
        return self._resume_at

    @property
    def waiting(self) -> int:
        """Parts waiting to be let in now."""
        return self._waiting

    # ---- the transfer threads

    def enter(self) -> float:
        """Wait until one more part may be in flight; returns when it was let in (for :meth:`exit`)."""
        with self._cond:
            now = self._clock()
            if not self._pids or self._closed:
                self._in_flight += 1
                return now
            # Idle since the last part, and since the gap after it: a new upload.
            if self._in_flight + self._waiting == 0 and (
                self._idle_since is None or now - max(self._idle_since, self._resume_at) >= IDLE_S
            ):
                self._begin(now)
            asked = now
            self._waiting += 1
            try:
                while self._pids and not self._closed:
                    if self._in_flight < max(1, int(self.level)) and now >= self._resume_at:
                        break
                    timeout = _POLL_S
                    if self._in_flight < max(1, int(self.level)):
                        timeout = min(timeout, self._resume_at - now)
                    self._cond.wait(timeout=max(timeout, 0.001))
                    now = self._clock()
            finally:
                self._waiting -= 1
            self._in_flight += 1
            self.yielded_s += now - asked
            return now

    def exit(self, started: float) -> None:
        """The part let in at ``started`` is done (sent or failed)."""
        with self._cond:
            now = self._clock()
            self._in_flight -= 1
            if self._pids and not self._closed:
                self._decide(now)
                if self.level < 1:
                    gap = min(MAX_GAP_S, (now - started) * (1.0 / self.level - 1.0))
                    self._resume_at = max(self._resume_at, now + gap)
            if self._in_flight + self._waiting == 0:
                self._idle_since = now
                if self._pids:
                    self._idle_mark = self._sample(now)
            self._cond.notify_all()

    # ---- the window (called holding the lock)

    def _sample(self, now: float | None = None) -> _Sample | None:
        started = time.perf_counter()
        got = self._read(self._procs)
        self._read_s = time.perf_counter() - started
        if got is None:
            if not self._unreadable:
                self._unreadable = True
                log.warning(
                    "store.yield_unreadable",
                    pids=sorted(self._pids),
                    note="the trainers' CPU wait cannot be read (/proc/<pid>/task/*/schedstat): periodic "
                    "uploads do not give way to them",
                    fix="run the daemon where it sees the trainers' /proc (the same PID namespace), or set "
                    'store.background_rate (e.g. "20MB") to spread periodic uploads',
                )
            return None
        return _Sample(self._clock() if now is None else now, got)

    def _begin(self, now: float) -> None:
        self._procs = self._family(self._pids)  # DataLoader workers come and go between uploads
        sample = self._sample(now)
        if sample is None:
            self.level = float(self._limit)
            return
        if self._idle_mark is not None and sample.at - self._idle_mark.at >= IDLE_S:
            self._baseline = _wait_shares(self._idle_mark, sample)
        self.level = min(LEVEL_START, float(self._limit))
        self._resume_at = 0.0
        self._mark = sample

    def _decide(self, now: float) -> None:
        # Reading many trainer threads is not free: no more than 1/READ_SHARE of the time goes to it.
        if self._mark is None or now - self._mark.at < max(INTERVAL_S, self._read_s / READ_SHARE):
            return
        sample = self._sample(now)
        if sample is None:
            self.level = float(self._limit)
            return
        pressure = 0.0
        for pid, share in _wait_shares(self._mark, sample).items():
            alone = self._baseline.get(pid, 0.0)
            room = allowed_wait(alone, self.slowdown) - alone
            if room > 0:
                pressure = max(pressure, (share - alone) / room)
        self._mark = sample
        self.pressure = pressure
        if pressure > 1:
            # The trainer's wait grows with the share of the time parts run: aim below the limit at once.
            cut = min(_CUT_LEAST, max(_CUT_MOST, _TARGET / pressure))
            self.level = max(LEVEL_MIN, self.level * cut)
            self.cuts += 1
        elif pressure < 0.5:
            grow = _GROW_IDLE if pressure < 0.1 else _GROW_FAST if pressure < 0.25 else _GROW
            self.level = min(float(self._limit), self.level * grow)
            if self.level >= 1:
                self._resume_at = 0.0
