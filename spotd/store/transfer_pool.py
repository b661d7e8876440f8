"""Slots for blocking transfers, with priorities, and the threads they run on.

While an EMERGENCY transfer runs, BACKGROUND transfers are not started (those already in flight finish, at
most one part's time); a background upload resumes with its next part afterwards, nothing is sent twice.
Emergency transfers have their own slots, so they never wait behind background ones.

The two classes also run on threads of their own. Background threads are reniced once, when they start
(:func:`~spotd.store.pacing.lower_thread_priority`). Before each part they are held to the window that
:class:`~spotd.store.trainer_yield.TrainerYield` sets from the trainers' own wait for a core, and paced by
``background_rate`` (:class:`~spotd.store.pacing.RateLimit`): hashing and sending a periodic checkpoint
give the training process the cores it wants. An emergency transfer never lands on one of those threads
(an unprivileged thread cannot get its priority back), and is never held or paced. How long background
transfers waited for a core is counted (:class:`~spotd.store.pacing.CoreWait`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from spotd.store.api import Priority
from spotd.store.pacing import BACKGROUND_NICE, CoreWait, Niceness, RateLimit, lower_thread_priority
from spotd.store.tasks import settle_on_cancel
from spotd.store.trainer_yield import TrainerYield

__all__ = ["EARLY_PARTS_PER_CORE", "TransferPool", "early_parts"]

T = TypeVar("T")


#: Transfers at once while a checkpoint is still being written (the parts of a growing file, the closed
#: files of a directory), per core (see :func:`early_parts`).
EARLY_PARTS_PER_CORE: Final = 0.5


def early_parts(limit: int, cores: int | None = None) -> int:
    """Transfers in flight while a checkpoint is still being written: half a part per core, at least 2, at
    most the pool's ``limit``. Sending competes with the writer for the CPU (reading, CRC, HTTP; and on a
    test box, the S3 server itself); the rest is sent at full concurrency once the trainer says ``saved``."""
    n = int((cores or os.cpu_count() or 2) * EARLY_PARTS_PER_CORE)
    return max(1, min(limit, max(2, n)))


class TransferPool:
    """Transfer slots with priorities, and the threads the transfers run on: emergency parts use their own
    ``limit`` slots and threads; background parts share what is left, start none while an emergency runs,
    and run on ``limit`` threads of their own, reniced to ``background_nice``, paced by ``background_rate``
    (bytes/s, None: no cap) and, with ``yield_to_trainer`` (the slowdown a trainer may see; None: no
    yielding), held to the window :attr:`yielding` sets. The slot bookkeeping is single-threaded (event loop
    only)."""

    __slots__ = (
        "_bg",
        "_bg_threads",
        "_em",
        "_em_threads",
        "_limit",
        "_waiters",
        "core_wait",
        "emergencies",
        "pace",
        "pauses",
        "yielding",
    )

    def __init__(
        self,
        *,
        limit: int,
        thread_name: str = "spotd-transfer",
        background_rate: int | None = None,
        background_nice: Niceness | None = BACKGROUND_NICE,
        yield_to_trainer: float | None = None,
    ) -> None:
        self._limit = limit
        self._em = 0
        self._bg = 0
        self._waiters: list[asyncio.Future[None]] = []
        # Both priority classes can be in flight at once (an emergency does not wait for background parts).
        self._em_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=limit, thread_name_prefix=thread_name
        )
        self._bg_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=limit,
            thread_name_prefix=f"{thread_name}-bg",
            initializer=lower_thread_priority,
            initargs=(background_nice,),
        )
        #: The background cap (None: none); its ``granted`` counts the bytes it let through.
        self.pace = None if background_rate is None else RateLimit(bytes_per_second=background_rate)
        #: The window of background parts the trainers' wait for a core sets (None: not yielding); the
        #: daemon tells it who the trainers are.
        self.yielding = None if not yield_to_trainer else TrainerYield(slowdown=yield_to_trainer, limit=limit)
        #: Background transfers' wall time and the part of it their threads waited for a core.
        self.core_wait = CoreWait()
        self.emergencies = 0
        self.pauses = 0  # background parts held back by an emergency (tests, status)

    @property
    def background_in_flight(self) -> int:
        """Background transfers running now (an emergency lets them finish)."""
        return self._bg

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def _acquire(self, priority: Priority) -> None:
        if priority is Priority.EMERGENCY:
            while self._em >= self._limit:
                await self._wait()
            self._em += 1
            return
        paused = False
        while self.emergencies or self._em + self._bg >= self._limit:
            if self.emergencies and not paused:
                paused = True
                self.pauses += 1
            await self._wait()
        self._bg += 1

    def _release(self, priority: Priority) -> None:
        if priority is Priority.EMERGENCY:
            self._em -= 1
        else:
            self._bg -= 1
        self._notify()

    async def run(
        self,
        priority: Priority,
        fn: Callable[[], T],
        *,
        nbytes: int = 0,
        stop: threading.Event | None = None,
        sends: bool = True,
    ) -> T:
        """``fn()`` on a transfer thread of ``priority`` once a slot of it is free; a background ``fn``
        that handles ``nbytes`` first waits for the trainers' window (:attr:`yielding`) and, if it
        ``sends`` them (rather than only reading them, as hashing does), for them to fit under
        ``background_rate``. With ``stop`` (which
        ``fn`` watches), a cancellation waits for ``fn`` to return
        (:func:`~spotd.store.tasks.settle_on_cancel`), and the slot stays taken until then."""
        await self._acquire(priority)
        try:
            loop = asyncio.get_running_loop()
            if priority is Priority.EMERGENCY:
                fut = loop.run_in_executor(self._em_threads, fn)
            else:
                paced = functools.partial(self._paced, fn, nbytes, sends)
                fut = loop.run_in_executor(self._bg_threads, self.core_wait.timed, paced)
            return await (fut if stop is None else settle_on_cancel(fut, stop))
        finally:
            self._release(priority)

    def _paced(self, fn: Callable[[], T], nbytes: int, sends: bool) -> T:
        if nbytes <= 0:
            return fn()
        started = None if self.yielding is None else self.yielding.enter()
        try:
            if self.pace is not None and sends:
                self.pace.take(nbytes)
            return fn()
        finally:
            if self.yielding is not None and started is not None:
                self.yielding.exit(started)

    def detach(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on a background transfer thread without a slot and without waiting for it."""
        self._bg_threads.submit(fn, *args)

    @property
    def limit(self) -> int:
        """Transfers in flight per priority class at most."""
        return self._limit

    def emergency(self, delta: int) -> None:
        self.emergencies += delta
        self._notify()

    def shutdown(self) -> None:
        """Wait for the transfer threads to finish (blocking)."""
        if self.yielding is not None:
            self.yielding.close()
        self._em_threads.shutdown(wait=True)
        self._bg_threads.shutdown(wait=True)
