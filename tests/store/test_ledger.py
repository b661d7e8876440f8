"""The job ledger in the store: typed records per session, read back in order; the job's end written once;
and a session killed in the middle of a write never leaves the ledger unreadable."""

from __future__ import annotations

import asyncio
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spotd.config import Config
from spotd.events import InstanceIdentity, Phase, SessionEventKind
from spotd.store import open_store
from spotd.store.base import BaseStore
from spotd.store.file import TMP_PREFIX
from spotd.store.ledger import JobEnd, Ledger, LedgerRecord, session_name
from tests.fixtures.s3 import S3Bucket

T0 = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)
IDENTITY = InstanceIdentity("i-0aaa", "g5.2xlarge", "us-east-1a", "spot")


def file_store(tmp_path: Path, job: str = "job") -> BaseStore:
    store = open_store(Config().replace(**{"job_id": job, "store.uri": (tmp_path / "store").as_uri()}))
    assert isinstance(store, BaseStore)
    return store


async def test_records_are_read_back_by_session_and_in_order(tmp_path: Path) -> None:
    """Two sessions' records, written interleaved, come back grouped by session, each in seq order, with
    every field as written; heartbeats per session."""
    store = file_store(tmp_path)
    ledger = Ledger.of_store(store)
    a = ledger.writer(session=session_name("i-0aaa", T0), identity=IDENTITY, region="us-east-1")
    b_identity = InstanceIdentity("i-0bbb", "g5.2xlarge", "us-east-1b", "spot")
    b = ledger.writer(
        session=session_name("i-0bbb", T0 + timedelta(hours=1)), identity=b_identity, region="us-east-1"
    )
    try:
        for i, kind in enumerate([SessionEventKind.BOOT, SessionEventKind.TRAINING, SessionEventKind.END]):
            await a.write(a.record(kind, T0 + timedelta(minutes=i), {"i": i}))
            await b.write(b.record(kind, T0 + timedelta(hours=1, minutes=i), {"i": i}))
        await a.heartbeat(T0 + timedelta(minutes=5))
        view = await ledger.read()
    finally:
        await store.close()
    sessions = view.sessions()
    assert list(sessions) == [a.session, b.session]
    assert [r.event for r in sessions[a.session]] == ["boot", "training", "end"]
    assert [r.seq for r in sessions[b.session]] == [0, 1, 2]
    first = sessions[b.session][0]
    assert first.instance == b_identity and first.region == "us-east-1" and first.data == {"i": 0}
    assert first.kind is SessionEventKind.BOOT and first.job_id == "job" and first.v == 1
    assert view.heartbeats == {a.session: T0 + timedelta(minutes=5)}
    assert view.end is None and view.unreadable == ()
    assert a.session == "20261125T040000000Z-i-0aaa"


async def test_an_unreadable_record_is_skipped_and_named(tmp_path: Path) -> None:
    """A record that is not JSON (another tool, a bad disk) is skipped, named in unreadable, and the
    others still read; a record of a newer version or an unknown event is kept as it is."""
    store = file_store(tmp_path)
    ledger = Ledger.of_store(store)
    w = ledger.writer(session="s1", identity=IDENTITY, region="us-east-1")
    try:
        await w.write(w.record(SessionEventKind.BOOT, T0, {}))
        bad = f"{ledger.sessions_prefix}s1/000001-training.json"
        await store.put_bytes(bad, b'{"v": 1, "job_id": "job", "sess')
        future = LedgerRecord(
            job_id="job", session="s1", seq=2, event="teleported", at=T0, instance=IDENTITY, region="", v=7
        )
        await w.write(future)
        view = await ledger.read()
    finally:
        await store.close()
    assert [r.event for r in view.records] == ["boot", "teleported"]
    assert view.records[1].kind is None and view.records[1].v == 7
    assert view.unreadable == (bad,)


async def test_the_end_is_written_once_and_the_first_writer_wins(tmp_path: Path) -> None:
    """END.json is a conditional write: a second end (Stopped after Completed) finds the first standing."""
    store = file_store(tmp_path)
    ledger = Ledger.of_store(store)
    completed = JobEnd(
        job_id="job",
        status=Phase.COMPLETED,
        reason="finished",
        at=T0,
        session="s3",
        instance_id="i-0c",
        checkpoint="ckpt-1",
        step=100,
    )
    stopped = JobEnd(
        job_id="job",
        status=Phase.STOPPED,
        reason="MaxRuntimeExceeded",
        at=T0,
        session="s4",
        instance_id="i-0d",
    )
    try:
        assert await ledger.ended() is None
        assert await ledger.mark_ended(completed) == (completed, True)
        assert await ledger.mark_ended(completed) == (completed, True), "a retried write of the same end"
        assert await ledger.mark_ended(stopped) == (completed, False)
        assert await ledger.ended() == completed
    finally:
        await store.close()


async def test_a_session_killed_while_writing_its_record_leaves_the_ledger_readable(tmp_path: Path) -> None:
    """SIGKILL in the middle of record 5 (half of it in the temporary file): the ledger reads records 0-4,
    nothing unreadable; the next session appends and reads back; the store's recover() sweeps the half."""
    uri = (tmp_path / "store").as_uri()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.store.ledger_crash_driver",
        uri,
        "",
        "s1-i-crash",
        "5",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == -9, "killed by its own SIGKILL"
    assert out.decode().splitlines()[-1] == "wrote 4"
    leftovers = list((tmp_path / "store" / "crash").rglob(f"{TMP_PREFIX}*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0, "half a record in a temporary file"

    cfg = Config().replace(**{"job_id": "crash", "store.uri": uri})
    store = open_store(cfg)
    assert isinstance(store, BaseStore)
    ledger = Ledger.of_store(store)
    try:
        view = await ledger.read()
        assert [r.data["step"] for r in view.records] == [0, 1, 2, 3, 4] and view.unreadable == ()
        nxt = ledger.writer(session="s2-i-next", identity=IDENTITY, region="us-east-1")
        await nxt.write(nxt.record(SessionEventKind.BOOT, T0, {}))
        view = await ledger.read()
        assert [r.session for r in view.records].count("s2-i-next") == 1
        assert await store.recover() == 1
    finally:
        await store.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sessions_killed_at_random_moments_against_s3_leave_every_record_whole(
    s3_bucket: S3Bucket,
) -> None:
    """Five sessions SIGKILLed at random moments while writing to S3: every record reads back, none
    unreadable, each session's records numbered 0..n without a hole."""
    rng = random.Random(14)
    uri = s3_bucket.uri()
    for k in range(5):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.store.ledger_crash_driver",
            uri,
            s3_bucket.endpoint_url,
            f"s{k}",
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"ready\n"
        # The kill moment is the random variable under test, not a synchronisation wait.
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        proc.kill()
        await proc.wait()
    store = open_store(
        Config().replace(
            **{"job_id": "crash", "store.uri": uri, "store.endpoint_url": s3_bucket.endpoint_url}
        )
    )
    assert isinstance(store, BaseStore)
    try:
        view = await Ledger.of_store(store).read()
    finally:
        await store.close()
    assert view.unreadable == ()
    sessions = view.sessions()
    assert len(sessions) >= 3
    for records in sessions.values():
        assert [r.seq for r in records] == list(range(len(records)))
