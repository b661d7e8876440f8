"""The ``make`` fixture of the in-process coordinator tests (see harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.harness import Harness, build_harness


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    """Factory: a Coordinator wired to a FakeChannel, a file store, FakeTime and a fresh registry.

    At teardown each is drained (watchers still waiting on a deadline are cancelled) and its store closed.
    """
    built: list[Harness] = []
    yield lambda **kwargs: build_harness(tmp_path, built, **kwargs)
    for harness in built:
        await harness.coordinator.drain(grace_s=0.0)
        await harness.store.close()
