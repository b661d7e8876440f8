"""A Checkpointer's files on the local disk: names, atomic writes, what a restart finds, what retention drops.

``<checkpoint_dir>/<name>/step-<steps done, 9 digits>[-rank<rank, 5 digits>].pt``; a write goes to a hidden
temp name in the same directory first, so a file under its final name is always complete.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spotd.errors import SpotdError

__all__ = [
    "CheckpointError",
    "LocalCheckpoint",
    "expired",
    "filename",
    "fsync_dir",
    "remove_stale_temps",
    "scan",
    "write_atomic",
]


class CheckpointError(SpotdError, OSError):
    """A checkpoint could not be written, or none of the existing ones can be used."""


@dataclass(slots=True)
class LocalCheckpoint:
    """One file this process saved or found; ``durable`` once the daemon said it is in the store."""

    step: int
    path: Path
    durable: bool


def _rank_suffix(rank: int, world_size: int) -> str:
    return f"-rank{rank:05d}" if world_size > 1 else ""


def filename(step: int, *, rank: int, world_size: int) -> str:
    return f"step-{step:09d}{_rank_suffix(rank, world_size)}.pt"


def scan(directory: Path, *, rank: int, world_size: int) -> list[tuple[int, Path]]:
    """(step, path) of this rank's complete files in ``directory``, in no particular order."""
    pattern = re.compile(rf"^step-(\d{{9}}){_rank_suffix(rank, world_size)}\.pt$")
    found = []
    for entry in directory.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return found


def remove_stale_temps(directory: Path, *, rank: int, world_size: int) -> None:
    """Delete this rank's temp files left by a process killed mid-save (never complete, never restored)."""
    mine = f".tmp-{os.getpid()}"
    for entry in directory.glob(".step-*.pt.tmp-*"):
        ours = world_size == 1 or f"-rank{rank:05d}." in entry.name
        if ours and not entry.name.endswith(mine):
            entry.unlink(missing_ok=True)


def temp_path(final_path: Path) -> Path:
    """Where :func:`write_atomic` writes ``final_path``'s bytes before renaming them into place."""
    return final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}")


def write_atomic(
    final_path: Path, payload: dict[str, Any], *, before_write: Callable[[Path], None] | None = None
) -> int:
    """Temp file in the same directory, fsync, rename, fsync the directory: complete or absent. Returns
    the size written. ``before_write(temp)`` is called first (the Checkpointer tells spotd where the bytes
    will appear, so an emergency upload can start while they are written)."""
    tmp = temp_path(final_path)
    if before_write is not None:
        before_write(tmp)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, final_path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write (ENOSPC included) as RuntimeError from its zip writer.
        if isinstance(exc, (OSError, RuntimeError)):
            raise CheckpointError(_write_failure(final_path, exc)) from exc
        raise
    fsync_dir(final_path.parent)
    return size


def _write_failure(final_path: Path, exc: BaseException) -> str:
    directory = final_path.parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        free is not None and free < 64 * 1024 * 1024
    )
    if full:
        left = "" if free is None else f", {free / 2**20:.1f} MiB free"
        return (
            f"writing {final_path} failed: disk full{left} ({exc}); fix: free space in {directory} (old "
            "checkpoints, logs, data) or point checkpoint_dir at a bigger volume"
        )
    return f"writing {final_path} failed: {exc}; fix: make {directory} writable and check its disk"


def fsync_dir(path: Path) -> None:
    # Without this the rename itself may not survive a power cut, even though the data does.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def expired(local: Iterable[LocalCheckpoint], *, keep: int) -> list[LocalCheckpoint]:
    """What retention may delete: beyond the newest ``keep``, and only at or below the newest durable step
    (a file the store may not hold yet is never the one dropped)."""
    ordered = sorted(local, key=lambda c: c.step, reverse=True)
    newest_durable = max((c.step for c in ordered if c.durable), default=None)
    if newest_durable is None:
        return []
    return [c for c in ordered[keep:] if c.step <= newest_durable]
