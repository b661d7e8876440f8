"""A file uploaded while it is written (spotd.store.stream), on moto's server behind the counting proxy."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from spotd.errors import CommitError
from spotd.store.s3 import S3Store
from spotd.store.selection import run_checkpoint_name
from tests.fixtures.s3 import FaultProxy, S3Bucket
from tests.store.helpers import JOB, info
from tests.util import async_wait_until

MIB = 1024 * 1024


def make(bucket: S3Bucket, proxy: FaultProxy) -> S3Store:
    return S3Store(
        uri=bucket.uri(), job_id=JOB, endpoint_url=proxy.endpoint_url, part_size=5 * MIB, concurrency=4
    )


def count_parts(proxy: FaultProxy) -> None:
    """Every UploadPart through the proxy is logged (a zero delay that fires for each one)."""
    proxy.add("delay", method="PUT", query="partNumber", times=10**9)


def parts_sent(proxy: FaultProxy) -> int:
    return sum(1 for action, method, _ in proxy.log if action == "delay" and method == "PUT")


def uploads_open(bucket: S3Bucket) -> list[str]:
    return [u["Key"] for u in bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])]


async def append(path: Path, data: bytes) -> None:
    def write() -> None:
        with open(path, "ab") as f:
            f.write(data)

    await asyncio.to_thread(write)


async def test_parts_go_out_while_the_file_is_written_and_the_commit_sends_only_the_tail(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Complete parts of an announced file are uploaded before the commit; the commit adopts the stream
    (its name, its object), sends only the tail, and the manifest's checksum is the final file's."""
    count_parts(s3_proxy)
    store = make(s3_bucket, s3_proxy)
    ckpt = tmp_path / "ckpt"
    (ckpt / "run").mkdir(parents=True)
    temp, final = ckpt / "run" / ".m.pt.tmp-1", ckpt / "run" / "m.pt"
    body = os.urandom(17 * MIB)  # three whole 5 MiB parts and a 2 MiB tail
    try:
        stream = await store.open_stream(
            watch=[temp, final], rel="run/m.pt", trainer="train", step=1, rank=None
        )
        assert stream is not None
        await append(temp, body[: 15 * MIB + 100])
        # The proxy logs a part once its head arrived: wait for the bodies as well.
        await async_wait_until(
            lambda: parts_sent(s3_proxy) == 3 and s3_proxy.bytes_in >= 15 * MIB,
            what="three parts sent before saved",
        )
        await append(temp, body[15 * MIB + 100 :])
        os.replace(temp, final)
        before = s3_proxy.bytes_in
        m = await store.commit(final, checkpoint_dir=ckpt, info=info(1), streams=[stream])
    finally:
        await store.close()
    assert m.name == stream.name
    assert parts_sent(s3_proxy) == 4  # only the tail after saved
    assert s3_proxy.bytes_in - before < 3 * MIB  # the tail, the completion, the manifest, LATEST
    got = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"pfx/{JOB}/checkpoints/{m.name}/run/m.pt")
    assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(body).digest()
    assert m.files[0].checksum.startswith("crc64nvme:")
    assert uploads_open(s3_bucket) == []


async def test_a_part_rewritten_after_it_was_sent_is_sent_again_and_the_object_is_the_final_file(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A writer that seeks back and changes bytes of a part already uploaded: the commit recomputes every
    part's CRC from the final file, re-sends that part, and restore gives back the final bytes, verified."""
    count_parts(s3_proxy)
    store = make(s3_bucket, s3_proxy)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    path = ckpt / "m.pt"
    body = bytearray(os.urandom(12 * MIB))
    try:
        stream = await store.open_stream(watch=[path], rel="m.pt", trainer="train", step=7, rank=None)
        assert stream is not None
        await append(path, bytes(body[: 11 * MIB]))
        await async_wait_until(lambda: parts_sent(s3_proxy) == 2, what="two parts sent before saved")
        await append(path, bytes(body[11 * MIB :]))
        # Rewrite 1 KiB inside the first part, after it went out (a zip writer patching a header).
        body[4096 : 4096 + 1024] = os.urandom(1024)
        patch = bytes(body[4096 : 4096 + 1024])

        def rewrite() -> None:
            with open(path, "r+b") as f:
                f.seek(4096)
                f.write(patch)

        await asyncio.to_thread(rewrite)
        m = await store.commit(path, checkpoint_dir=ckpt, info=info(7), streams=[stream])
        assert stream.resent == 1  # type: ignore[attr-defined]
        assert parts_sent(s3_proxy) == 4  # two early, part 1 again, the tail
        dest = tmp_path / "restored"
        dest.mkdir()
        result = await store.restore(dest)
    finally:
        await store.close()
    assert result.manifest.name == m.name
    assert (dest / "m.pt").read_bytes() == bytes(body)
    assert uploads_open(s3_bucket) == []


async def test_a_stream_nobody_reports_is_aborted_and_nothing_is_committed(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Announced, parts sent, then abandoned (the trainer died): the upload is aborted, no object, no
    manifest, no LATEST."""
    count_parts(s3_proxy)
    store = make(s3_bucket, s3_proxy)
    path = tmp_path / "m.pt"
    try:
        stream = await store.open_stream(watch=[path], rel="m.pt", trainer="train", step=3, rank=None)
        assert stream is not None
        await append(path, os.urandom(6 * MIB))
        await async_wait_until(lambda: parts_sent(s3_proxy) == 1, what="a part sent")
        assert uploads_open(s3_bucket) != []
        await stream.abort()
        await async_wait_until(lambda: uploads_open(s3_bucket) == [], what="the upload aborted")
    finally:
        await store.close()
    assert s3_bucket.keys() == []


async def test_a_stream_of_another_save_is_not_adopted(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A stream announced for step 1 handed to the commit of step 2: aborted, the file uploaded plainly."""
    store = make(s3_bucket, s3_proxy)
    path = tmp_path / "m.pt"
    try:
        stream = await store.open_stream(watch=[path], rel="m.pt", trainer="train", step=1, rank=None)
        assert stream is not None
        await append(path, os.urandom(6 * MIB))
        m = await store.commit(path, checkpoint_dir=tmp_path, info=info(2), streams=[stream])
        await async_wait_until(lambda: uploads_open(s3_bucket) == [], what="the stream aborted")
    finally:
        await store.close()
    assert m.name != stream.name and m.step == 2
    stored = s3_bucket.keys()
    assert [k for k in stored if k.endswith("m.pt")] == [f"pfx/{JOB}/checkpoints/{m.name}/m.pt"]


async def test_a_node_part_finishes_the_streams_under_its_name_and_aborts_the_others(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Two ranks' files streamed under the run's name of step 5 and a third under step 4's: the node part of
    step 5 completes the first two where it commits them (only their tails sent after), aborts the third,
    and leaves no multipart upload open."""
    count_parts(s3_proxy)
    store = make(s3_bucket, s3_proxy)
    ckpt = tmp_path / "ckpt"
    (ckpt / "run").mkdir(parents=True)
    name, other = run_checkpoint_name("run1", 5), run_checkpoint_name("run1", 4)
    paths = [ckpt / "run" / f"r{r}.pt" for r in (0, 1)]
    bodies = [os.urandom(6 * MIB) for _ in paths]
    try:
        streams = [
            await store.open_stream(
                watch=[p], rel=f"run/{p.name}", trainer=f"r{r}", step=5, rank=r, name=name
            )
            for r, p in enumerate(paths)
        ]
        stale = await store.open_stream(
            watch=[paths[0]], rel="run/r0.pt", trainer="r0", step=4, rank=0, name=other
        )
        assert stale is not None and all(s is not None and s.name == name for s in streams)
        for p, body in zip(paths, bodies, strict=True):
            await append(p, body)
        await async_wait_until(lambda: parts_sent(s3_proxy) >= 3, what="a part of each stream sent")
        result = await store.commit_part(
            [ckpt / "run"],
            checkpoint_dir=ckpt,
            name=name,
            node_rank=0,
            nodes=1,
            ranks=[0, 1],
            info=info(5, world_size=2),
            streams=[*streams, stale],  # type: ignore[list-item]
        )
    finally:
        await store.close()
    assert result.manifest is not None and [f.path for f in result.manifest.files] == [
        "run/r0.pt",
        "run/r1.pt",
    ]
    assert parts_sent(s3_proxy) == 5  # three early (one stale), then the two tails
    for p, body in zip(paths, bodies, strict=True):
        got = s3_bucket.client.get_object(
            Bucket=s3_bucket.name, Key=f"pfx/{JOB}/checkpoints/{name}/run/{p.name}"
        )
        assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(body).digest()
    await async_wait_until(lambda: uploads_open(s3_bucket) == [], what="the stale stream aborted")
    assert not [k for k in s3_bucket.keys("pfx/") if f"/{other}/" in k]


async def test_a_node_part_that_fails_aborts_every_stream_it_was_given(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A commit_part refused before it uploads anything (a node rank outside the nodes) still ends the
    streams handed to it: no multipart upload is left open and nothing is stored."""
    count_parts(s3_proxy)
    store = make(s3_bucket, s3_proxy)
    path = tmp_path / "r0.pt"
    name = run_checkpoint_name("run1", 5)
    try:
        stream = await store.open_stream(watch=[path], rel="r0.pt", trainer="r0", step=5, rank=0, name=name)
        assert stream is not None
        await append(path, os.urandom(6 * MIB))
        await async_wait_until(lambda: parts_sent(s3_proxy) == 1, what="a part sent")
        with pytest.raises(CommitError, match="node_rank 3"):
            await store.commit_part(
                [path],
                checkpoint_dir=tmp_path,
                name=name,
                node_rank=3,
                nodes=1,
                ranks=[0],
                info=info(5, world_size=2),
                streams=[stream],
            )
        await async_wait_until(lambda: uploads_open(s3_bucket) == [], what="the stream aborted")
    finally:
        await store.close()
    assert s3_bucket.keys() == []


def test_parts_in_flight_while_written_are_half_a_core_each_at_least_two_at_most_the_pool() -> None:
    """The early sends leave the writer its cores: 2 on a 2-core box, 4 on 8 cores, never past the pool."""
    from spotd.store.transfer_pool import early_parts

    assert [early_parts(16, cores=c) for c in (1, 2, 8, 96)] == [2, 2, 4, 16]
    assert early_parts(1, cores=8) == 1
