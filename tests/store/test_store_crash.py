"""Crash consistency: a process committing in a loop is SIGKILLed at random moments; afterwards the store
only ever shows complete, verified checkpoints, and recover() clears what the crashes left."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import pytest

from spotd.config import Config
from spotd.metrics import Metrics
from spotd.store import open_store
from tests.fixtures.s3 import S3Bucket

KILLS = 20


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["file", "s3"])
async def test_sigkill_during_commits_never_exposes_partial(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """After each of 20 SIGKILLs mid-upload or mid-commit, list()/restore() see only complete, verified data."""
    if kind == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        uri, endpoint = bucket.uri(), bucket.endpoint_url
    else:
        uri, endpoint = f"file://{tmp_path / 'store'}", ""
    cfg = Config().replace(
        **{"job_id": "crash", "store.uri": uri, "store.endpoint_url": endpoint, "store.keep": 3}
    )
    store = open_store(cfg, metrics=Metrics())
    rng = random.Random(1234)
    seen: set[str] = set()
    committed_total = 0
    try:
        for kill in range(KILLS):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.store.store_crash_driver",
                uri,
                endpoint,
                str(tmp_path / f"ck{kill % 2}"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                assert await proc.stdout.readline() == b"ready\n"

            reader = asyncio.create_task(proc.stdout.read())
            # The kill moment is the random variable under test, not a synchronisation wait.
            await asyncio.sleep(rng.uniform(0.05, 1.0))
            proc.kill()
            await proc.wait()
            committed_total += (await reader).count(b"committed ")
            listed = await store.list()
            for m in listed:
                assert m.files and all(f.checksum.startswith("crc64nvme:") for f in m.files)
            if listed:
                result = await store.restore(tmp_path / "restored")
                assert result.skipped == () and result.manifest == listed[0]
                seen.add(listed[0].name)
        aborted = await store.recover()
    finally:
        await store.close()
    assert committed_total >= 3 and len(seen) >= 3
    if kind == "s3":
        left = bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
        assert left == [] and aborted >= 1
