"""The files of a checkpoint directory uploaded one by one as each is closed, while the rest is still being
written: a sharded (DCP) save, a Hugging Face ``checkpoint-N/``, an Accelerate ``save_state``.

The trainer announces the directory before writing into it (a ``writing`` frame with ``dir``);
:class:`DirectoryUpload` watches it with inotify and uploads every file the moment the kernel reports it
closed after writing (``IN_CLOSE_WRITE``) or renamed into the directory (``IN_MOVED_TO``: DCP's
``.metadata``, any temp-then-rename writer), under the key the checkpoint will be committed as. A name that
is only a temporary (``*.tmp``, ``.x.tmp-123``) is skipped: its rename brings it back under its real name.
It follows a directory renamed into place (Accelerate's ``.tmp-step-N/`` → ``step-N/``): a watch belongs
to the inode, not the path.

Until ``saved``, at most a few requests carry its bytes at once (:attr:`DirectoryUpload.slots`, half a
part per core: the writer keeps its cores); from ``saved`` on, what is still under way goes at the pool's
full concurrency.

Nothing is committed by it. When the trainer says ``saved``, :meth:`DirectoryUpload.take` stops watching
and hands the commit one :class:`ClosedFile` per file seen; the commit finishes each
(:meth:`ClosedFile.finish`: waits for its upload, then hashes the file as it is now, and only when size and
checksum equal what was sent does it count as uploaded; otherwise, or if it never started, the commit
uploads it as always). A file the commit does not contain is aborted: its object deleted. The manifest
is written after every file is settled, as for any commit: a file that changed after it went out is sent
again, never committed wrong.

It uses only the backend's ``upload_file`` and ``delete_keys`` primitives, so every backend gets it.
Linux only (inotify); elsewhere, or where the directory cannot be watched, there is no head start and the
files are uploaded at ``saved``, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final

from spotd.errors import StoreError
from spotd.logs import get_logger
from spotd.store.api import Gate, Priority
from spotd.store.localfs import LocalFile
from spotd.store.manifest import Provenance

__all__ = ["ClosedFile", "DirectoryUpload", "in_progress_name", "watchable"]

log = get_logger("spotd.store")

try:  # Linux only; elsewhere a directory is uploaded at saved, as always.
    import inotify_simple
except (ImportError, OSError):  # pragma: no cover - not Linux
    inotify_simple = None

#: The events that mean a file is complete as far as its writer is concerned, and a new subdirectory.
_CLOSE_WRITE: Final = 0x00000008
_MOVED_TO: Final = 0x00000080
_CREATE: Final = 0x00000100
_Q_OVERFLOW: Final = 0x00004000
_ISDIR: Final = 0x40000000
_ONLYDIR: Final = 0x01000000
_MASK: Final = _CLOSE_WRITE | _MOVED_TO | _CREATE


def watchable() -> bool:
    """Whether this system can watch a directory being written (Linux inotify)."""
    return inotify_simple is not None and sys.platform.startswith("linux")


def in_progress_name(name: str) -> bool:
    """A name a writer uses only until it renames the file into place (``x.tmp``, ``.x.pt.tmp-123``,
    ``tmp-x``, ``x.partial``): its close is not the file's completion."""
    return (
        name.endswith((".tmp", ".partial"))
        or ".tmp-" in name
        or ".tmp." in name
        or name.startswith(("tmp-", "tmp_"))
    )


class ClosedFile:
    """One file of an announced directory that was closed while the directory was watched: its upload
    (maybe still running), and what it sent. The commit ``finish``-es or ``abort``-s it."""

    __slots__ = (
        "_again",
        "_finished",
        "_key",
        "_owner",
        "_result",
        "_started",
        "_task",
        "rel",
        "sent_early",
        "sub",
    )

    def __init__(self, *, owner: DirectoryUpload, sub: str, rel: str, key: str) -> None:
        self._owner = owner
        self.sub = sub  # the path inside the announced directory
        self.rel = rel  # relative to checkpoint_dir, as the manifest will list it
        self._key = key
        self._task: asyncio.Task[tuple[int, str] | None] | None = None
        self._started = False  # an upload began: an object may exist under its key
        self._again = False  # closed again while its upload ran: send it once more
        self._result: tuple[int, str] | None = None
        self._finished = False  # the commit took it: its key is the commit's now
        self.sent_early = 0

    @property
    def name(self) -> str:
        return self._owner.name

    @property
    def created(self) -> datetime:
        return self._owner.created

    def matches(self, info: Provenance) -> bool:
        return self._owner.matches(info)

    def closed(self) -> None:
        """The writer closed (or renamed in) this file: upload it, or once more after the running upload."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._upload())
        elif self._started:
            self._again = True

    async def _upload(self) -> tuple[int, str] | None:
        owner = self._owner
        while True:
            if self._again and owner.stopped:
                return None  # changed again and saved meanwhile: the commit sends it
            self._started = True
            self._again = False
            result = await owner.send(self.sub, self.rel, self._key)
            if result is not None:
                self._result = result
            if not self._again:
                return self._result

    async def _settled(self) -> tuple[int, str] | None:
        """What the last upload sent (size, checksum), or None: nothing (it failed). An upload under way
        is waited for (from ``saved`` on, its parts go at the pool's full concurrency)."""
        task = self._task
        if task is None:
            return None
        results = await asyncio.gather(task, return_exceptions=True)
        return results[0] if isinstance(results[0], tuple) else None

    async def finish(self, file: LocalFile, progress: Callable[[int], None] | None) -> str | None:
        """``file``'s checksum when what was uploaded is byte for byte the file as it is now (hashed again
        from disk); None otherwise: the commit uploads it (to the same key)."""
        self._finished = True
        sent = await self._settled()
        if sent is None or sent[0] != file.size:
            return None
        size, checksum = await self._owner.hash(file.path)
        if (size, checksum) != sent:
            log.warning(
                "store.dir_file_changed",
                rel=self.rel,
                note="the file changed after it was uploaded; sent again from the final file",
            )
            return None
        self.sent_early = size
        if progress is not None:
            progress(size)
        return checksum

    async def abort(self) -> None:
        """Not part of the commit: its object (if one was written) is deleted. After :meth:`finish`, nothing
        (the commit wrote or adopted that key)."""
        if self._finished:
            return
        self._finished = True
        if await self._settled() is not None or self._started:
            await self._owner.forget(self._key)


class DirectoryUpload:
    """An announced directory, watched: each file closed in it is uploaded at once (see the module)."""

    __slots__ = (
        "_delete",
        "_ended",
        "_files",
        "_hash",
        "_inotify",
        "_loop",
        "_on_close",
        "_paths",
        "_prefix",
        "_send",
        "_subdirs",
        "_waiting",
        "created",
        "name",
        "rank",
        "rel",
        "slots",
        "step",
        "stopped",
        "trainer",
    )

    def __init__(
        self,
        *,
        watch: Sequence[Path],
        rel: str,
        prefix: str,
        name: str,
        created: datetime,
        step: int | None,
        trainer: str,
        rank: int | None,
        upload: Callable[[LocalFile, str, Priority, Gate], Awaitable[str]],
        delete: Callable[[Sequence[str]], Awaitable[None]],
        hash: Callable[[Path], Awaitable[tuple[int, str]]],
        early_files: int,
        on_close: Callable[[], None],
    ) -> None:
        """``watch``: where the directory's files are written, tried in order (its temp name first, then the
        final one); ``rel``: the directory relative to checkpoint_dir (its final name); ``prefix``: the
        store key its files go under (``<job>/checkpoints/<name>/``); ``upload``/``delete``/``hash``: the
        backend's ``upload_file``, ``delete_keys`` and a hash of a local file on its executor."""
        self._paths = tuple(watch)
        self.rel = rel.rstrip("/")
        self._prefix = prefix
        self.name = name
        self.created = created
        self.step = step
        self.trainer = trainer
        self.rank = rank
        self._send = upload
        self._delete = delete
        self._hash = hash
        self._on_close = on_close
        self._ended = False
        #: Requests (parts) carrying bytes at once while the directory is written: the writer keeps its
        #: cores. From ``saved`` on (:attr:`stopped`), no limit: the commit waits for them.
        self.slots = asyncio.Semaphore(early_files)
        self._waiting = 0
        self.stopped = False
        self._files: dict[str, ClosedFile] = {}
        self._subdirs: dict[int, str] = {}  # watch descriptor → path inside the directory ("" the top)
        self._inotify: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def matches(self, info: Provenance) -> bool:
        """Whether a commit of ``info`` is the save this directory was announced for."""
        return (info.step, info.trainer, info.rank) == (self.step, self.trainer, self.rank)

    async def start(self) -> None:
        """Watch the directory (it exists: the trainer made it before announcing), and take the files already
        in it as closed: the announcement reaches spotd a moment after the writer started, and a small save
        may be done (even renamed into place) by then. A file still being written when it is found is sent
        early for nothing and again at its close; the commit's check keeps only what equals the final file.
        Raises OSError when neither path is a directory."""
        assert inotify_simple is not None
        self._inotify = inotify_simple.INotify(nonblocking=True)
        top = None
        try:
            for path in self._paths:  # the temp name first: it may have been renamed into place meanwhile
                try:
                    top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                # Watched and listed through the open directory, not its name: the writer may rename it
                # into place at any moment, and the listing (a thread, later) must still see its files.
                try:
                    wd = self._inotify.add_watch(f"/proc/self/fd/{top}", _MASK | _ONLYDIR)
                except OSError:  # no /proc: by its name
                    wd = self._inotify.add_watch(path, _MASK | _ONLYDIR)
                self._subdirs[wd] = ""
                break
            if top is None:
                raise FileNotFoundError(f"none of {[str(p) for p in self._paths]} is a directory")
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._inotify.fileno(), self._read)
            listing, top = top, None  # the thread closes it, even if this is cancelled meanwhile
            subdirs, files = await asyncio.to_thread(_list_closing, listing)
        except BaseException:
            self._stop_watching()
            raise
        finally:
            if top is not None:
                os.close(top)
        for sub in subdirs:
            self._watch_subdir(sub)
        for sub in files:
            if not in_progress_name(PurePosixPath(sub).name):
                self._closed(sub)

    def _read(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except (BlockingIOError, OSError):
            return
        for event in events:
            if event.mask & _Q_OVERFLOW:
                # Closes were lost: those files are uploaded at saved, as always.
                log.info("store.dir_events_lost", rel=self.rel)
                continue
            parent = self._subdirs.get(event.wd)
            if parent is None or not event.name:
                continue
            sub = f"{parent}/{event.name}" if parent else event.name
            if event.mask & _ISDIR:
                if event.mask & (_CREATE | _MOVED_TO):
                    self._new_subdir(sub)
                continue
            if event.mask & _CLOSE_WRITE and in_progress_name(event.name):
                continue
            if event.mask & (_CLOSE_WRITE | _MOVED_TO):
                self._closed(sub)

    def _watch_subdir(self, sub: str) -> Path | None:
        """Watch the subdirectory ``sub``; the path it was watched at (None: it is gone)."""
        for root in self._paths:
            with contextlib.suppress(OSError):
                self._subdirs[self._inotify.add_watch(root / sub, _MASK)] = sub
                return root / sub
        return None

    def _new_subdir(self, sub: str) -> None:
        """A subdirectory created (or moved) into the directory. Its watch begins only now, when the loop
        reads the event: on a busy machine the writer may have closed files in it already (DeepSpeed's
        ``global_stepN/``), or made subdirectories of its own. What it holds now counts as closed, as at
        :meth:`start`; what is closed from now on the watch reports. A fresh directory holds a few entries:
        listed here, on the loop, so none is lost to a ``take`` in between."""
        path = self._watch_subdir(sub)
        if path is None:
            return
        try:
            subdirs, files = _list_closing(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError:
            return
        for nested in subdirs:
            self._watch_subdir(f"{sub}/{nested}")
        for rel in files:
            name = f"{sub}/{rel}"
            if name not in self._files and not in_progress_name(PurePosixPath(rel).name):
                self._closed(name)

    def _closed(self, sub: str) -> None:
        entry = self._files.get(sub)
        if entry is None:
            rel = str(PurePosixPath(self.rel) / sub)
            entry = self._files[sub] = ClosedFile(owner=self, sub=sub, rel=rel, key=self._prefix + rel)
        entry.closed()

    @contextlib.asynccontextmanager
    async def gate(self) -> AsyncIterator[None]:
        """Entered around each request of an early upload: at most ``early_files`` at once until ``saved``."""
        if self.stopped:
            yield
            return
        self._waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self.slots.release()

    async def send(self, sub: str, rel: str, key: str) -> tuple[int, str] | None:
        """Upload the file ``sub`` now (its current bytes): (size, checksum sent), None if that failed."""
        for root in self._paths:
            path = root / sub
            try:
                size = (await asyncio.to_thread(os.stat, path)).st_size
            except OSError:
                continue
            try:
                checksum = await self._send(
                    LocalFile(rel=rel, path=path, size=size), key, Priority.EMERGENCY, self.gate
                )
            except (StoreError, OSError) as exc:  # only a head start: the commit uploads it
                log.info("store.dir_file_deferred", rel=rel, error=str(exc))
                return None
            return size, checksum
        return None

    async def hash(self, path: Path) -> tuple[int, str]:
        return await self._hash(path)

    async def forget(self, key: str) -> None:
        try:
            await self._delete([key])
        except StoreError as exc:  # an orphan under an uncommitted name: retention removes it later
            log.warning("store.dir_file_not_deleted", key=key, error=str(exc))

    def _stop_watching(self) -> None:
        self.stopped = True
        for _ in range(self._waiting):  # parts waiting for a slot go now (see gate)
            self.slots.release()
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def take(self) -> tuple[ClosedFile, ...]:
        """Stop watching; every file seen closed, for the commit to finish or abort (files not seen are
        uploaded by the commit as always)."""
        if self._inotify is not None:
            # Closes the event loop has not read yet (a busy machine): the saver is done, they are final.
            self._read()
        self._stop_watching()
        files = tuple(self._files.values())
        self._files = {}
        self._close()
        log.info(
            "store.dir_stream_taken",
            rel=self.rel,
            name=self.name,
            files_seen=len(files),
            seen=sorted(f.sub for f in files)[:20],
        )
        return files

    async def abort(self) -> None:
        """Nobody will commit it: stop watching and delete whatever it uploaded."""
        self._stop_watching()
        files, self._files = tuple(self._files.values()), {}
        self._close()
        for f in files:
            await f.abort()
        log.info("store.dir_stream_aborted", rel=self.rel, name=self.name, files=len(files))

    def _close(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_close()


def _list_closing(fd: int) -> tuple[list[str], list[str]]:
    """The subdirectories and regular files under the open directory ``fd`` (what it holds even after a
    rename), as posix paths relative to it; closes ``fd``. Blocking."""
    subdirs: list[str] = []
    files: list[str] = []
    try:
        for root, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=fd):
            rel = PurePosixPath(root)
            subdirs += [(rel / d).as_posix() for d in dirnames]
            for f in filenames:
                with contextlib.suppress(OSError):  # gone meanwhile
                    if stat.S_ISREG(os.stat(f, dir_fd=dirfd).st_mode):
                        files.append((rel / f).as_posix())
    finally:
        os.close(fd)
    return subdirs, files
