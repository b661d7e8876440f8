"""Each file of an announced checkpoint directory uploaded as it is closed (spotd.store.dirstream), on file://
and on moto's server."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from spotd.errors import StoreError
from spotd.store import CheckpointStore, DirStream, Priority, dirstream
from spotd.store.api import Gate
from spotd.store.localfs import LocalFile
from spotd.store.s3 import S3Store
from tests.fixtures.s3 import FaultProxy, S3Bucket
from tests.store.helpers import JOB, Backend, info
from tests.util import async_wait_until

MIB = 1024 * 1024


async def write(path: Path, data: bytes) -> None:
    def put() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    await asyncio.to_thread(put)


async def open_dir(store: CheckpointStore, ckdir: Path, rel: str, *, temp: str | None = None) -> DirStream:
    (ckdir / (temp or rel)).mkdir(parents=True, exist_ok=True)
    watch = [ckdir / temp, ckdir / rel] if temp else [ckdir / rel]
    stream = await store.open_dir_stream(watch=watch, rel=rel, trainer="train", step=3, rank=None)
    assert stream is not None
    return stream


def key(stream: DirStream, rel: str) -> str:
    return f"{JOB}/checkpoints/{stream.name}/{rel}"


async def uploaded(backend: Backend, *keys: str) -> None:
    await async_wait_until(
        lambda: all(k in backend.objects() for k in keys), timeout_s=20, what=f"{keys} uploaded"
    )


def puts(proxy: FaultProxy, suffix: str) -> int:
    """Requests that sent bytes of the object ending in ``suffix`` (PutObject or UploadPart)."""
    return sum(1 for a, m, p in proxy.log if a == "delay" and m == "PUT" and p.split("?")[0].endswith(suffix))


async def test_closed_files_go_up_before_saved_and_are_not_sent_again(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Every file closed (or renamed in) while the directory is watched is uploaded before `saved`; the commit
    adopts them (the stream's name, no byte sent again), skips the temp name, and lists exactly the final files."""
    s3_proxy.add("delay", method="PUT", times=10**9)  # logs every PUT
    store = S3Store(
        uri=s3_bucket.uri(), job_id=JOB, endpoint_url=s3_proxy.endpoint_url, part_size=5 * MIB, concurrency=4
    )
    ckdir = tmp_path / "ckpt"
    bodies = {"__0_0.distcp": os.urandom(12 * MIB), "__1_0.distcp": os.urandom(3 * MIB), "x.json": b"{}"}
    try:
        stream = await open_dir(store, ckdir, "run/step-3.dcp")
        root = ckdir / "run/step-3.dcp"
        for name, body in bodies.items():
            await write(root / name, body)
        await write(root / ".metadata.tmp", b"meta")  # DCP's commit marker: written, then renamed
        await asyncio.to_thread(os.replace, root / ".metadata.tmp", root / ".metadata")
        bodies[".metadata"] = b"meta"
        await async_wait_until(
            lambda: all(puts(s3_proxy, f"/run/step-3.dcp/{n}") for n in bodies), timeout_s=30, what="uploaded"
        )
        await async_wait_until(lambda: puts(s3_proxy, "/__0_0.distcp") == 3, what="all three parts")
        # The proxy logs a PUT before it counts its body: wait for the bodies too (a run under load read `before`
        # between the two and counted a part as sent after saved).
        total = sum(len(b) for b in bodies.values())
        await async_wait_until(lambda: s3_proxy.bytes_in >= total, what="every body received")
        before = s3_proxy.bytes_in
        m = await store.commit(root, checkpoint_dir=ckdir, info=info(3), streams=stream.take())
    finally:
        await store.close()
    assert m.name == stream.name
    assert sorted(f.path for f in m.files) == sorted(f"run/step-3.dcp/{n}" for n in bodies)
    assert s3_proxy.bytes_in - before < 64 * 1024  # only the manifest and LATEST after saved
    assert puts(s3_proxy, ".tmp") == 0
    for name, body in bodies.items():
        got = s3_bucket.client.get_object(
            Bucket=s3_bucket.name, Key=f"pfx/{key(stream, f'run/step-3.dcp/{name}')}"
        )
        assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(body).digest()


async def test_a_file_rewritten_after_it_went_up_is_sent_again(
    backend: Backend, store: CheckpointStore, ckdir: Path
) -> None:
    """A file changed after its upload (same size, other bytes) is uploaded again by the commit: the stored
    object and the manifest's checksum are the final file's."""
    stream = await open_dir(store, ckdir, "run/ck")
    path = ckdir / "run/ck/a.bin"
    await write(path, b"A" * 4096)
    await uploaded(backend, key(stream, "run/ck/a.bin"))
    final = os.urandom(4096)
    await write(path, final)
    m = await store.commit(ckdir / "run/ck", checkpoint_dir=ckdir, info=info(3), streams=stream.take())
    assert m.name == stream.name
    assert backend.read(key(stream, "run/ck/a.bin")) == final
    restored = ckdir.parent / "restored"
    await store.restore(restored)  # verifies every file against the manifest
    assert (restored / "run/ck/a.bin").read_bytes() == final


async def test_a_directory_renamed_into_place_keeps_what_went_up(
    backend: Backend, store: CheckpointStore, ckdir: Path
) -> None:
    """Files written into the announced temp directory go up under the final directory's name, and still
    count after the directory is renamed into place (the watch follows the directory, not its path)."""
    stream = await open_dir(store, ckdir, "run/step-5", temp="run/.tmp-step-5")
    body = os.urandom(70_000)
    await write(ckdir / "run/.tmp-step-5/model.safetensors", body)
    await uploaded(backend, key(stream, "run/step-5/model.safetensors"))
    await asyncio.to_thread(os.rename, ckdir / "run/.tmp-step-5", ckdir / "run/step-5")
    await write(ckdir / "run/step-5/late.bin", b"late")  # closed after the rename: still seen
    await uploaded(backend, key(stream, "run/step-5/late.bin"))
    m = await store.commit(ckdir / "run/step-5", checkpoint_dir=ckdir, info=info(3), streams=stream.take())
    assert m.name == stream.name
    assert {f.path for f in m.files} == {"run/step-5/model.safetensors", "run/step-5/late.bin"}
    assert backend.read(key(stream, "run/step-5/model.safetensors")) == body
    assert not [k for k in backend.objects() if ".tmp-step-5" in k]


async def test_files_in_a_new_subdirectory_go_up_too(
    backend: Backend, store: CheckpointStore, ckdir: Path
) -> None:
    """A subdirectory created inside the announced directory is watched as well."""
    stream = await open_dir(store, ckdir, "hf/checkpoint-7")
    await asyncio.to_thread((ckdir / "hf/checkpoint-7/sub").mkdir)
    await write(ckdir / "hf/checkpoint-7/sub/w.bin", b"w" * 1000)
    await uploaded(backend, key(stream, "hf/checkpoint-7/sub/w.bin"))
    await stream.abort()


async def test_an_abandoned_directory_leaves_nothing_in_the_store(
    backend: Backend, store: CheckpointStore, ckdir: Path
) -> None:
    """A stream nobody commits (the trainer died before saved) is aborted: what it uploaded is deleted."""
    stream = await open_dir(store, ckdir, "run/ck")
    await write(ckdir / "run/ck/a.bin", b"a" * 10_000)
    await write(ckdir / "run/ck/b.bin", b"b" * 10_000)
    await uploaded(backend, key(stream, "run/ck/a.bin"), key(stream, "run/ck/b.bin"))
    await stream.abort()
    assert [k for k in backend.objects() if "/checkpoints/" in k] == []
    assert await store.list() == []


async def test_a_file_deleted_before_saved_is_not_committed_and_its_object_goes(
    backend: Backend, store: CheckpointStore, ckdir: Path
) -> None:
    """A file uploaded early but gone by the time of the commit is neither in the manifest nor left in the
    store; the others are adopted."""
    stream = await open_dir(store, ckdir, "run/ck")
    await write(ckdir / "run/ck/keep.bin", b"k" * 5000)
    await write(ckdir / "run/ck/scratch.bin", b"s" * 5000)
    await uploaded(backend, key(stream, "run/ck/keep.bin"), key(stream, "run/ck/scratch.bin"))
    await asyncio.to_thread((ckdir / "run/ck/scratch.bin").unlink)
    m = await store.commit(ckdir / "run/ck", checkpoint_dir=ckdir, info=info(3), streams=stream.take())
    assert m.name == stream.name
    assert [f.path for f in m.files] == ["run/ck/keep.bin"]
    assert key(stream, "run/ck/scratch.bin") not in backend.objects()


async def test_a_directory_that_is_not_there_is_refused_and_holds_nothing_back(
    store: CheckpointStore, ckdir: Path
) -> None:
    """Announcing a directory that does not exist is a StoreError naming it, and background commits are not
    held back by the stream that never started."""
    with pytest.raises(StoreError, match="cannot watch run/missing"):
        await store.open_dir_stream(
            watch=[ckdir / "run/missing"], rel="run/missing", trainer="train", step=3, rank=None
        )
    await write(ckdir / "run/p.bin", b"p")
    async with asyncio.timeout(20):
        m = await store.commit(
            ckdir / "run/p.bin", checkpoint_dir=ckdir, info=info(4), priority=Priority.BACKGROUND
        )
    assert m.files[0].path == "run/p.bin"


async def test_files_written_before_the_watch_began_count_as_closed(
    backend: Backend, store: CheckpointStore, ckdir: Path
) -> None:
    """The announcement reaches spotd a moment after the writer started, and a small save may be complete, even
    renamed into place, by then: what the directory already holds (a subdirectory's files too) goes up at once."""
    await write(ckdir / "run/step-9/a.bin", b"a" * 3000)
    await write(ckdir / "run/step-9/sub/b.bin", b"b" * 3000)
    await write(ckdir / "run/step-9/.c.tmp-1", b"c")  # a temp name: not sent
    stream = await store.open_dir_stream(
        watch=[ckdir / "run/.tmp-step-9", ckdir / "run/step-9"],  # the temp name is gone: renamed already
        rel="run/step-9",
        trainer="train",
        step=3,
        rank=None,
    )
    assert stream is not None
    await uploaded(backend, key(stream, "run/step-9/a.bin"), key(stream, "run/step-9/sub/b.bin"))
    await asyncio.to_thread((ckdir / "run/step-9/.c.tmp-1").unlink)
    m = await store.commit(ckdir / "run/step-9", checkpoint_dir=ckdir, info=info(3), streams=stream.take())
    assert m.name == stream.name
    assert {f.path for f in m.files} == {"run/step-9/a.bin", "run/step-9/sub/b.bin"}


async def test_closes_the_event_loop_has_not_read_yet_are_taken_at_saved(
    store: CheckpointStore, ckdir: Path
) -> None:
    """On a busy machine `saved` can be handled before the event loop read the last closes from inotify:
    they are read when the stream is taken, so those files count as seen too (the commit finishes them)."""
    stream = await open_dir(store, ckdir, "run/step-4")
    await write(ckdir / "run/step-4/a.bin", b"a" * 3000)
    # No await between the write and take(): the loop has had no turn to read the close.
    with open(ckdir / "run/step-4/b.bin", "wb") as f:  # noqa: ASYNC230 (blocking on purpose: see above)
        f.write(b"b" * 3000)
    taken = stream.take()
    assert sorted(f.rel for f in taken) == ["run/step-4/a.bin", "run/step-4/b.bin"]
    m = await store.commit(ckdir / "run/step-4", checkpoint_dir=ckdir, info=info(3), streams=taken)
    assert {f.path for f in m.files} == {"run/step-4/a.bin", "run/step-4/b.bin"}


async def test_a_new_subdirectory_s_files_closed_before_its_watch_count_as_seen(
    store: CheckpointStore, ckdir: Path
) -> None:
    """A subdirectory's watch begins when the loop reads its creation; on a busy machine the writer has
    closed files in it by then (DeepSpeed's global_stepN/ inside an HF checkpoint), or moved a whole
    directory in. Those files count as seen, nested ones too; a temp name does not."""
    stream = await open_dir(store, ckdir, "hf/checkpoint-5")
    root = ckdir / "hf/checkpoint-5"
    # No await in between (blocking on purpose): the loop reads none of these events before take().
    (root / "global_step5/inner").mkdir(parents=True)
    (root / "global_step5/model_states.pt").write_bytes(b"m" * 3000)
    (root / "global_step5/inner/optim_states.pt").write_bytes(b"o" * 3000)
    (root / "global_step5/.x.tmp-1").write_bytes(b"x")
    (ckdir / "elsewhere/moved").mkdir(parents=True)
    (ckdir / "elsewhere/moved/tokenizer.json").write_bytes(b"{}")
    os.rename(ckdir / "elsewhere/moved", root / "moved")
    taken = stream.take()
    assert sorted(f.rel for f in taken) == [
        "hf/checkpoint-5/global_step5/inner/optim_states.pt",
        "hf/checkpoint-5/global_step5/model_states.pt",
        "hf/checkpoint-5/moved/tokenizer.json",
    ]
    (root / "global_step5/.x.tmp-1").unlink()
    m = await store.commit(root, checkpoint_dir=ckdir, info=info(3), streams=taken)
    assert {f.path for f in m.files} == {f.rel for f in taken}


async def test_a_directory_renamed_into_place_while_it_is_listed_keeps_its_files(
    store: CheckpointStore, ckdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer may rename its temp directory into place (Accelerate's .tmp-step-N/ -> step-N/) after
    spotd watched it and before its listing ran (a thread: on a busy machine, much later): the files it
    held when watched are still found, through the open directory rather than its old name."""
    temp, final = ckdir / "run/.tmp-step-6", ckdir / "run/step-6"
    await write(temp / "model.safetensors", b"m" * 3000)
    await write(temp / "optimizer.bin", b"o" * 3000)
    real = dirstream._list_closing

    def renamed_first(fd: int) -> tuple[list[str], list[str]]:
        if temp.exists():
            os.rename(temp, final)
        return real(fd)

    monkeypatch.setattr(dirstream, "_list_closing", renamed_first)
    stream = await store.open_dir_stream(
        watch=[temp, final], rel="run/step-6", trainer="train", step=3, rank=None
    )
    assert stream is not None and final.is_dir() and not temp.exists()
    await write(final / "spotd-node-0.json", b"{}")  # closed after the watch began: reported by it
    taken = stream.take()
    want = ["run/step-6/model.safetensors", "run/step-6/optimizer.bin", "run/step-6/spotd-node-0.json"]
    assert sorted(f.rel for f in taken) == want
    m = await store.commit(final, checkpoint_dir=ckdir, info=info(3), streams=taken)
    assert sorted(f.path for f in m.files) == want


async def test_until_saved_only_a_few_requests_carry_bytes_then_all_of_them(tmp_path: Path) -> None:
    """While the directory is written, at most ``early_files`` requests (parts) of its uploads run at once,
    however many files are closed; once the commit takes it (`saved`), the parts still waiting go at once."""
    from datetime import UTC, datetime

    from spotd.store.dirstream import DirectoryUpload

    release = asyncio.Event()
    calls = running = most = entered = 0

    async def upload(f: object, key: str, priority: Priority, gate: Gate) -> str:
        """Three requests per file, each held until ``release``, counted as they enter the gate."""
        nonlocal calls, running, most, entered
        calls += 1
        for _part in range(3):
            async with gate():
                running += 1
                entered += 1
                most = max(most, running)
                await release.wait()
                running -= 1
        return "crc64nvme:AAAAAAAAAAA="

    async def nothing(keys: object) -> None:
        return None

    async def hashed(path: Path) -> tuple[int, str]:
        return 1, "crc64nvme:AAAAAAAAAAA="

    root = tmp_path / "d"
    root.mkdir()
    stream = DirectoryUpload(
        watch=[root],
        rel="d",
        prefix="job1/checkpoints/n/",
        name="n",
        created=datetime.now(UTC),
        step=1,
        trainer="t",
        rank=None,
        upload=upload,
        delete=nothing,
        hash=hashed,
        early_files=2,
        on_close=lambda: None,
    )
    await stream.start()
    for i in range(4):
        await write(root / f"f{i}", b"x")
    await async_wait_until(lambda: calls == 4 and entered == 2, what="four uploads, two requests under way")
    assert running == most == 2
    files = stream.take()
    assert len(files) == 4
    await async_wait_until(lambda: running == 4, what="the waiting requests let go at saved")
    release.set()
    for f in files:
        assert await f.finish(LocalFile(rel=f.rel, path=root / f.rel.split("/")[-1], size=1), None)
    assert entered == 12
