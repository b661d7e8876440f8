"""A restore onto a full disk says "disk full" at once, on a real small filesystem (issue 10, #8)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from spotd.cli import main
from spotd.errors import DiskFull, RestoreError
from spotd.store import CheckpointStore
from tests.fixtures.disk import fill
from tests.store.helpers import JOB, Backend, info

MIB = 1024 * 1024


async def two_checkpoints(store: CheckpointStore, ckdir: Path) -> None:
    """An older 1 MiB checkpoint and a newer 4 MiB one (two files)."""
    (ckdir / "a.pt").write_bytes(os.urandom(MIB))
    await store.commit(ckdir / "a.pt", checkpoint_dir=ckdir, info=info(1))
    (ckdir / "b.pt").write_bytes(os.urandom(2 * MIB))
    (ckdir / "c.pt").write_bytes(os.urandom(2 * MIB))
    await store.commit(ckdir, checkpoint_dir=ckdir, info=info(2))


def left_on(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir())


async def test_restore_onto_a_full_disk_fails_at_once(
    backend: Backend, store: CheckpointStore, ckdir: Path, small_disk: Any
) -> None:
    """With 1 MiB free for a 5 MiB checkpoint the restore raises DiskFull (a RestoreError and an OSError, ENOSPC) naming the sizes, the directory and the fix; nothing is downloaded and no older checkpoint is tried."""
    await two_checkpoints(store, ckdir)
    disk = small_disk(8)
    fill(disk, leave_bytes=MIB)

    with capture_logs() as logs, pytest.raises(DiskFull) as caught:
        await store.restore(disk)

    message = str(caught.value)
    assert message.startswith("disk full: need 5.0 MiB for checkpoint ")
    assert f"free in {disk}; fix: free space" in message
    assert isinstance(caught.value, RestoreError) and isinstance(caught.value, OSError)
    assert caught.value.errno == errno.ENOSPC and caught.value.need >= 5 * MIB
    assert not [e for e in logs if e["event"] in ("restore.fallback", "store.restored")]
    assert left_on(disk) == ["filler"]


async def test_disk_filling_up_during_the_download_is_disk_full_too(
    backend: Backend, store: CheckpointStore, ckdir: Path, small_disk: Any
) -> None:
    """Space taken by someone else once the restore has started (ENOSPC while writing) is DiskFull as well, with no fallback, and the partial download is removed."""
    await two_checkpoints(store, ckdir)
    disk = small_disk(16)
    filled: list[Path] = []

    def progress(done: int, total: int) -> None:
        if not filled:  # the first report comes before any byte is written
            filled.append(fill(disk, leave_bytes=0))

    with capture_logs() as logs, pytest.raises(DiskFull, match=r"^disk full: need 5\.0 MiB"):
        await store.restore(disk, progress=progress)

    assert filled
    assert not [e for e in logs if e["event"] in ("restore.fallback", "store.restored")]
    assert left_on(disk) == ["filler"]


async def test_restore_fits_when_there_is_room(
    backend: Backend, store: CheckpointStore, ckdir: Path, small_disk: Any
) -> None:
    """The same restore onto the same small disk with room to spare succeeds (the check is not too strict)."""
    await two_checkpoints(store, ckdir)
    disk = small_disk(8)
    fill(disk, leave_bytes=6 * MIB + 512 * 1024)
    result = await store.restore(disk)
    assert result.manifest.step == 2 and sorted(left_on(disk)) == ["a.pt", "b.pt", "c.pt", "filler"]


def test_cli_restore_onto_a_full_disk_says_disk_full(
    tmp_path: Path, small_disk: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`spotd restore` onto a full disk exits 1 with the disk-full message, not a store or credentials one."""
    import asyncio

    from spotd.store.file import FileStore

    async def seed() -> None:
        store = FileStore(uri=f"file://{tmp_path / 'store'}", job_id=JOB)
        src = tmp_path / "src"
        src.mkdir()
        try:
            await two_checkpoints(store, src)
        finally:
            await store.close()

    asyncio.run(seed())
    disk = small_disk(8)
    fill(disk, leave_bytes=MIB)
    monkeypatch.setenv("SPOTD_STORE_URI", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("SPOTD_JOB_ID", JOB)

    assert main(["restore", "--to", str(disk)]) == 1

    err = capsys.readouterr().err
    assert err.startswith("spotd restore: disk full: need 5.0 MiB") and "credentials" not in err
