"""Small helpers for tests: waiting on a condition with a deadline (never a fixed sleep), Debian tools.

``free_port`` and ``wait_until`` are spotd.tools.testing's, shared with the demo and the benchmarks."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from spotd.tools.testing import free_port, wait_until

__all__ = ["async_wait_until", "free_port", "require_tool", "wait_until"]

T = TypeVar("T")


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    what: str = "",
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        await asyncio.sleep(interval_s)


def require_tool(name: str, package: str) -> str:
    """Path of a Debian tool the test needs; fails in CI (scripts/test installs it), skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: apt-get install -y {package} (scripts/test does this)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
