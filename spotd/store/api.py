"""The store as the daemon and the CLI see it: the :class:`CheckpointStore` protocol and its values.

:func:`spotd.store.open_store` makes one; :class:`spotd.store.base.BaseStore` implements it for every backend.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from spotd.events import InterruptionRecord
from spotd.store.manifest import CommitInfo, Manifest, Provenance

if TYPE_CHECKING:
    from spotd.store.localfs import LocalFile

__all__ = [
    "CheckpointStore",
    "DirStream",
    "FileStream",
    "Gate",
    "PartResult",
    "PartState",
    "Priority",
    "RestoreResult",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreResult:
    """What a restore put in place: the manifest of the (first) checkpoint restored, and the figures."""

    manifest: Manifest
    files: int
    bytes: int
    seconds: float
    skipped: tuple[str, ...]  # names that failed verification and were fallen back from
    #: Local paths (relative to the destination) that held something else and were moved into ``aside_dir``
    #: rather than overwritten; a restore never deletes what it did not bring.
    moved_aside: tuple[str, ...] = ()
    aside_dir: Path | None = None


class PartState(enum.Enum):
    """Where a multi-node checkpoint stands after one node's :meth:`CheckpointStore.commit_part`."""

    #: This call found every node's part and wrote the global MANIFEST.json: the checkpoint is committed.
    COMMITTED = "committed"
    #: The global MANIFEST.json was already there (another node, or an earlier try of this one, wrote it).
    ALREADY_COMMITTED = "already_committed"
    #: This node's part is durable; some node's is not there yet, so nothing of the checkpoint is listed.
    WAITING = "waiting"


@dataclass(frozen=True, slots=True, kw_only=True)
class PartResult:
    """What one node's commit_part did: its part, and the global manifest once the checkpoint is committed."""

    state: PartState
    part: Manifest  # this node's parts/node-<k>.json
    manifest: Manifest | None  # the global MANIFEST.json: set unless WAITING
    missing: tuple[int, ...]  # nodes whose part was not there yet (WAITING only)
    seconds: float

    @property
    def committed(self) -> bool:
        """Whether the checkpoint is committed (by this call or before it): trainers may be told durable."""
        return self.manifest is not None


class Priority(enum.Enum):
    """How urgent a commit is: an EMERGENCY one (the instance is going away) holds BACKGROUND ones back."""

    EMERGENCY = "emergency"
    BACKGROUND = "background"


#: Entered around each request that sends a file's bytes (``upload_file(..., gate=)``): what holds a
#: transfer back while a checkpoint is still being written.
Gate = Callable[[], AbstractAsyncContextManager[None]]


class FileStream(Protocol):
    """A file being uploaded while it is written (:meth:`CheckpointStore.open_stream`), or one file of an
    announced directory uploaded when it was closed (:meth:`DirStream.take`): the commit of the save it was
    announced for finishes it (checking every byte against the final file), anything else aborts it."""

    #: The checkpoint name the file's key was made with, and when: the commit that adopts it uses both.
    @property
    def name(self) -> str: ...
    @property
    def created(self) -> datetime: ...
    @property
    def rel(self) -> str: ...  # the file's path relative to checkpoint_dir, as the manifest lists it
    @property
    def sent_early(self) -> int: ...  # bytes that went out before the trainer's saved (the head start)

    def matches(self, info: Provenance) -> bool: ...
    async def finish(self, file: LocalFile, progress: Callable[[int], None] | None) -> str | None: ...
    async def abort(self) -> None: ...


class DirStream(Protocol):
    """An announced checkpoint directory whose files are uploaded one by one as each is closed
    (:meth:`CheckpointStore.open_dir_stream`). ``take()`` at ``saved`` ends the watching and hands the
    commit a :class:`FileStream` per file uploaded; ``abort()`` when no commit will."""

    @property
    def name(self) -> str: ...
    @property
    def rel(self) -> str: ...

    def take(self) -> tuple[FileStream, ...]: ...
    async def abort(self) -> None: ...


class CheckpointStore(Protocol):
    """What the daemon and the CLI use of a store (:func:`spotd.store.open_store` makes one)."""

    uri: str

    async def check_access(self) -> None: ...
    async def recover(self) -> int: ...
    async def commit(
        self,
        source: Path,
        *,
        checkpoint_dir: Path,
        info: CommitInfo,
        priority: Priority = Priority.BACKGROUND,
        progress: Callable[[int], None] | None = None,
        streams: Sequence[FileStream] = (),
    ) -> Manifest: ...
    async def open_stream(
        self,
        *,
        watch: Sequence[Path],
        rel: str,
        trainer: str,
        step: int | None,
        rank: int | None,
        name: str | None = None,
    ) -> FileStream | None: ...
    async def open_dir_stream(
        self,
        *,
        watch: Sequence[Path],
        rel: str,
        trainer: str,
        step: int | None,
        rank: int | None,
        name: str | None = None,
    ) -> DirStream | None: ...
    async def commit_part(
        self,
        sources: Sequence[Path],
        *,
        checkpoint_dir: Path,
        name: str,
        node_rank: int,
        nodes: int,
        ranks: Sequence[int],
        info: CommitInfo,
        priority: Priority = Priority.BACKGROUND,
        progress: Callable[[int], None] | None = None,
        streams: Sequence[FileStream] = (),
    ) -> PartResult: ...
    async def committed(self, name: str, *, nodes: int | None = None) -> Manifest | None: ...
    async def stored(self, name: str) -> bool: ...
    async def list(self) -> list[Manifest]: ...
    async def restore(
        self, dest: Path, *, name: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> RestoreResult: ...
    def estimate_seconds(self, nbytes: int) -> float | None: ...
    @property
    def background_rate(self) -> int | None: ...
    @property
    def background_core_wait(self) -> float | None: ...
    @property
    def background_yielded(self) -> bool: ...
    def background_view(self) -> dict[str, Any]: ...
    def set_trainers(self, pids: Iterable[int]) -> None: ...
    async def write_event(self, record: InterruptionRecord) -> str: ...
    async def close(self) -> None: ...
