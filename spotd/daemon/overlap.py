"""Upload overlapped with the save: a trainer's ``writing`` frame opens a store stream for the file it is
about to write (:meth:`~spotd.store.CheckpointStore.open_stream`), whose complete parts go to S3 while the
file grows, or for the directory it is about to fill (``dir``: :meth:`~spotd.store.CheckpointStore.
open_dir_stream`), each of whose files goes up the moment it is closed; its ``saved`` hands the streams to
that save's commit, which checks every byte against the final files, sends the rest and only then writes
the manifest (:mod:`spotd.store.stream`, :mod:`spotd.store.dirstream`).

A rank of a multi-rank run streams the same way, under the name its step will be committed as
(:func:`~spotd.store.selection.run_checkpoint_name`, given by the coordinator): its ``saved`` hands the
stream to :mod:`.parts`, which keeps it with that rank's save until every local rank has reported, then hands
them all to the node part's commit (or aborts them when the step is given up).

Only emergency saves overlap (``store.overlap``, on by default): a save an open final episode asked this
trainer for, or one the trainer marks ``final`` (SIGTERM). A periodic save is uploaded at background pace
after it is reported, as always: it competes with training for the cores, and nothing is in a hurry.

A stream is never committed by itself. One its trainer never reports (it crashed, or disconnected before
``saved``) is aborted, as is one replaced by a newer announcement of the same file, and every one left
when the daemon drains; ``recover()`` at the next start sweeps those of a daemon that died.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spotd.daemon.ipc import Session
from spotd.errors import PathEscape, ProtocolError, StoreError
from spotd.logs import get_logger
from spotd.protocol import E_PATH
from spotd.store import CheckpointStore, DirStream, FileStream, resolve_inside, watchable

__all__ = ["Overlap"]

log = get_logger("spotd.overlap")


class Overlap:
    """The streams trainers announced and have not reported yet, per session."""

    __slots__ = ("_checkpoint_dir", "_dirs", "_pending", "_spawn", "_store", "enabled")

    def __init__(
        self,
        *,
        store: CheckpointStore,
        checkpoint_dir: Path,
        enabled: bool,
        spawn: Callable[[Any], None],
    ) -> None:
        """``checkpoint_dir`` resolved; ``spawn(coro)`` runs an abort in the background (disconnects are
        synchronous)."""
        self._store = store
        self._checkpoint_dir = checkpoint_dir
        self.enabled = enabled
        self._spawn = spawn
        self._pending: dict[str, dict[str, FileStream]] = {}
        self._dirs: dict[str, dict[str, DirStream]] = {}

    def welcome(self) -> dict[str, bool]:
        """What a trainer may announce (its welcome's ``writing`` and ``writing_dirs``)."""
        return {"writing": self.enabled, "writing_dirs": self.enabled and watchable()}

    async def writing(
        self, session: Session, frame: dict[str, Any], *, emergency: bool, name: str | None = None
    ) -> None:
        """A trainer is about to write ``frame["path"]`` (bytes at ``frame["temp"]`` first, if given), a
        file, or with ``dir`` a directory it has created; ``name``: the checkpoint it will be committed in,
        when that is known now (a rank's step), else the store picks the one a single trainer's commit
        adopts."""
        if not self.enabled or not emergency or session.role != "trainer":
            return
        if name is not None and not await self._not_stored(name):
            log.info(
                "overlap.skipped",
                trainer=session.name,
                path=frame["path"],
                name=name,
                reason="that step is committed or a node's part of it stored already (or the store cannot "
                "say): streaming a save of it again would write over its objects",
            )
            return
        try:
            final = await asyncio.to_thread(resolve_inside, self._checkpoint_dir, frame["path"])
            temp = frame.get("temp")
            watch = [final]
            if temp is not None:
                watch.insert(0, await asyncio.to_thread(resolve_inside, self._checkpoint_dir, temp))
        except PathEscape as exc:
            raise ProtocolError(E_PATH, str(exc)) from None
        rel = final.relative_to(self._checkpoint_dir).as_posix()
        for pending in (self._pending.get(session.id, {}), self._dirs.get(session.id, {})):
            if (old := pending.pop(rel, None)) is not None:
                self._spawn(old.abort())
        # A directory every rank writes into is committed as one checkpoint, not this rank's.
        rank = None if frame.get("shared") else session.rank
        opened: FileStream | DirStream | None
        try:
            if frame.get("dir"):
                opened = directory = await self._store.open_dir_stream(
                    watch=watch, rel=rel, trainer=session.name, step=frame.get("step"), rank=rank, name=name
                )
                if directory is not None:
                    self._dirs.setdefault(session.id, {})[rel] = directory
            else:
                opened = stream = await self._store.open_stream(
                    watch=watch, rel=rel, trainer=session.name, step=frame.get("step"), rank=rank, name=name
                )
                if stream is not None:
                    self._pending.setdefault(session.id, {})[rel] = stream
        except StoreError as exc:  # only a head start: the save is uploaded when reported, as always
            log.warning("overlap.not_started", trainer=session.name, path=rel, error=str(exc))
            return
        if opened is None:
            return
        log.info(
            "overlap.started",
            trainer=session.name,
            path=rel,
            step=frame.get("step"),
            name=opened.name,
            directory=bool(frame.get("dir")),
        )

    async def _not_stored(self, name: str) -> bool:
        """Whether nothing of the checkpoint ``name`` (a run's step: one name for every save of that step)
        is surely durable yet, neither committed nor a node's part. A stream writes its files under that
        name before the commit; a second save of a stored step (a rank re-saving it) must not touch the
        objects a manifest or part lists, nor its abort delete them."""
        try:
            return not await self._store.stored(name)
        except StoreError as exc:
            log.warning("overlap.committed_unknown", name=name, error=str(exc))
            return False

    def take(self, session: Session, source: Path) -> tuple[FileStream, ...]:
        """The streams of the files of ``source`` (a file, or a directory) that ``session`` announced: now
        the commit's to finish or abort. An announced directory stops being watched: the files seen closed
        in it so far are handed over, the commit uploads the rest."""
        rel = source.relative_to(self._checkpoint_dir).as_posix()

        def inside(r: str) -> bool:
            return r == rel or r.startswith(rel.rstrip("/") + "/")

        streams: list[FileStream] = []
        files = self._pending.get(session.id, {})
        streams += [files.pop(r) for r in [r for r in files if inside(r)]]
        dirs = self._dirs.get(session.id, {})
        for r in [r for r in dirs if inside(r)]:
            streams += dirs.pop(r).take()
        return tuple(streams)

    def drop(self, session: Session) -> None:
        """``session`` left (or saved in a way that does not overlap): abort what it announced."""
        for stream in self._pending.pop(session.id, {}).values():
            self._spawn(stream.abort())
        for directory in self._dirs.pop(session.id, {}).values():
            self._spawn(directory.abort())

    async def close(self) -> None:
        """Abort every stream not handed to a commit."""
        pending, self._pending = self._pending, {}
        dirs, self._dirs = self._dirs, {}
        for files in pending.values():
            for stream in files.values():
                await stream.abort()
        for mine in dirs.values():
            for directory in mine.values():
                await directory.abort()
