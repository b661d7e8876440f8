"""S3-only behaviour: checksums S3 verifies, faults through a proxy, priorities, unreachable S3."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from structlog.testing import capture_logs

import spotd.store.checksums
from spotd.errors import RestoreError, StoreError, UploadError
from spotd.metrics import Metrics
from spotd.store import CommitInfo, Priority
from spotd.store.checksums import hash_file
from spotd.store.s3 import S3Store
from tests.fixtures.s3 import FaultProxy, S3Bucket
from tests.util import async_wait_until, free_port

JOB = "job1"
MIB = 1024 * 1024


def info(step: int = 1, reason: str = "periodic") -> CommitInfo:
    return CommitInfo(
        job_id=JOB,
        step=step,
        trainer="train",
        rank=0,
        world_size=1,
        request_id=None,
        reason=reason,
        instance_id="i-0123",
        final=False,
    )


def make(bucket: S3Bucket, endpoint_url: str | None = None, **kw: Any) -> S3Store:
    return S3Store(
        uri=bucket.uri(),
        job_id=JOB,
        endpoint_url=endpoint_url or bucket.endpoint_url,
        part_size=5 * MIB,
        concurrency=4,
        **kw,
    )


async def test_s3_verifies_and_reports_the_checksum(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """With awscrt, auto picks CRC64NVME; a multipart object is a FULL_OBJECT checksum equal to the manifest's."""
    (tmp_path / "m.pt").write_bytes(os.urandom(12 * MIB))  # three 5 MiB parts
    (tmp_path / "s.pt").write_bytes(os.urandom(300_000))  # one PUT
    store = make(s3_bucket)
    try:
        m = await store.commit(tmp_path, checkpoint_dir=tmp_path, info=info())
    finally:
        await store.close()
    for entry in m.files:
        assert entry.checksum == hash_file(tmp_path / entry.path, "crc64nvme")[1]
        head = s3_bucket.client.head_object(
            Bucket=s3_bucket.name, Key=f"pfx/{JOB}/checkpoints/{m.name}/{entry.path}", ChecksumMode="ENABLED"
        )
        # moto computes the object's CRC64NVME itself (it does not reject a wrong one as S3 does; restore
        # verification covers that), so equality shows the combined part CRCs are the file's.
        assert "crc64nvme:" + head["ChecksumCRC64NVME"] == entry.checksum
        if entry.size > 5 * MIB:
            assert head["ChecksumType"] == "FULL_OBJECT"


@pytest.mark.parametrize("algo", ["crc32", "crc32c", "sha256"])
async def test_other_checksums_round_trip(s3_bucket: S3Bucket, tmp_path: Path, algo: str) -> None:
    """crc32, crc32c and sha256 commit multipart files with the file's checksum and restore verified."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.pt").write_bytes(os.urandom(11 * MIB))
    store = make(s3_bucket, checksum=algo)
    try:
        m = await store.commit(src / "m.pt", checkpoint_dir=src, info=info())
        assert m.files[0].checksum == hash_file(src / "m.pt", algo)[1]
        result = await store.restore(tmp_path / "r")
    finally:
        await store.close()
    assert result.skipped == () and (tmp_path / "r" / "m.pt").read_bytes() == (src / "m.pt").read_bytes()


async def test_without_awscrt_auto_falls_back_to_crc32(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without awscrt, auto is CRC32 hashed in a sequential pass; a damaged object still fails restore."""
    monkeypatch.setattr(spotd.store.checksums, "have_awscrt", lambda: False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.pt").write_bytes(os.urandom(11 * MIB))
    store = make(s3_bucket)
    try:
        m = await store.commit(src / "m.pt", checkpoint_dir=src, info=info())
        assert m.files[0].checksum == hash_file(src / "m.pt", "crc32")[1]
        await store.restore(tmp_path / "r")
        assert (tmp_path / "r" / "m.pt").read_bytes() == (src / "m.pt").read_bytes()
        key = f"pfx/{JOB}/checkpoints/{m.name}/m.pt"
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"X" * (11 * MIB))
        with pytest.raises(RestoreError):
            await store.restore(tmp_path / "r2")
    finally:
        await store.close()
    with pytest.raises(StoreError, match=r"awscrt.*fix"):
        make(s3_bucket, checksum="crc64nvme")


async def test_transient_faults_are_retried_and_committed(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """503 SlowDown, a reset mid-part and a 500 on CompleteMultipartUpload are retried by botocore, each retried request is logged, and the commit lands."""
    (tmp_path / "m.pt").write_bytes(os.urandom(12 * MIB))
    s3_proxy.add("503", method="PUT", query="partNumber")
    s3_proxy.add("reset", method="PUT", query="partNumber")
    s3_proxy.add("500", method="POST", query="uploadId", body_has=b"CompleteMultipartUpload")
    store = make(s3_bucket, s3_proxy.endpoint_url)
    try:
        with capture_logs() as logs:
            m = await store.commit(tmp_path / "m.pt", checkpoint_dir=tmp_path, info=info())
    finally:
        await store.close()
    assert sorted(a for a, _, _ in s3_proxy.log) == ["500", "503", "reset"]
    retried = sorted(e["operation"] for e in logs if e["event"] == "aws.request_retried")
    assert retried == ["CompleteMultipartUpload", "UploadPart", "UploadPart"]
    direct = make(s3_bucket)
    try:
        assert [x.name for x in await direct.list()] == [m.name]
        await direct.restore(tmp_path / "r")
    finally:
        await direct.close()
    assert (tmp_path / "r" / "m.pt").read_bytes() == (tmp_path / "m.pt").read_bytes()


async def test_persistent_fault_fails_and_keeps_local(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A CompleteMultipartUpload that always fails raises UploadError after request_attempts tries, commits nothing, keeps the local file."""
    (tmp_path / "m.pt").write_bytes(os.urandom(6 * MIB))
    complete = s3_proxy.add(
        "500", method="POST", query="uploadId", body_has=b"CompleteMultipartUpload", times=1000
    )
    metrics = Metrics()
    store = make(s3_bucket, s3_proxy.endpoint_url, request_attempts=2, metrics=metrics)
    try:
        with pytest.raises(UploadError, match=r"m\.pt.*failed after 2 tries"):
            await store.commit(tmp_path / "m.pt", checkpoint_dir=tmp_path, info=info())
        assert await store.list() == []
    finally:
        await store.close()
    assert (tmp_path / "m.pt").stat().st_size == 6 * MIB
    assert complete.fired == 2
    # A failed attempt is not a failed commit yet: the coordinator counts it once it gives up retrying.
    assert metrics.registry.get_sample_value("spotd_upload_failures_total") == 0


async def test_a_part_that_always_fails_is_tried_request_attempts_times(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Each part of a file S3 always refuses is sent exactly request_attempts times (botocore's retries only, none on top) and the error says so."""
    (tmp_path / "m.pt").write_bytes(os.urandom(7 * MIB))  # two 5 MiB parts
    s3_proxy.add("503", method="PUT", query="partNumber", times=10**6)
    store = make(s3_bucket, s3_proxy.endpoint_url, request_attempts=3)
    try:
        with pytest.raises(UploadError, match=r"part [12]/2\) failed after 3 tries"):
            await store.commit(tmp_path / "m.pt", checkpoint_dir=tmp_path, info=info())
    finally:
        await store.close()  # waits for the transfer threads: the other part's tries are all in the log too
    sent = [parse_qs(urlsplit(path).query)["partNumber"][0] for _, _, path in s3_proxy.log]
    assert sorted(sent) == ["1", "1", "1", "2", "2", "2"]


async def test_an_answer_cut_off_mid_body_is_fetched_again(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A GET whose body breaks off half way (botocore cannot retry that) is sent again and the restore verifies."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.pt").write_bytes(os.urandom(3 * MIB))
    store = make(s3_bucket, s3_proxy.endpoint_url)
    try:
        await store.commit(src / "m.pt", checkpoint_dir=src, info=info())
        cut = s3_proxy.add("truncate", method="GET", path_has="/m.pt")
        result = await store.restore(tmp_path / "r")
    finally:
        await store.close()
    assert cut.fired == 1 and result.skipped == ()
    assert (tmp_path / "r" / "m.pt").read_bytes() == (src / "m.pt").read_bytes()


async def test_answers_always_cut_off_give_up_after_body_read_attempts(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """When every GET of a file breaks off, it is sent body_read_attempts times and the restore fails without a partial file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.pt").write_bytes(os.urandom(MIB))
    store = make(s3_bucket, s3_proxy.endpoint_url, body_read_attempts=2)
    try:
        await store.commit(src / "m.pt", checkpoint_dir=src, info=info())
        cut = s3_proxy.add("truncate", method="GET", path_has="/m.pt", times=10**6)
        with pytest.raises(RestoreError, match="could be downloaded and verified"):
            await store.restore(tmp_path / "r")
    finally:
        await store.close()
    assert cut.fired == 2
    assert not (tmp_path / "r" / "m.pt").exists()


async def test_unreachable_s3_raises_upload_error(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """With nothing listening at the endpoint, commit raises UploadError after request_attempts tries; local data stays."""
    (tmp_path / "m.pt").write_bytes(b"x" * 1000)
    store = make(s3_bucket, f"http://127.0.0.1:{free_port()}", request_attempts=2)
    try:
        with pytest.raises(UploadError, match="failed after 2 tries"):
            await store.commit(tmp_path / "m.pt", checkpoint_dir=tmp_path, info=info())
    finally:
        await store.close()
    assert (tmp_path / "m.pt").read_bytes() == b"x" * 1000


async def test_emergency_overtakes_background(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """An EMERGENCY commit preempts a large BACKGROUND upload, lands first, and the background one resumes."""
    (tmp_path / "big.pt").write_bytes(os.urandom(40 * MIB))
    (tmp_path / "small.pt").write_bytes(os.urandom(MIB))
    s3_proxy.add("delay", method="PUT", query="partNumber", delay_s=0.15, times=10_000)
    store = make(s3_bucket, s3_proxy.endpoint_url)
    order: list[str] = []

    async def run(name: str, priority: Priority) -> None:
        await store.commit(
            tmp_path / name, checkpoint_dir=tmp_path, info=info(reason=name), priority=priority
        )
        order.append(name)

    try:
        background = asyncio.create_task(run("big.pt", Priority.BACKGROUND))
        # Wait (bounded) until the background upload is really moving bytes before the emergency starts.
        await async_wait_until(
            lambda: s3_proxy.log,
            timeout_s=20,
            what="background part in flight",
        )
        await run("small.pt", Priority.EMERGENCY)
        assert order == ["small.pt"] and not background.done()
        async with asyncio.timeout(60):
            await background
        # The background upload paused (parts held back) and went on with its next part, not from the start.
        assert order == ["small.pt", "big.pt"] and store.pauses >= 1
        part_puts = [p for a, m, p in s3_proxy.log if a == "delay" and m == "PUT" and "partNumber" in p]
        assert len(part_puts) == 8, "each 5 MiB part of big.pt sent once"
        assert {m.reason for m in await store.list()} == {"small.pt", "big.pt"}
    finally:
        await store.close()


async def test_recover_aborts_leftover_multipart_uploads(s3_bucket: S3Bucket) -> None:
    """recover() aborts incomplete multipart uploads under the job prefix and leaves other prefixes alone."""
    c = s3_bucket.client
    c.create_multipart_upload(Bucket=s3_bucket.name, Key=f"pfx/{JOB}/checkpoints/n/a.pt")
    c.create_multipart_upload(Bucket=s3_bucket.name, Key="other/b.pt")
    store = make(s3_bucket)
    try:
        assert await store.recover() == 1
    finally:
        await store.close()
    left = c.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other/b.pt"]


async def test_check_access_names_missing_bucket(s3_bucket: S3Bucket) -> None:
    """check_access on a bucket that does not exist says so and how to fix it."""
    from spotd.errors import StoreAccessError

    store = S3Store(uri="s3://no-such-bucket-spotd/p", job_id=JOB, endpoint_url=s3_bucket.endpoint_url)
    try:
        with pytest.raises(StoreAccessError, match=r"no-such-bucket-spotd.*fix"):
            await store.check_access()
    finally:
        await store.close()


async def test_files_enough_to_fill_every_slot_go_whole_and_a_few_go_in_parts(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A commit of as many files as transfer slots (4 here) sends each 6 MiB file in one PutObject, with no
    multipart upload: the parallelism is across the files. Two such files are still sent in 5 MiB parts; both
    restore verified."""
    s3_proxy.add("delay", method="PUT", times=10**9)  # logs every PUT
    store = make(s3_bucket, endpoint_url=s3_proxy.endpoint_url)
    try:
        for n, step in ((4, 1), (2, 2)):
            src = tmp_path / "ckpt" / f"s{step}"
            src.mkdir(parents=True)
            for i in range(n):
                (src / f"shard{i}.bin").write_bytes(os.urandom(6 * MIB))
            await store.commit(src, checkpoint_dir=tmp_path / "ckpt", info=info(step))
        restored = tmp_path / "restored"
        await store.restore(restored)
    finally:
        await store.close()
    parts = [p for a, m, p in s3_proxy.log if a == "delay" and m == "PUT" and "partNumber" in p]
    whole = [p for a, m, p in s3_proxy.log if a == "delay" and m == "PUT" and "partNumber" not in p]
    assert sum("/s1/shard" in p for p in whole) == 4 and not any("/s1/" in p for p in parts)
    assert sum("/s2/shard" in p for p in parts) == 4 and not any("/s2/shard" in p for p in whole)
    assert sorted(p.name for p in (restored / "s2").iterdir()) == ["shard0.bin", "shard1.bin"]


async def test_a_restore_starts_writing_to_disk_while_each_body_arrives(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel is asked to write a download to disk every few MiB of each body, not once per ranged GET
    (16 ranges in parallel all end near the end, leaving the disk idle until then): every byte's
    write-back is started once, within each range as it arrives, for whole-object and ranged GETs alike."""
    from spotd.store import s3_transfer

    started: list[tuple[int, int, int]] = []
    real = s3_transfer.start_writeback

    def record(fd: int, offset: int, length: int) -> None:
        started.append((os.fstat(fd).st_size, offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(s3_transfer, "start_writeback", record)
    monkeypatch.setattr(s3_transfer, "_WRITEBACK_STEP", 2 * MIB)
    monkeypatch.setattr(s3_transfer, "_MIN_RANGE", 8 * MIB)  # the 20 MiB file in ranges of 8, 8 and 4 MiB
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.pt").write_bytes(os.urandom(20 * MIB))
    (src / "small.pt").write_bytes(os.urandom(5 * MIB + 123))  # one GET
    store = make(s3_bucket)
    try:
        await store.commit(src, checkpoint_dir=src, info=info())
        await store.restore(tmp_path / "r")
    finally:
        await store.close()
    for name in ("big.pt", "small.pt"):
        assert (tmp_path / "r" / name).read_bytes() == (src / name).read_bytes()
        size = (src / name).stat().st_size
        spans = sorted((offset, length) for file_size, offset, length in started if file_size == size)
        covered = 0
        for offset, length in spans:  # contiguous, no byte twice, none left out
            assert offset == covered and length > 0, spans
            covered += length
        assert covered == size
        assert max(length for _, length in spans) <= 2 * MIB + 256 * 1024  # a step and at most one piece
    big = [s for s in started if s[0] == 20 * MIB]
    assert len(big) >= 10  # within each of the three ranges, not once per range
