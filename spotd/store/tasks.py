"""Running a store's concurrent transfers: every result, or the first failure and nothing left running."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

__all__ = ["gather_or_cancel", "settle_on_cancel"]

T = TypeVar("T")


async def gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """All results in order; on the first failure the others are cancelled (not left writing into a
    staging directory that is about to be removed) and that failure is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def settle_on_cancel(fut: asyncio.Future[T], stop: threading.Event) -> T:
    """``await fut``, the work of a thread that watches ``stop``; when the awaiting task is cancelled, set
    ``stop`` and wait for the thread to return before the cancellation goes on. A thread cannot be killed:
    without this, a download cancelled because another file failed kept writing into a staging directory
    the restore was already removing (and the directory survived its removal)."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: whatever the stopped thread raised is not news
        raise
