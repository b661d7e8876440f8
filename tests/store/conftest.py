"""Fixtures of the store tests: every contract test runs against file:// and s3:// (moto's server mode)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from spotd.config import Config
from spotd.metrics import Metrics
from spotd.store import CheckpointStore, open_store
from tests.store.helpers import JOB, Backend


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    root = tmp_path / "store"
    if request.param == "file":
        uri = f"file://{root}"
        bucket = None
    else:
        bucket = request.getfixturevalue("s3_bucket")
        uri = bucket.uri()

    def make(**overrides: Any) -> CheckpointStore:
        extra = {"store.endpoint_url": bucket.endpoint_url} if bucket else {}
        cfg = Config().replace(
            **{
                "job_id": JOB,
                "store.uri": uri,
                "store.part_size": 5 * 1024 * 1024,
                "store.concurrency": 8,
                **extra,
                **overrides,
            }
        )
        return open_store(cfg, metrics=Metrics())

    return Backend(kind=request.param, root=root, bucket=bucket, make=make, uri=uri)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[CheckpointStore]:
    s = backend.make()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    return d
