"""The store contract, run against both backends: file:// and s3:// (moto's server mode)."""

from __future__ import annotations

import base64
import filecmp
import os
from pathlib import Path

import pytest
from awscrt import checksums

from spotd.errors import PathEscape, RestoreError
from spotd.store import CheckpointStore
from spotd.store.base import AlreadyExists, BaseStore
from spotd.store.checksums import hash_file
from tests.store.helpers import JOB, Backend, info, same_tree, write_big


async def test_large_single_file_commit_and_restore(
    backend: Backend, store: CheckpointStore, ckdir: Path, tmp_path: Path
) -> None:
    """A 200 MB file commits data, MANIFEST and LATEST with its checksum, and restores byte-identical."""
    write_big(ckdir / "model.pt", 200 * 1024 * 1024)
    m = await store.commit(ckdir / "model.pt", checkpoint_dir=ckdir, info=info(500))
    assert [f.path for f in m.files] == ["model.pt"] and m.total_bytes == 200 * 1024 * 1024
    # auto is CRC64NVME with awscrt; the store combines part CRCs, hash_file is one sequential pass.
    assert m.files[0].checksum == hash_file(ckdir / "model.pt", "crc64nvme")[1]
    keys = backend.objects()
    assert f"{JOB}/checkpoints/{m.name}/model.pt" in keys
    assert f"{JOB}/checkpoints/{m.name}/MANIFEST.json" in keys and f"{JOB}/LATEST" in keys
    dest = tmp_path / "restored"
    result = await store.restore(dest)
    assert result.manifest == m and result.skipped == () and result.bytes == m.total_bytes
    assert filecmp.cmp(ckdir / "model.pt", dest / "model.pt", shallow=False)
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


async def test_hundred_file_directory_commit_and_restore(
    backend: Backend, store: CheckpointStore, ckdir: Path, tmp_path: Path
) -> None:
    """A 100-file directory checkpoint commits every file with a checksum and restores byte-identical."""
    step_dir = ckdir / "step_000100"
    for i in range(100):
        sub = step_dir / f"shard{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"part{i:03d}.bin").write_bytes(os.urandom(1 + i * 97))
    m = await store.commit(step_dir, checkpoint_dir=ckdir, info=info(100))
    assert len(m.files) == 100 and all(f.checksum.startswith("crc64nvme:") for f in m.files)
    entry = next(f for f in m.files if f.path == "step_000100/shard1/part001.bin")
    crc = checksums.crc64nvme((step_dir / "shard1/part001.bin").read_bytes()).to_bytes(8, "big")
    assert entry.checksum == "crc64nvme:" + base64.b64encode(crc).decode()
    assert [x.name for x in await store.list()] == [m.name]
    dest = tmp_path / "restored"
    await store.restore(dest)
    assert same_tree(ckdir, dest)


async def test_corrupted_object_falls_back(
    backend: Backend, store: CheckpointStore, ckdir: Path, tmp_path: Path
) -> None:
    """A damaged object makes restore fall back to the previous commit and name the skipped one."""
    (ckdir / "a.pt").write_bytes(b"old" * 1000)
    old = await store.commit(ckdir / "a.pt", checkpoint_dir=ckdir, info=info(1))
    (ckdir / "a.pt").write_bytes(b"new" * 1000)
    new = await store.commit(ckdir / "a.pt", checkpoint_dir=ckdir, info=info(2))
    backend.corrupt(new, "a.pt")
    result = await store.restore(tmp_path / "r")
    assert result.manifest.name == old.name and result.skipped == (new.name,)
    assert (tmp_path / "r" / "a.pt").read_bytes() == b"old" * 1000
    backend.corrupt(old, "a.pt")
    with pytest.raises(RestoreError, match="could be downloaded and verified"):
        await store.restore(tmp_path / "r2")


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_file", "symlink_in_dir"])
async def test_path_escapes_refused(
    backend: Backend, store: CheckpointStore, ckdir: Path, tmp_path: Path, case: str
) -> None:
    """Paths that escape checkpoint_dir are refused with PathEscape and nothing is uploaded."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    if case == "dotdot":
        source = ckdir / ".." / "secret.txt"
    elif case == "absolute":
        source = secret
    elif case == "symlink_file":
        source = ckdir / "link.pt"
        source.symlink_to(secret)
    else:
        source = ckdir / "step1"
        source.mkdir()
        (source / "ok.bin").write_bytes(b"ok")
        (source / "leak").symlink_to(secret)
    with pytest.raises(PathEscape, match=str(ckdir)):
        await store.commit(source, checkpoint_dir=ckdir, info=info())
    assert backend.objects() == [] or all("/checkpoints/" not in k for k in backend.objects())


async def test_retention_keeps_keep_and_ignores_orphans(
    backend: Backend, ckdir: Path, tmp_path: Path
) -> None:
    """With keep=2 only the two newest commits remain; a directory without MANIFEST is invisible."""
    store = backend.make(**{"store.keep": 2})
    try:
        names = []
        for step in range(4):
            (ckdir / "m.pt").write_bytes(os.urandom(100 + step))
            names.append((await store.commit(ckdir / "m.pt", checkpoint_dir=ckdir, info=info(step))).name)
        assert [m.name for m in await store.list()] == names[:1:-1]
        assert not [k for k in backend.objects() if names[0] in k or names[1] in k]
        backend.add_orphan("29991231T000000.000000Z-s000000099-train-ffff")  # newer than every commit
        listed = await store.list()
        assert [m.name for m in listed] == [names[3], names[2]]
        result = await store.restore(tmp_path / "r")
        assert result.manifest.name == names[3]
    finally:
        await store.close()


async def test_multi_rank_restore_is_consistent(
    backend: Backend, store: CheckpointStore, ckdir: Path, tmp_path: Path
) -> None:
    """Newest restore takes every rank of the newest complete step, skipping a step with a rank missing."""
    for step, ranks in ((10, (0, 1)), (20, (0,))):
        for r in ranks:
            (ckdir / f"s{step}-r{r}.pt").write_bytes(f"{step}/{r}".encode())
            await store.commit(
                ckdir / f"s{step}-r{r}.pt", checkpoint_dir=ckdir, info=info(step, rank=r, world_size=2)
            )
    result = await store.restore(tmp_path / "r")
    assert result.manifest.step == 10 and result.files == 2
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["s10-r0.pt", "s10-r1.pt"]


async def test_restore_by_name_and_unknown_name(store: CheckpointStore, ckdir: Path, tmp_path: Path) -> None:
    """restore(name=...) restores that commit; an unknown name is a RestoreError naming `spotd list`."""
    (ckdir / "a.pt").write_bytes(b"1")
    first = await store.commit(ckdir / "a.pt", checkpoint_dir=ckdir, info=info(1))
    (ckdir / "a.pt").write_bytes(b"2")
    await store.commit(ckdir / "a.pt", checkpoint_dir=ckdir, info=info(2))
    await store.restore(tmp_path / "r", name=first.name)
    assert (tmp_path / "r" / "a.pt").read_bytes() == b"1"
    with pytest.raises(RestoreError, match="spotd list"):
        await store.restore(tmp_path / "r", name="nope")


async def test_restore_empty_store_is_clear_error(store: CheckpointStore, tmp_path: Path) -> None:
    """Restoring from an empty store raises RestoreError saying there is nothing to restore."""
    with pytest.raises(RestoreError, match="nothing to restore"):
        await store.restore(tmp_path / "r")


async def test_access_recover_and_events(backend: Backend, store: CheckpointStore) -> None:
    """check_access passes on a usable store, recover() finds nothing to abort, write_event stores a record."""
    await store.check_access()
    assert await store.recover() == 0
    from datetime import UTC, datetime

    from spotd.events import InterruptionRecord, NoticeKind

    now = datetime.now(UTC)
    record = InterruptionRecord(
        request_id="r1",
        kind=NoticeKind.SPOT,
        action="terminate",
        reason="spot-terminate",
        final=True,
        instance_id="i-0123",
        instance_type="g5.xlarge",
        notice_time=now,
        detected_at=now,
        deadline=now,
        detect_seconds=0.0,
        checkpoint_seconds=None,
        upload_seconds=None,
        notice_to_durable_seconds=None,
        total_bytes=0,
        trainers=0,
        durable=(),
        lost=("no trainer was connected",),
    )
    key = await store.write_event(record)
    assert key.startswith(f"{JOB}/events/") and key.endswith("-i-0123.json") and key in backend.objects()


async def test_manifest_never_overwritten(backend: Backend, store: CheckpointStore) -> None:
    """A second conditional write of a MANIFEST.json is refused with AlreadyExists and leaves the first (If-None-Match: *)."""
    assert isinstance(store, BaseStore)
    key = f"{JOB}/checkpoints/x/MANIFEST.json"
    await store.put_bytes(key, b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        await store.put_bytes(key, b"second", if_absent=True)
    assert await store.get_bytes(key) == b"first"
