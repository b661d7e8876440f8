"""The local side of a checkpoint: which files a reported path means, that none escapes checkpoint_dir,
and putting a verified restore into place durably. Everything here blocks: run it on an executor."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Final, cast

from spotd.errors import PathEscape, UploadError
from spotd.store.checksums import hash_file
from spotd.store.manifest import MANIFEST, FileEntry

__all__ = [
    "RESTORE_PREFIX",
    "STATE_DIR",
    "LocalFile",
    "aside_dir_for",
    "collect_files",
    "free_bytes",
    "fsync_dir",
    "fsync_files",
    "is_disk_full",
    "make_staging",
    "move_into_place",
    "resolve_inside",
    "space_needed",
    "stage_paths",
    "start_writeback",
]

#: What a restore keeps free beyond the checkpoint's own blocks.
RESTORE_MARGIN: Final = 1024 * 1024
_BLOCK: Final = 4096

#: spotd's own directory inside checkpoint_dir: the disk marker (:mod:`~spotd.store.marker`) and what a
#: restore moved aside.
STATE_DIR: Final = ".spotd"
#: Prefix of a restore's staging directory inside the destination; removed whether the restore succeeds
#: or not.
RESTORE_PREFIX: Final = ".spotd-restore-"


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalFile:
    """One file of a checkpoint being committed, as it was when the commit started."""

    rel: str  # posix, relative to checkpoint_dir
    path: Path  # what to read (a symlink inside is read through)
    size: int


def resolve_inside(checkpoint_dir: Path, path: str) -> Path:
    """Resolve ``path`` (relative to ``checkpoint_dir``, or absolute inside it) and refuse escapes.

    Refused with :class:`PathEscape`: any ``..`` component, absolute paths elsewhere, symlinks that lead
    out, and for a directory any symlink inside it that leads out. Blocking (stat calls): run it on an
    executor for big directory trees.
    """
    root = checkpoint_dir.resolve()
    fix = f"save checkpoints inside checkpoint_dir {str(checkpoint_dir)!r} and report them relative to it"
    if not path or "\x00" in path:
        raise PathEscape(f"checkpoint path {path!r} is empty or contains NUL; fix: {fix}")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise PathEscape(
            f"checkpoint path {path!r} contains '..' (checkpoint_dir {str(checkpoint_dir)!r}); fix: {fix}"
        )
    candidate = Path(path) if pure.is_absolute() else root / path
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise PathEscape(
            f"checkpoint path {path!r} resolves to {str(resolved)!r}, outside checkpoint_dir "
            f"{str(checkpoint_dir)!r}; fix: {fix} (and make symlinks point inside it)"
        )
    if resolved.is_dir():
        for dirpath, dirnames, filenames in os.walk(resolved):
            for entry in (*dirnames, *filenames):
                p = Path(dirpath, entry)
                if p.is_symlink() and not p.resolve().is_relative_to(root):
                    raise PathEscape(
                        f"symlink {str(p)!r} in checkpoint {path!r} leads to {str(p.resolve())!r}, outside "
                        f"checkpoint_dir {str(checkpoint_dir)!r}; fix: copy the file in instead of linking it"
                    )
    return resolved


def collect_files(checkpoint_dir: Path, source: Path) -> list[LocalFile]:
    """The data files of a checkpoint; symlinked directories are not followed (they could loop)."""
    root = checkpoint_dir.resolve()
    src = resolve_inside(checkpoint_dir, str(source))
    if src.is_file():
        paths = [src]
    elif src.is_dir():
        paths = []
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath, name)
                if p.is_file():  # skips sockets, fifos and dangling links
                    paths.append(p)
    else:
        raise UploadError(
            f"checkpoint {str(source)!r} does not exist; fix: report a path the trainer has saved"
        )
    files = [LocalFile(rel=p.relative_to(root).as_posix(), path=p, size=p.stat().st_size) for p in paths]
    if not files:
        raise UploadError(
            f"checkpoint {str(source)!r} holds no files; fix: save the checkpoint before reporting it"
        )
    if any(f.rel == MANIFEST for f in files):
        raise UploadError(
            f"a checkpoint file may not be named {MANIFEST} at the top of checkpoint_dir; fix: rename it"
        )
    return files


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a crash (the file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_staging(dest: Path) -> Path:
    """A fresh directory inside ``dest`` (created if missing) for a restore to download into: on the same
    filesystem, so moving it into place is a rename."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f"{RESTORE_PREFIX}{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def stage_paths(staging: Path, rels: Sequence[str]) -> list[Path]:
    """Where each of ``rels`` lands inside ``staging``, its directories created: one pass for a whole
    restore (not a thread hop per file). :class:`PathEscape` for a path that would land outside."""
    root = staging.resolve()
    out: list[Path] = []
    made: set[Path] = set()
    for rel in rels:
        target = staging / rel
        if not target.resolve().is_relative_to(root):
            raise PathEscape(f"file {rel!r} would land outside {staging.parent}")
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        out.append(target)
    return out


def fsync_files(paths: Sequence[Path]) -> None:
    """Make every file's bytes durable, one after another on this thread: a restore's downloads only
    start their write-back (:func:`start_writeback`), so by now most of it is done and each fsync mostly
    waits for what is still in flight, instead of holding a transfer slot while the disk writes."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux (or no glibc symbol): fsync alone does the work
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


_SYNC_FILE_RANGE: Final = _sync_file_range()
_SYNC_FILE_RANGE_WRITE: Final = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes of ``fd`` to disk now, without waiting for it (Linux's
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which os does not wrap). Only a head start for the fsync
    that follows: it makes nothing durable, and a failure or a platform without it changes nothing else.
    Without it the kernel writes a restore's gigabytes only when the fsync asks (dirty pages stay in
    memory up to dirty_background_ratio, ~10% of RAM), so the disk would idle while the network works."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def space_needed(files: Sequence[FileEntry]) -> int:
    """Bytes a restore of ``files`` needs free: each file rounded up to whole blocks, one block per
    directory, and a margin (the staging copy lands beside whatever it replaces, which is freed only
    after)."""
    directories = {str(PurePosixPath(f.path).parent) for f in files}
    blocks = sum(-(-f.size // _BLOCK) for f in files) + len(directories)
    return blocks * _BLOCK + RESTORE_MARGIN


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on ``path``'s filesystem."""
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, "no space left on device" (or a quota)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def aside_dir_for(dest: Path, now: datetime) -> Path:
    """Where a restore at ``now`` moves the local files it replaces: ``<dest>/.spotd/replaced-<time>/``
    (hidden, so watch mode and the trainer's own globbing skip it). Not created here."""
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return dest / STATE_DIR / f"replaced-{stamp}-{secrets.token_hex(2)}"


def move_into_place(
    staging: Path, dest: Path, files: Sequence[FileEntry], *, aside_dir: Path
) -> tuple[str, ...]:
    """Move each verified file from ``staging`` to the same path in ``dest``; returns what was moved aside.

    The restore owns only the paths its checkpoint holds. Everything else in ``dest`` stays where it is
    (a newer local save, a NOTES.txt, other files inside a restored directory). Where a restored path is
    already taken by something different (a file with other content, a directory or a file where the
    checkpoint needs the other, a symlink), that entry is moved whole into ``aside_dir`` under its relative
    path; nothing is ever deleted. A file identical to the checkpoint's (same size and checksum) is just
    replaced by its verified copy.
    """
    moved: list[str] = []
    touched: set[Path] = {dest}

    def move_aside(rel: str) -> None:
        target = aside_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(dest / rel, target)
        touched.update((target.parent, (dest / rel).parent))
        moved.append(rel)

    for entry in {e.path: e for e in files}.values():
        parts = PurePosixPath(entry.path).parts
        for depth in range(1, len(parts)):
            rel = "/".join(parts[:depth])
            here = dest / rel
            # A symlink is moved aside, never followed: writing through it could land outside dest.
            if here.is_symlink() or (here.exists() and not here.is_dir()):
                move_aside(rel)
            if not here.is_dir():
                here.mkdir()
                touched.add(here.parent)
        target = dest / entry.path
        taken = target.is_symlink() or target.is_dir()
        if taken or (target.exists() and not _same_file(target, entry)):
            move_aside(entry.path)
        os.replace(staging / entry.path, target)
        touched.add(target.parent)
    for directory in sorted(touched, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)
    return tuple(moved)


def _same_file(path: Path, entry: FileEntry) -> bool:
    """Whether the local file holds exactly the checkpoint's bytes (size first: hashing reads it all)."""
    if path.stat().st_size != entry.size:
        return False
    algo = entry.checksum.split(":", 1)[0]
    return hash_file(path, algo) == (entry.size, entry.checksum)
