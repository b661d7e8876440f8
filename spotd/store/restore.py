"""Restore: the newest complete committed checkpoint (or a named one) downloaded, verified, made durable
and moved into place; on a failure the previous candidate.

The order, for one candidate set (one manifest, or every rank's of one step):

1. one executor hop: a staging directory inside ``dest`` (same filesystem: moving into place is a rename),
   the free-space check, and every file's directory created and checked to stay inside it;
2. every file concurrently: the backend's ``download_file`` (S3: ranged GETs hashed as they land, its
   write-back started at once), or a hash of the downloaded file when the backend did not hash it; a size
   or checksum other than the manifest's fails the set (:class:`ChecksumMismatch`) and cancels the rest;
3. one executor hop: every file fsynced, one after another (the disk has been writing since step 2);
4. one executor hop: :func:`~spotd.store.localfs.move_into_place` (renames, directories fsynced);
5. the staging directory removed, whatever happened.

So nothing is moved into place before all of the set's bytes are verified and on disk, and the per-file
cost is one transfer request and no thread hop of its own: a checkpoint of hundreds of files restores at
the speed of one big file.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from spotd.errors import ChecksumMismatch, DiskFull, NothingToRestore, PathEscape, RestoreError, StoreError
from spotd.logs import get_logger
from spotd.store.api import RestoreResult
from spotd.store.checksums import hash_file
from spotd.store.localfs import (
    aside_dir_for,
    free_bytes,
    fsync_files,
    is_disk_full,
    make_staging,
    move_into_place,
    space_needed,
    stage_paths,
)
from spotd.store.manifest import FileEntry, Manifest, safe_relative
from spotd.store.selection import named_candidates, restore_candidates
from spotd.store.tasks import gather_or_cancel

if TYPE_CHECKING:
    from spotd.metrics import Metrics

__all__ = ["RestoreSource", "restore"]

log = get_logger("spotd.store")

T = TypeVar("T")


class RestoreSource(Protocol):
    """What a restore uses of a store (:class:`~spotd.store.base.BaseStore` is one)."""

    @property
    def checkpoints_prefix(self) -> str: ...
    @property
    def metrics(self) -> Metrics | None: ...
    def url(self, key: str) -> str: ...
    async def list(self) -> list[Manifest]: ...
    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...
    async def download_file(
        self, key: str, dest: Path, *, size: int, algo: str, progress: Callable[[int], None] | None
    ) -> tuple[int, str] | None: ...


async def restore(
    store: RestoreSource,
    dest: Path,
    *,
    name: str | None,
    progress: Callable[[int, int], None] | None,
) -> RestoreResult:
    """:meth:`BaseStore.restore <spotd.store.base.BaseStore.restore>` (its docstring says what it does)."""
    started = time.monotonic()
    where = store.url(store.checkpoints_prefix)
    manifests = await store.list()
    if name is not None:
        if not safe_relative(name) or "/" in name:
            raise RestoreError(f"checkpoint name {name!r} is not a name; fix: use one shown by `spotd list`")
        candidates = named_candidates(manifests, name)
        if not candidates:
            raise RestoreError(
                f"no committed checkpoint {name!r} under {where}; fix: pick one from `spotd list`"
            )
    else:
        found = restore_candidates(manifests)
        for step in found.incomplete:
            log.warning(
                "restore.incomplete_step", step=step.step, world_size=step.world_size, ranks=list(step.ranks)
            )
        candidates = found.sets
    if not candidates:
        raise NothingToRestore(f"no complete committed checkpoint under {where}; nothing to restore")
    skipped: list[str] = []
    aside_dir = aside_dir_for(dest, datetime.now(UTC))
    for group in candidates:
        try:
            nfiles, nbytes, moved = await _restore_group(store, group, dest, aside_dir, progress)
        except DiskFull:
            # No fallback: an older checkpoint restored because this one did not fit would resume
            # from older work unnoticed; the disk has to be freed or grown either way.
            raise
        except StoreError as exc:
            names = [m.name for m in group]
            skipped.extend(names)
            log.warning("restore.fallback", failed=names, error=str(exc), error_type=type(exc).__name__)
            continue
        seconds = time.monotonic() - started
        if store.metrics is not None:
            store.metrics.restore_seconds.observe(seconds)
        log.info(
            "store.restored",
            names=[m.name for m in group],
            files=nfiles,
            bytes=nbytes,
            seconds=round(seconds, 3),
            dest=str(dest),
            skipped=skipped,
            moved_aside=len(moved),
        )
        if moved:
            log.warning(
                "restore.moved_aside",
                files=list(moved[:50]),
                count=len(moved),
                aside=str(aside_dir),
                note="these local files differed from the checkpoint's and were kept, not overwritten",
            )
        return RestoreResult(
            manifest=group[0],
            files=nfiles,
            bytes=nbytes,
            seconds=seconds,
            skipped=tuple(skipped),
            moved_aside=moved,
            aside_dir=aside_dir if moved else None,
        )
    raise RestoreError(
        f"no committed checkpoint under {where} could be downloaded and verified "
        f"(tried {', '.join(skipped)}); see the restore.fallback log lines"
    )


def _prepare(dest: Path, rels: Sequence[str], need: int) -> tuple[Path, int, list[Path]]:
    """The staging directory, the free bytes there, and every file's place in it. Blocking."""
    staging = make_staging(dest)
    try:
        free = free_bytes(staging)
        # Checked before the first byte: on a full disk every part would fail, each read as a store error,
        # and every older checkpoint would be tried in turn.
        targets = stage_paths(staging, rels) if free >= need else []
    except BaseException:
        shutil.rmtree(staging, True)
        raise
    return staging, free, targets


async def _restore_group(
    store: RestoreSource,
    group: Sequence[Manifest],
    dest: Path,
    aside_dir: Path,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int, tuple[str, ...]]:
    entries = [(m, f) for m in group for f in m.files]
    files = [f for _, f in entries]
    total = sum(f.size for f in files)
    need = space_needed(files)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    def disk_full(free: int) -> DiskFull:
        return DiskFull(
            directory=str(dest),
            need=need,
            free=free,
            checkpoint=", ".join(m.name for m in group),
            checkpoint_bytes=total,
        )

    staging: Path | None = None
    try:
        try:
            prepared = await store.run(_prepare, dest, [f.path for f in files], need)
        except PathEscape as exc:
            raise RestoreError(f"{', '.join(m.name for m in group)}: {exc}") from exc
        staging, free, targets = prepared
        if free < need:
            raise disk_full(free)
        if progress is not None:
            progress(0, total)
        await gather_or_cancel(
            [
                _fetch_verified(
                    store, f"{store.checkpoints_prefix}{m.name}/{f.path}", target, f, m.name, advance
                )
                for (m, f), target in zip(entries, targets, strict=True)
            ]
        )
        await store.run(fsync_files, targets)
        at: Path = staging
        moved = await store.run(lambda: move_into_place(at, dest, files, aside_dir=aside_dir))
    except (StoreError, OSError) as exc:
        if isinstance(exc, DiskFull) or not is_disk_full(exc):
            raise
        # Space taken while the restore ran (or more than the margin allowed for).
        raise disk_full(await store.run(free_bytes, dest)) from exc
    finally:
        if staging is not None:
            await store.run(shutil.rmtree, staging, True)
    return len(files), total, moved


async def _fetch_verified(
    store: RestoreSource, key: str, target: Path, entry: FileEntry, name: str, advance: Callable[[int], None]
) -> None:
    algo = entry.checksum.split(":", 1)[0]
    hashed = await store.download_file(key, target, size=entry.size, algo=algo, progress=advance)
    if hashed is None:
        hashed = await store.run(hash_file, target, algo)
    size, checksum = hashed
    if size != entry.size or checksum != entry.checksum:
        raise ChecksumMismatch(
            f"{name}: {entry.path} has size {size} and {checksum}, the manifest says {entry.size} and "
            f"{entry.checksum}; the stored object is damaged"
        )
