"""What a restore does to the destination's own files: it never deletes one it did not bring (issue 10, #7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from spotd.cli import main
from spotd.store import CheckpointStore
from spotd.store.file import FileStore
from tests.store.helpers import JOB, info


@pytest.fixture
async def file_store(tmp_path: Path) -> FileStore:
    store = FileStore(uri=f"file://{tmp_path / 'store'}", job_id=JOB)
    try:
        yield store
    finally:
        await store.close()


async def commit_run_dir(store: CheckpointStore, ckdir: Path, step: int) -> None:
    """A directory checkpoint ``run/`` holding ``model.pt`` and ``opt.pt`` of ``step``."""
    run = ckdir / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "model.pt").write_bytes(f"model {step}".encode())
    (run / "opt.pt").write_bytes(f"opt {step}".encode())
    await store.commit(run, checkpoint_dir=ckdir, info=info(step))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_restore_keeps_newer_and_unrelated_local_files(file_store: FileStore, tmp_path: Path) -> None:
    """Files the checkpoint does not hold stay where they are: a newer local save inside the restored directory, and a NOTES.txt beside and inside it."""
    await commit_run_dir(file_store, tmp_path / "src", 500)
    dest = tmp_path / "ckpt"
    (dest / "run").mkdir(parents=True)
    (dest / "run" / "step-600.pt").write_bytes(b"newer local save")
    (dest / "run" / "NOTES.txt").write_bytes(b"inside")
    (dest / "NOTES.txt").write_bytes(b"beside")

    result = await file_store.restore(dest)

    assert tree(dest) == {
        "NOTES.txt": b"beside",
        "run/NOTES.txt": b"inside",
        "run/model.pt": b"model 500",
        "run/opt.pt": b"opt 500",
        "run/step-600.pt": b"newer local save",
    }
    assert result.moved_aside == () and result.aside_dir is None


async def test_a_different_local_file_of_the_same_name_is_moved_aside(
    file_store: FileStore, tmp_path: Path
) -> None:
    """A local file the restore replaces with different content is moved into .spotd/replaced-<time>/ (same relative path), named in the result and in a warning; an identical one is just kept."""
    await commit_run_dir(file_store, tmp_path / "src", 500)
    dest = tmp_path / "ckpt"
    (dest / "run").mkdir(parents=True)
    (dest / "run" / "model.pt").write_bytes(b"model 600, newer, never uploaded")
    (dest / "run" / "opt.pt").write_bytes(b"opt 500")  # what the checkpoint holds already

    with capture_logs() as logs:
        result = await file_store.restore(dest)

    assert result.moved_aside == ("run/model.pt",)
    assert result.aside_dir is not None and result.aside_dir.parent == dest / ".spotd"
    assert result.aside_dir.name.startswith("replaced-")
    assert (result.aside_dir / "run" / "model.pt").read_bytes() == b"model 600, newer, never uploaded"
    assert (dest / "run" / "model.pt").read_bytes() == b"model 500"
    assert (dest / "run" / "opt.pt").read_bytes() == b"opt 500"
    (warning,) = [e for e in logs if e["event"] == "restore.moved_aside"]
    assert warning["log_level"] == "warning" and warning["files"] == ["run/model.pt"]
    assert warning["aside"] == str(result.aside_dir)


async def test_type_conflicts_are_moved_aside_never_removed(file_store: FileStore, tmp_path: Path) -> None:
    """A local directory where the checkpoint has a file, and a local file where it has a directory, are moved aside whole, their contents intact."""
    src = tmp_path / "src"
    (src / "run").mkdir(parents=True)
    (src / "run" / "model.pt").write_bytes(b"model")
    (src / "weights.pt").write_bytes(b"weights")
    await file_store.commit(src, checkpoint_dir=src, info=info(1))
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "run").write_bytes(b"a file named run")
    (dest / "weights.pt").mkdir()
    (dest / "weights.pt" / "inside.txt").write_bytes(b"kept")

    result = await file_store.restore(dest)

    assert sorted(result.moved_aside) == ["run", "weights.pt"]
    assert result.aside_dir is not None
    assert (result.aside_dir / "run").read_bytes() == b"a file named run"
    assert (result.aside_dir / "weights.pt" / "inside.txt").read_bytes() == b"kept"
    assert (dest / "run" / "model.pt").read_bytes() == b"model"
    assert (dest / "weights.pt").read_bytes() == b"weights"


async def test_a_symlinked_directory_is_moved_aside_not_written_through(
    file_store: FileStore, tmp_path: Path
) -> None:
    """A local symlink where the checkpoint has a directory is moved aside as a link: nothing is written where it points."""
    await commit_run_dir(file_store, tmp_path / "src", 5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.pt").write_bytes(b"not yours to replace")
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "run").symlink_to(elsewhere)

    result = await file_store.restore(dest)

    assert result.moved_aside == ("run",)
    assert result.aside_dir is not None and (result.aside_dir / "run").is_symlink()
    assert (elsewhere / "model.pt").read_bytes() == b"not yours to replace"
    assert not (dest / "run").is_symlink() and (dest / "run" / "model.pt").read_bytes() == b"model 5"


async def test_restoring_twice_moves_nothing_aside(file_store: FileStore, tmp_path: Path) -> None:
    """Restoring the same checkpoint again into the same place finds identical files and moves nothing."""
    await commit_run_dir(file_store, tmp_path / "src", 5)
    dest = tmp_path / "ckpt"
    await file_store.restore(dest)
    again = await file_store.restore(dest)
    assert again.moved_aside == () and not (dest / ".spotd").exists()


def test_cli_restore_says_what_it_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`spotd restore` into a checkpoint_dir holding a different file of the same name keeps it, and says where."""
    import asyncio

    async def seed() -> None:
        store = FileStore(uri=f"file://{tmp_path / 'store'}", job_id=JOB)
        try:
            await commit_run_dir(store, tmp_path / "src", 500)
        finally:
            await store.close()

    asyncio.run(seed())
    dest = tmp_path / "ckpt"
    (dest / "run").mkdir(parents=True)
    (dest / "run" / "model.pt").write_bytes(b"mine")
    (dest / "NOTES.txt").write_bytes(b"notes")
    monkeypatch.setenv("SPOTD_STORE_URI", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("SPOTD_JOB_ID", JOB)
    monkeypatch.setenv("SPOTD_CHECKPOINT_DIR", str(dest))

    assert main(["restore"]) == 0

    err = capsys.readouterr().err
    aside = next((dest / ".spotd").glob("replaced-*"))
    assert f"moved 1 local file the restore replaced into {aside}" in err and "run/model.pt" in err
    assert (aside / "run" / "model.pt").read_bytes() == b"mine"
    assert (dest / "NOTES.txt").read_bytes() == b"notes"
    assert os.path.exists(dest / "run" / "opt.pt")
