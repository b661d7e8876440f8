"""The backend contract: :class:`BaseStore` runs commit, list, restore and retention over a few storage
primitives that a backend (``file://``, ``s3://``) implements.

Layout under the store URI (design.md)::

    <job_id>/checkpoints/<name>/<files…>                data first
    <job_id>/checkpoints/<name>/parts/node-<k>.json     multi-node only: node k's files, written after them
    <job_id>/checkpoints/<name>/MANIFEST.json           written last, never overwritten: the commit point
    <job_id>/LATEST                                     name of the newest commit; only moves forward
    <job_id>/events/<time>-<instance>.json              one record per interruption handled

A checkpoint without a parseable MANIFEST.json does not exist: not listed, not restored, and its
directory (a failed commit, or the parts of a step some node never finished) is an orphan that retention
removes once it is older than every kept commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from spotd.errors import CommitError, StoreError
from spotd.events import InterruptionRecord, format_time
from spotd.logs import get_logger
from spotd.store.api import DirStream, FileStream, Gate, PartResult, PartState, Priority, RestoreResult
from spotd.store.checksums import choose_checksum, hash_file
from spotd.store.dirstream import DirectoryUpload, watchable
from spotd.store.localfs import LocalFile, collect_files
from spotd.store.manifest import MANIFEST, PARTS_DIR, CommitInfo, FileEntry, Manifest, Provenance
from spotd.store.pacing import CoreWait
from spotd.store.restore import restore as restore_checkpoint
from spotd.store.selection import (
    checkpoint_name,
    event_name,
    global_manifest,
    part_key,
    part_node,
    plan_retention,
    scan_listing,
    valid_name,
)
from spotd.store.tasks import gather_or_cancel
from spotd.store.throughput import HELD_SHARE, Throughput
from spotd.store.transfer_pool import early_parts

if TYPE_CHECKING:
    from spotd.metrics import Metrics

__all__ = ["AlreadyExists", "BaseStore", "Changed", "Tagged", "gather_or_cancel"]

log = get_logger("spotd.store")

T = TypeVar("T")

#: The transfer slots :attr:`BaseStore.early_transfers` is a share of, for a backend without a pool.
EARLY_DEFAULT_LIMIT: Final = 16
#: Compare-and-swap tries of LATEST before giving up (each lost one means another writer moved it).
LATEST_TRIES: Final = 8


class AlreadyExists(StoreError):
    """A conditional write (``put_bytes(..., if_absent=True)``) found the key already there."""


class Changed(StoreError):
    """A compare-and-swap (``put_bytes(..., if_match=tag)``) found the key changed or gone since that tag
    was read, or a concurrent conditional write on it (S3's 409): read it again and decide again."""


@dataclass(frozen=True, slots=True)
class Tagged:
    """An object and the version tag a compare-and-swap of it names (S3's ETag)."""

    data: bytes
    tag: str


@dataclass(frozen=True, slots=True)
class _Put:
    """What putting a commit's files did: their checksums in order, and bytes sent vs copied."""

    checksums: list[str]
    sent: int
    copied: int
    files_copied: int
    #: BACKGROUND only: the share of its transfer threads' time spent waiting for a core.
    core_wait: float | None = None
    #: BACKGROUND only: the share of it they were held back to give a busy trainer its cores.
    yielded: float | None = None

    def entries(self, files: Sequence[LocalFile]) -> tuple[FileEntry, ...]:
        """The manifest's entries of ``files``, with the checksums the put reported."""
        return tuple(
            FileEntry(path=f.rel, size=f.size, checksum=c) for f, c in zip(files, self.checksums, strict=True)
        )

    def log_fields(self) -> dict[str, int | float]:
        fields: dict[str, int | float] = {
            "bytes_sent": self.sent,
            "bytes_copied": self.copied,
            "files_copied": self.files_copied,
        }
        if self.core_wait is not None:
            fields["core_wait"] = round(self.core_wait, 3)
        if self.yielded is not None:
            fields["yielded"] = round(self.yielded, 3)
        return fields


def _same_shape(
    where: str,
    stored: Manifest,
    files: Sequence[LocalFile],
    info: CommitInfo,
    nodes: int,
    ranks: Sequence[int],
) -> None:
    """A node's part already stored may be met by a new save of the same step (other bytes, the same files);
    CommitError when it is not that: another step, node count, set of ranks or of files."""
    want = (info.step, nodes, tuple(sorted(set(ranks))), sorted(f.rel for f in files))
    have = (stored.step, stored.nodes, stored.ranks, sorted(f.path for f in stored.files))
    if want != have:
        raise CommitError(
            f"{where} already exists with other content (step, nodes, ranks, files: stored {have[:3]}, "
            f"{len(have[3])} files; this save {want[:3]}, {len(want[3])} files); not overwritten (do two "
            "daemons claim this node?)"
        )


class BaseStore(ABC):
    """:class:`~spotd.store.api.CheckpointStore` over storage primitives; a backend subclasses this and
    implements them.

    Keys are posix, relative to the store root, and begin with the job id (``job1/checkpoints/<name>/a.pt``).
    Every primitive is a coroutine called on the event loop, possibly many at once (commits of several
    trainers overlap); a primitive never blocks the loop: blocking work goes through :meth:`run` (the store's
    executor) or the backend's own threads. A primitive raises :class:`StoreError` (or a subclass) naming
    what failed; retrying a request is the backend's client's job, not the protocol's.

    A backend implements:

    - ``put_bytes(key, data, if_absent=False, if_match=None)``: one small object, whole or not at all.
      With ``if_absent`` it raises :class:`AlreadyExists` when the key is there and never overwrites it
      (the commit point; S3's ``If-None-Match: *``). With ``if_match=tag`` it writes only if the object
      is still the version :meth:`get_tagged` returned with that tag, else raises :class:`Changed`
      (S3's ``If-Match: <ETag>``; a directory needs a lock and a compare). Both are atomic against
      every other writer, on every node.
    - ``get_bytes(key)``: the object, or None when there is none.
    - ``get_tagged(key)``: the object and its version tag (:class:`Tagged`), or None.
    - ``list_keys(prefix)``: every key under ``prefix``, half-written temporaries excluded.
    - ``delete_keys(keys)``: remove them; a key already gone is not an error.
    - ``upload_file(file, key, priority, progress, gate=None, siblings=1)``: one local file to ``key``;
      returns its checksum (algorithm :attr:`algo`) computed from the bytes it sent. ``progress(n)`` on
      the loop thread. ``gate``, when given, is entered around each request that sends the file's bytes
      (each part): a directory being written lets only a few go at once (:mod:`spotd.store.dirstream`).
      ``siblings``: how many files of the same commit are uploaded with it (a backend may send each of
      many files whole, its parallelism then being across them).
    - ``copy_object(src, key, size=, checksum=, priority=)`` (optional): a server-side copy of the stored
      object ``src`` to ``key``; returns the checksum the store reports for the copy (algorithm
      :attr:`algo`), or None when the backend cannot copy (the file is then uploaded).
    - ``download_file(key, dest, size=, algo=, progress=)``: one object into ``dest`` (its directory
      exists); returns (size, checksum) when it hashed the bytes as they arrived, or None to have ``dest``
      hashed afterwards. It need not fsync: the restore fsyncs every file in one pass before moving any
      into place (a backend may start the write-back early, :func:`~spotd.store.localfs.start_writeback`).
    - ``check_access()`` and ``recover()`` of :class:`CheckpointStore` (what "usable" and "left behind by a
      crash" mean is the backend's), and optionally ``begin_emergency()`` / ``end_emergency()``
      (preemption of background transfers) and ``close()`` (then ``await super().close()``).

    The order the protocol calls them in:

    - ``commit``: collect the files (:func:`~spotd.store.localfs.collect_files`, on the executor) →
      ``begin_emergency()`` if EMERGENCY → for every file, concurrently: if the newest committed
      checkpoint of that rank (see :meth:`_put_files`) has a file of its size, hash it from disk, and when
      size and checksum equal one of its files ``copy_object`` that one (unchanged files are not sent
      again), else (or if the copy fails or reports another checksum) ``upload_file`` → ``put_bytes``
      MANIFEST.json with ``if_absent`` (on :class:`AlreadyExists`: ``get_bytes`` it back; the same bytes
      mean a retried write that had landed) → advance LATEST → ``end_emergency()`` (always, once per
      ``begin``) → retention.
    - advance LATEST (compare-and-swap, so no writer ever moves it back): ``get_tagged`` LATEST → if the
      new name sorts after it, ``put_bytes`` with ``if_match`` its tag (``if_absent`` when there is none);
      on :class:`Changed` or :class:`AlreadyExists` read it again, up to :data:`LATEST_TRIES` times.
    - ``commit_part``, one node's share of a multi-node checkpoint (every node's daemon calls it with the
      same ``name`` and ``nodes``, concurrently, each once its own ranks have saved that step): collect
      the files of every source → ``begin_emergency()`` if EMERGENCY → ``get_bytes`` MANIFEST.json and
      this node's part at once: the manifest there = ALREADY_COMMITTED, nothing sent (a step has one name
      for every save of it; a second save never writes over what is listed); the part there (of the same
      step, nodes, ranks and files, else CommitError) = on to the global commit, nothing sent → every
      file as in ``commit`` (a stream opened under this name for it finished, else copied or
      ``upload_file``) → ``put_bytes`` ``parts/node-<k>.json`` with ``if_absent`` (files, sizes,
      checksums, the ranks it covers; written only after its files, so a part present means that node's
      data is durable) →
      ``list_keys`` of ``parts/`` → if some node's part is missing: WAITING, nothing global is written
      (the node that writes the last part finds all of them, as listing follows writes) → else
      ``get_bytes`` every part → build the global manifest (the union, deterministic: the same bytes
      from any node) → ``put_bytes`` MANIFEST.json with ``if_absent`` (:class:`AlreadyExists` = another
      node committed it first: ALREADY_COMMITTED, success) → advance LATEST → ``end_emergency()`` →
      retention. A node whose upload fails or whose daemon dies writes no part, so that step is never
      committed; its orphan parts go once older than every kept commit.
    - ``committed(name, nodes=)``: ``get_bytes`` MANIFEST.json; when absent and ``nodes`` is given, the
      same global commit as above from whatever parts are there (a node that reported WAITING polls this
      to learn when to tell its trainers ``durable``, and completes a commit whose last node died after
      writing its part).
    - retention (after every commit): ``list_keys`` of ``<job>/checkpoints/`` → ``get_bytes`` of every
      MANIFEST.json → per checkpoint to delete, ``delete_keys`` of its MANIFEST.json, then of its other keys.
    - ``list``: ``list_keys`` → ``get_bytes`` of every MANIFEST.json.
    - ``restore`` (:mod:`spotd.store.restore`): ``list`` → ``download_file`` for every file of the chosen
      set, concurrently, into a staging directory inside ``dest`` → verify each → fsync them all → move
      into place file by file (what the destination held
      at a restored path, if different, is moved aside into ``<dest>/.spotd/replaced-<time>/``; nothing
      else in ``dest`` is touched); on a failure the next candidate.
    - ``write_event``: one ``put_bytes``.

    The daemon calls ``check_access()`` and ``recover()`` once at start, before any commit (the CLI's list
    and restore need neither), and ``close()`` last, after every other call has returned. All ranks of a
    node commit through one store, concurrently and each under its own name; only LATEST is shared, and it
    only moves forward. Every node of a multi-node job has its own store object (its own daemon), and the
    conditional writes alone decide between them.
    """

    __slots__ = (
        "_copy_paid",
        "_executor",
        "_inflight",
        "_keep",
        "_last_background",
        "_metrics",
        "_newest",
        "_owns_executor",
        "_throughput",
        "algo",
        "job_id",
        "uri",
    )

    def __init__(
        self,
        *,
        uri: str,
        job_id: str,
        keep: int,
        checksum: str,
        executor: concurrent.futures.Executor | None,
        metrics: Metrics | None,
        workers: int,
    ) -> None:
        self.uri = uri
        self.job_id = job_id
        #: The checksum algorithm of new commits (``store.checksum`` resolved).
        self.algo = choose_checksum(checksum)
        self._keep = keep
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="spotd-store"
        )
        self._metrics = metrics
        self._inflight: set[str] = set()
        #: The newest manifest this store committed, per rank (``("rank", r)``; ``("nodes",)`` for
        #: multi-node ones): what unchanged files are copied from, without listing the store again.
        self._newest: dict[tuple[object, ...], Manifest] = {}
        self._throughput = Throughput()
        #: The last measured periodic upload, as ``spotd status`` shows it (None before one).
        self._last_background: dict[str, Any] | None = None
        #: Per kind (as ``_newest``): whether the last commit that hashed candidates first copied any. When
        #: it copied none (every same-size file had changed: fixed-size shards of a full fine-tune), an
        #: EMERGENCY commit skips the extra read (~0.35 s/GB from page cache) and uploads straight away;
        #: background commits always look, which keeps this current.
        self._copy_paid: dict[tuple[object, ...], bool] = {}

    # ---- primitives

    @abstractmethod
    async def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> None: ...
    @abstractmethod
    async def get_bytes(self, key: str) -> bytes | None: ...
    @abstractmethod
    async def get_tagged(self, key: str) -> Tagged | None: ...
    @abstractmethod
    async def list_keys(self, prefix: str) -> list[str]: ...
    @abstractmethod
    async def delete_keys(self, keys: Sequence[str]) -> None: ...
    @abstractmethod
    async def upload_file(
        self,
        file: LocalFile,
        key: str,
        priority: Priority,
        progress: Callable[[int], None] | None,
        gate: Gate | None = None,
        siblings: int = 1,
    ) -> str: ...
    @abstractmethod
    async def download_file(
        self, key: str, dest: Path, *, size: int, algo: str, progress: Callable[[int], None] | None
    ) -> tuple[int, str] | None: ...

    async def copy_object(
        self, src: str, key: str, *, size: int, checksum: str, priority: Priority
    ) -> str | None:
        """Copy the stored object ``src`` (``size`` bytes, ``checksum``) to ``key`` inside the store; the
        checksum the store reports for the copy, or None: this backend does not copy (upload instead)."""
        return None

    async def open_stream(
        self,
        *,
        watch: Sequence[Path],
        rel: str,
        trainer: str,
        step: int | None,
        rank: int | None,
        name: str | None = None,
    ) -> FileStream | None:
        """Start uploading the file ``rel`` (relative to checkpoint_dir) while it is written at the first of
        ``watch`` that appears, for the save of ``step`` by ``trainer`` (``rank``); None: this backend does
        not (the file is uploaded when it is committed, as always).

        Its key is ``checkpoints/<name>/<rel>``: ``name`` when given (a multi-rank run's
        :func:`~spotd.store.selection.run_checkpoint_name`, which :meth:`commit_part` will use), else
        :meth:`stream_name` now (what :meth:`commit` adopts)."""
        return None

    async def open_dir_stream(
        self,
        *,
        watch: Sequence[Path],
        rel: str,
        trainer: str,
        step: int | None,
        rank: int | None,
        name: str | None = None,
    ) -> DirStream | None:
        """Start uploading each file of the directory ``rel`` (relative to checkpoint_dir; written at the
        first of ``watch`` that exists) the moment it is closed, for the save of ``step`` by ``trainer``
        (``rank``), under ``name`` as :meth:`open_stream`; None where directories cannot be watched (not
        Linux). Raises :class:`StoreError` when this one cannot (it does not exist yet). Every backend: it
        uses ``upload_file`` and ``delete_keys`` (:mod:`spotd.store.dirstream`)."""
        if not watchable():
            return None
        created = datetime.now(UTC)
        if name is None:
            name = self.stream_name(trainer=trainer, step=step, rank=rank, now=created)
        elif not valid_name(name):
            raise StoreError(f"checkpoint name {name!r} is not a valid name; fix: use run_checkpoint_name")
        # Background transfers yield to it from now on, as to an emergency commit, until it ends.
        self.begin_emergency()
        stream = DirectoryUpload(
            watch=watch,
            rel=rel,
            prefix=f"{self.checkpoints_prefix}{name}/",
            name=name,
            created=created,
            step=step,
            trainer=trainer,
            rank=rank,
            upload=lambda f, key, priority, gate: self.upload_file(f, key, priority, None, gate),
            delete=self.delete_keys,
            hash=lambda path: self.run(hash_file, path, self.algo),
            early_files=self.early_transfers,
            on_close=self.end_emergency,
        )
        try:
            await stream.start()
        except OSError as exc:
            await stream.abort()
            raise StoreError(f"cannot watch {rel} for files closed in it: {exc}") from exc
        return stream

    @property
    def early_transfers(self) -> int:
        """Transfers at once while a checkpoint is still being written (:func:`early_parts`)."""
        return early_parts(EARLY_DEFAULT_LIMIT)

    def stream_name(self, *, trainer: str, step: int | None, rank: int | None, now: datetime) -> str:
        """The name a commit of that save would get at ``now``: what a stream's key is made with."""
        who = Provenance(
            job_id=self.job_id,
            step=step,
            trainer=trainer,
            rank=rank,
            world_size=None,
            request_id=None,
            reason="",
            instance_id="",
        )
        return checkpoint_name(who, now)

    def begin_emergency(self) -> None:  # noqa: B027  (backends without preemption keep the default)
        """An EMERGENCY commit starts: background transfers should yield to it."""

    def end_emergency(self) -> None:  # noqa: B027
        """An EMERGENCY commit ended (committed or not)."""

    # ---- for backends

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store's executor."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    @property
    def executor(self) -> concurrent.futures.Executor:
        """Where :meth:`run` runs blocking work; a backend may hand it to its helpers."""
        return self._executor

    def estimate_seconds(self, nbytes: int) -> float | None:
        """How long sending ``nbytes`` would take at the moving median of this store's background uploads
        (bytes sent per second of each periodic commit's file transfers, less the share of their time the
        transfer threads waited for a core: :meth:`core_wait_totals`); None before one was measured."""
        return self._throughput.estimate(nbytes)

    @property
    def background_core_wait(self) -> float | None:
        """The median share of their time the background uploads :meth:`estimate_seconds` is measured from
        spent waiting for a core (None before one was measured). Left out of the rate, but only as an
        average over threads, and a thread waiting for the GIL that a thread without a core holds does not
        count: when it is high the uploads were held back by a busy trainer, and an emergency upload (daemon
        priority, trainer stopped) may be faster than the estimate (bench/background.py, threads at nice 19:
        12 MB/s estimated where an unstarved upload made 58)."""
        return self._throughput.core_wait()

    @property
    def background_yielded(self) -> bool:
        """The rate :meth:`estimate_seconds` says was measured only from periodic uploads held back to give
        a busy trainer its cores (``store.yield_to_trainer``), which an emergency upload is not: it may be
        faster than the estimate. While some upload was not held back, the rate comes from those alone."""
        return self._throughput.held()

    def background_view(self) -> dict[str, Any]:
        """What ``spotd status`` says of the periodic uploads: the rate an emergency upload is estimated at
        (and from how many uploads, whether they were capped, starved or held back), and the last one."""
        return {
            "rate_bytes_per_second": self._throughput.bytes_per_second(),
            "samples": self._throughput.samples,
            "rate_yielded": self.background_yielded,
            "core_wait": self.background_core_wait,
            "cap_bytes_per_second": self.background_rate,
            "last": None if self._last_background is None else dict(self._last_background),
            "yielding": None,
        }

    async def hash_local(self, f: LocalFile, priority: Priority) -> tuple[int, str]:
        """(size, checksum) of ``f`` as it is on disk, read for the unchanged-file check
        (:meth:`run_reading`: a BACKGROUND one gives way to the trainer like the upload it may save)."""
        return await self.run_reading(priority, functools.partial(hash_file, f.path, self.algo), f.size)

    async def run_reading(self, priority: Priority, fn: Callable[[], T], nbytes: int) -> T:
        """``fn()``, which reads ``nbytes`` of a checkpoint without sending them, on the store's executor;
        a backend with background threads of its own runs a BACKGROUND one there."""
        return await self.run(fn)

    def yielded_seconds(self) -> float:
        """Seconds background transfers were held back to give the trainers their cores so far, summed over
        their threads (a part of :meth:`core_wait_totals`' busy time); 0 for a backend that never is."""
        return 0.0

    def set_trainers(self, pids: Iterable[int]) -> None:
        """The trainers connected now (their pids, from SO_PEERCRED): periodic transfers give way to them
        where the backend can (``store.yield_to_trainer``); the daemon calls it as they come and go. A
        backend without background threads of its own holds nothing back."""
        return None

    def core_wait_totals(self) -> tuple[float, float]:
        """(busy, waited) seconds of background transfers so far, summed over their threads: wall time, and
        the part of it spent runnable without a core (:class:`~spotd.store.pacing.CoreWait`). (0, 0) for a
        backend without background threads of its own."""
        return 0.0, 0.0

    @property
    def background_rate(self) -> int | None:
        """The bytes/s cap of BACKGROUND transfers (``store.background_rate``), None without one: the rate
        :meth:`estimate_seconds` measured is then at most this, while an EMERGENCY upload is not capped."""
        return None

    @property
    def checkpoints_prefix(self) -> str:
        return f"{self.job_id}/checkpoints/"

    def url(self, key: str) -> str:
        """``key`` as a person would look it up (``s3://bucket/prefix/job1/LATEST``)."""
        return f"{self.uri.rstrip('/')}/{key}"

    # ---- protocol

    @contextlib.contextmanager
    def _committing(self, name: str, priority: Priority, *, failed: str, **fields: Any) -> Iterator[None]:
        """The bracket of one commit attempt (:meth:`commit`, :meth:`commit_part`): ``name`` is in flight
        (retention leaves its directory alone), background transfers yield while an EMERGENCY one runs, and
        a failure is logged as ``failed`` (with ``fields``) on its way out. Not counted in
        spotd_upload_failures_total: a failed attempt may yet be retried, and the coordinator counts a
        commit once it gives up."""
        self._inflight.add(name)
        if priority is Priority.EMERGENCY:
            self.begin_emergency()
        try:
            yield
        except BaseException as exc:
            log.error(failed, name=name, **fields, error=str(exc), error_type=type(exc).__name__)
            raise
        finally:
            if priority is Priority.EMERGENCY:
                self.end_emergency()
            self._inflight.discard(name)

    async def commit(
        self,
        source: Path,
        *,
        checkpoint_dir: Path,
        info: CommitInfo,
        priority: Priority = Priority.BACKGROUND,
        progress: Callable[[int], None] | None = None,
        streams: Sequence[FileStream] = (),
    ) -> Manifest:
        """Upload data files, then MANIFEST.json (never overwriting), then LATEST; then retention.

        A failure before the manifest is written leaves only an orphan directory that list() ignores
        and a later retention pass removes. Nothing local is deleted. One try: retrying a failed commit is
        the caller's decision (it knows the deadline).

        ``streams``: files of this save already going up while they were written (:meth:`open_stream`);
        when they were opened for this save (same step, trainer and rank, one name, each a file of
        ``source``) the commit takes their name and finishes each instead of uploading it, else it aborts
        them. Either way none of them outlives this call.
        """
        started = time.monotonic()
        try:
            files = await self.run(collect_files, checkpoint_dir, source)
            created = datetime.now(UTC)
            name = checkpoint_name(info, created)
            adopted = _adoptable(streams, files, info)
            if adopted:
                first = next(iter(adopted.values()))
                name, created = first.name, first.created
            else:
                # At once: an open stream holds background transfers back, this commit's among them.
                for s in streams:
                    await s.abort()
        except BaseException:
            for s in streams:
                await s.abort()
            raise
        base = f"{self.checkpoints_prefix}{name}/"
        kind = ("rank", info.rank)
        with self._committing(name, priority, failed="store.commit_failed", source=str(source)):
            try:
                put = await self._put_files(files, base, priority, progress, kind, adopted)
                manifest = Manifest.of_commit(info, name=name, created_at=created, files=put.entries(files))
                try:
                    await self.put_bytes(base + MANIFEST, manifest.to_json(), if_absent=True)
                except AlreadyExists:
                    # A retried PUT whose first try reached the server finds its own manifest: success.
                    if await self.get_bytes(base + MANIFEST) != manifest.to_json():
                        raise CommitError(
                            f"{self.url(base + MANIFEST)} already exists; not overwritten"
                        ) from None
                except StoreError as exc:
                    raise CommitError(f"writing {self.url(base + MANIFEST)} failed: {exc}") from exc
                await self._advance_latest(name)
                self._newest[kind] = manifest
            finally:
                for s in streams:
                    await s.abort()  # a no-op for each one finished
        seconds = time.monotonic() - started
        self._count(put, seconds)
        log.info(
            "store.committed",
            name=name,
            url=self.url(base),
            files=len(files),
            bytes=manifest.total_bytes,
            **put.log_fields(),
            seconds=round(seconds, 3),
            priority=priority.value,
            step=info.step,
            rank=info.rank,
        )
        await self._retention_quietly()
        return manifest

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
    ) -> PartResult:
        """Commit this node's share of the multi-node checkpoint ``name`` (see the class docstring for the
        order): upload the files of ``sources`` under ``checkpoints/<name>/``, write ``parts/node-<k>.json``,
        and write the global MANIFEST.json if every node's part is there.

        ``name`` is the same on every node (:func:`~spotd.store.selection.run_checkpoint_name`), ``ranks``
        are the global ranks whose files ``sources`` hold, ``info`` the step and world size they saved.
        Returns COMMITTED, ALREADY_COMMITTED or WAITING (poll :meth:`committed` then). One try, like
        :meth:`commit`; a retry after a failure finds what already landed and carries on. Raises
        :class:`CommitError` when the parts do not make one checkpoint (nothing is committed then).

        ``streams``: the local ranks' files already going up while they were written (:meth:`open_stream`
        with ``name``); each one opened under this ``name`` for one of the part's files is finished instead
        of uploaded, any other aborted. As with :meth:`commit`, none of them outlives this call.
        """
        started = time.monotonic()
        try:
            if not valid_name(name):
                raise CommitError(
                    f"checkpoint name {name!r} is not a valid name; "
                    "fix: use run_checkpoint_name(run_id, step)"
                )
            if not 0 <= node_rank < nodes:
                raise CommitError(
                    f"node_rank {node_rank} is not one of the {nodes} nodes of checkpoint {name}"
                )
            files = await self.run(_collect_sources, checkpoint_dir, list(sources))
            adopted = _part_streams(streams, files, name)
            # At once: an open stream holds background transfers back, this commit's among them.
            for s in streams:
                if adopted.get(s.rel) is not s:
                    await s.abort()
        except BaseException:
            for s in streams:
                await s.abort()
            raise
        base = f"{self.checkpoints_prefix}{name}/"
        with self._committing(name, priority, failed="store.part_failed", node=node_rank, nodes=nodes):
            try:
                # Names are the same for every save of a step, so a step saved again (a re-sent save, a
                # retry) would write over objects a committed manifest, or this node's durable part,
                # already lists, with bytes that need not match: what is there stays, nothing is sent.
                earlier, mine = await asyncio.gather(
                    self._read_manifest(name), self._stored_part(base, node_rank)
                )
                if mine is not None:
                    _same_shape(self.url(base + part_key(node_rank)), mine, files, info, nodes, ranks)
                part: Manifest
                manifest: Manifest | None
                missing: tuple[int, ...]
                if earlier is None and mine is None:
                    put = await self._put_files(files, base, priority, progress, ("nodes",), adopted)
                    part = await self._put_part(
                        base,
                        Manifest.of_commit(
                            info,
                            name=name,
                            created_at=datetime.now(UTC),
                            files=put.entries(files),
                            nodes=nodes,
                            node=node_rank,
                            ranks=tuple(sorted(set(ranks))),
                        ),
                    )
                else:  # the streams are aborted below
                    put, part = _Put([], 0, 0, 0), next(m for m in (mine, earlier) if m is not None)
                if earlier is not None:
                    await self._advance_latest(name)  # whoever committed it may have died before LATEST
                    state, manifest, missing = PartState.ALREADY_COMMITTED, earlier, ()
                else:
                    state, manifest, missing = await self._commit_global(name, nodes)
                if manifest is not None:
                    self._newest["nodes",] = manifest
            finally:
                for s in streams:
                    await s.abort()  # a no-op for each one finished
        seconds = time.monotonic() - started
        if earlier is not None or mine is not None:
            log.info(
                "store.part_already_stored",
                name=name,
                node=node_rank,
                step=info.step,
                committed=earlier is not None,
                note="this step's files are in the store already; the new save of it is not uploaded",
            )
        self._count(put, seconds)
        log.info(
            "store.part_committed",
            name=name,
            node=node_rank,
            nodes=nodes,
            ranks=list(part.ranks or ()),
            files=len(files),
            bytes=part.total_bytes,
            **put.log_fields(),
            seconds=round(seconds, 3),
            priority=priority.value,
            step=info.step,
            state=state.value,
            missing=list(missing),
        )
        if manifest is not None:
            await self._retention_quietly()
        return PartResult(state=state, part=part, manifest=manifest, missing=missing, seconds=seconds)

    # ---- unchanged files

    async def _prior(self, kind: tuple[object, ...]) -> Manifest | None:
        """The newest committed manifest of a rank (``("rank", r)``, single-node) or the newest multi-node
        one (``("nodes",)``), whose files a new commit's unchanged files are copied from: the one this
        store last committed, else the newest listed (once per store)."""
        if kind in self._newest:
            return self._newest[kind]
        try:
            manifests = await self.list()
        except StoreError as exc:  # only an optimisation: upload everything
            log.warning("store.prior_unknown", error=str(exc))
            return None
        for m in manifests:
            if (
                (m.nodes is not None)
                if kind == ("nodes",)
                else (m.nodes is None and ("rank", m.rank) == kind)
            ):
                self._newest[kind] = m
                return m
        return None

    async def _put_files(
        self,
        files: Sequence[LocalFile],
        base: str,
        priority: Priority,
        progress: Callable[[int], None] | None,
        kind: tuple[object, ...],
        streamed: dict[str, FileStream] | None = None,
    ) -> _Put:
        """Every file to ``base`` concurrently: server-side copied from ``prior`` (the newest commit of
        ``kind``, :meth:`_prior`) when a file of it (any path) has its size and checksum, else uploaded. A
        file of a size ``prior`` has is hashed from disk first (one more read); others are hashed while
        they are uploaded, as always."""
        by_size: dict[int, dict[str, str]] = {}
        look = priority is Priority.BACKGROUND or self._copy_paid.get(kind, True)
        prior = await self._prior(kind) if look else None
        if prior is not None:
            for e in prior.files:
                if e.size > 0:
                    by_size.setdefault(e.size, {}).setdefault(
                        e.checksum, f"{self.checkpoints_prefix}{prior.name}/{e.path}"
                    )

        async def one(f: LocalFile) -> tuple[str, bool]:
            key = base + f.rel
            stream = (streamed or {}).get(f.rel)
            if stream is not None:
                streamed_sum = await stream.finish(f, progress)
                if streamed_sum is not None:
                    if self._metrics is not None:
                        self._metrics.upload_bytes_before_saved.inc(stream.sent_early)
                    return streamed_sum, False
            same_size = by_size.get(f.size)
            if same_size:
                size, checksum = await self.hash_local(f, priority)
                src = same_size.get(checksum) if size == f.size else None
                if src is not None and await self._copied(src, key, f, checksum, priority):
                    if progress is not None:
                        progress(f.size)
                    return checksum, True
            return await self.upload_file(f, key, priority, progress, siblings=len(files)), False

        started, waited0, yielded0 = time.monotonic(), self.core_wait_totals(), self.yielded_seconds()
        done = await gather_or_cancel([one(f) for f in files])
        copied = [f for f, (_, c) in zip(files, done, strict=True) if c]
        nbytes = sum(f.size for f in files)
        ncopied = sum(f.size for f in copied)
        if any(f.size in by_size for f in files):
            self._copy_paid[kind] = bool(copied)
        core_wait = yielded = None
        if priority is Priority.BACKGROUND:
            totals = self.core_wait_totals()
            core_wait = CoreWait.share(waited0, totals)
            yielded = CoreWait.share((waited0[0], yielded0), (totals[0], self.yielded_seconds()))
            self._measured(nbytes - ncopied, time.monotonic() - started, core_wait, yielded)
        return _Put(
            checksums=[c for c, _ in done],
            sent=nbytes - ncopied,
            copied=ncopied,
            files_copied=len(copied),
            core_wait=core_wait,
            yielded=yielded,
        )

    async def _copied(self, src: str, key: str, f: LocalFile, checksum: str, priority: Priority) -> bool:
        """Whether ``src`` was copied to ``key`` and the copy has ``checksum``; False: upload it."""
        try:
            got = await self.copy_object(src, key, size=f.size, checksum=checksum, priority=priority)
        except StoreError as exc:
            log.warning("store.copy_failed", src=self.url(src), key=self.url(key), error=str(exc))
            return False
        if got is not None and got != checksum:
            log.warning("store.copy_mismatch", src=self.url(src), key=self.url(key), want=checksum, got=got)
            return False
        return got is not None

    def _measured(self, sent: int, seconds: float, core_wait: float, yielded: float = 0.0) -> None:
        """A background commit's files went out in ``seconds``, its transfer threads waiting for a core a
        ``core_wait`` share of their time: the rate without that waiting joins the moving median. At
        ``store.background_nice`` a trainer that keeps every core busy holds a periodic upload back, while an
        emergency one runs at the daemon's priority once the trainer has stopped to save; counting the wait
        would make every estimate pessimistic. One held back to give the trainers their cores a ``yielded``
        share of its threads' time (:data:`~spotd.store.throughput.HELD_SHARE` or more) is kept apart: it
        measured the trainer, not the wire (:meth:`background_yielded`). EMERGENCY commits are not measured:
        they take every slot and preempt the rest, so they would overstate what a periodic gets."""
        if self._metrics is not None:
            self._metrics.background_core_wait.set(core_wait)
            self._metrics.background_yielded.set(yielded)
        held = yielded >= HELD_SHARE
        self._last_background = {
            "bytes": sent,
            "seconds": round(seconds, 3),
            "core_wait": round(core_wait, 3),
            "yielded": round(yielded, 3),
            "time": format_time(datetime.now(UTC)),
        }
        if self._throughput.record(sent, seconds, core_wait, held=held) and self._metrics is not None:
            rate = self._throughput.bytes_per_second()
            if rate is not None:
                self._metrics.upload_throughput.set(rate)

    def _count(self, put: _Put, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.upload_bytes.inc(put.sent + put.copied)
            self._metrics.upload_bytes_sent.inc(put.sent)
            self._metrics.upload_bytes_copied.inc(put.copied)
            self._metrics.upload_seconds.observe(seconds)

    async def stored(self, name: str) -> bool:
        """Whether a save of the checkpoint ``name`` would meet durable files of it: its global manifest,
        or any node's part (which lists files the global manifest will). A multi-rank step has one name for
        every save of it, so what streams a second save must ask this first."""
        base = f"{self.checkpoints_prefix}{name}/"
        if await self._read_manifest(name) is not None:
            return True
        return bool(await self.list_keys(f"{base}{PARTS_DIR}/"))

    async def committed(self, name: str, *, nodes: int | None = None) -> Manifest | None:
        """The global manifest of ``name`` once it is committed, else None.

        With ``nodes``, a checkpoint whose parts are all there but whose global manifest is not (its last
        node died between writing its part and committing) is committed here; then LATEST and retention
        follow as after :meth:`commit_part`.
        """
        found = await self._read_manifest(name)
        if nodes is None:
            return found
        if found is not None:
            # The node that committed it may have died before moving LATEST: a no-op when it did not.
            await self._advance_latest(name)
            self._newest["nodes",] = found
            return found
        state, manifest, _ = await self._commit_global(name, nodes)
        if manifest is not None:
            self._newest["nodes",] = manifest
            if state is PartState.COMMITTED:
                await self._retention_quietly()
        return manifest

    async def _put_part(self, base: str, part: Manifest) -> Manifest:
        """Write ``part`` create-if-absent; a part already there with the same content (a retry) is fine."""
        assert part.node is not None
        key = base + part_key(part.node)
        try:
            await self.put_bytes(key, part.to_json(), if_absent=True)
            return part
        except AlreadyExists:
            pass
        except StoreError as exc:
            raise CommitError(f"writing {self.url(key)} failed: {exc}") from exc
        stored = await self._stored_part(base, part.node)
        same = stored is not None and (stored.files, stored.ranks, stored.nodes, stored.step) == (
            part.files,
            part.ranks,
            part.nodes,
            part.step,
        )
        if stored is None or not same:
            raise CommitError(
                f"{self.url(key)} already exists with other content; not overwritten (do two daemons "
                f"claim node {part.node}?)"
            )
        return stored

    async def _commit_global(
        self, name: str, nodes: int
    ) -> tuple[PartState, Manifest | None, tuple[int, ...]]:
        """If every node's part of ``name`` is there, write the global manifest create-if-absent and
        advance LATEST; otherwise the nodes still missing."""
        base = f"{self.checkpoints_prefix}{name}/"
        present = sorted(
            {
                n
                for k in await self.list_keys(base + PARTS_DIR + "/")
                if (n := part_node(k[len(base) :])) is not None
            }
        )
        missing = tuple(sorted(set(range(nodes)) - set(present)))
        if missing:
            return PartState.WAITING, None, missing
        bodies = await asyncio.gather(*(self.get_bytes(base + part_key(n)) for n in present))
        parts: list[Manifest] = []
        for n, body in zip(present, bodies, strict=True):
            if body is None:
                return PartState.WAITING, None, (n,)  # removed since the listing (retention): not ours
            try:
                parts.append(Manifest.from_json(body))
            except StoreError as exc:
                raise CommitError(f"{self.url(base + part_key(n))}: {exc}") from exc
        manifest = global_manifest(parts, name=name)
        if manifest.nodes != nodes:
            raise CommitError(f"checkpoint {name}: the parts say {manifest.nodes} nodes, this node {nodes}")
        state = await self._publish_global(base, manifest)
        if state is PartState.ALREADY_COMMITTED:
            found = await self._read_manifest(name)
            if found is None or found.files != manifest.files:
                raise CommitError(
                    f"{self.url(base + MANIFEST)} is there but is not the union of the node parts; "
                    "not overwritten"
                )
            manifest = found
        if state is PartState.COMMITTED:
            log.info(
                "store.committed",
                name=name,
                url=self.url(base),
                files=len(manifest.files),
                bytes=manifest.total_bytes,
                nodes=nodes,
                world_size=manifest.world_size,
                step=manifest.step,
            )
        # Also after ALREADY_COMMITTED: the node that committed may have died before moving LATEST.
        await self._advance_latest(name)
        return state, manifest, ()

    async def _publish_global(self, base: str, manifest: Manifest) -> PartState:
        """Write the global MANIFEST.json create-if-absent: COMMITTED, or ALREADY_COMMITTED when another
        node's write was first (S3's 412, or its 409 for one under way that then landed)."""
        key = base + MANIFEST
        try:
            for _ in range(LATEST_TRIES):
                try:
                    await self.put_bytes(key, manifest.to_json(), if_absent=True)
                    return PartState.COMMITTED
                except AlreadyExists:
                    return PartState.ALREADY_COMMITTED
                except Changed:
                    if await self.get_bytes(key) is not None:
                        return PartState.ALREADY_COMMITTED
        except StoreError as exc:
            raise CommitError(f"writing {self.url(key)} failed: {exc}") from exc
        raise CommitError(f"writing {self.url(key)} met a concurrent write {LATEST_TRIES} times in a row")

    async def _stored_part(self, base: str, node: int) -> Manifest | None:
        """This node's part of the checkpoint under ``base`` when one is stored and readable, else None."""
        body = await self.get_bytes(base + part_key(node))
        if body is None:
            return None
        try:
            return Manifest.from_json(body)
        except StoreError:
            return None  # unreadable: _put_part then refuses to write over it

    async def _read_manifest(self, name: str) -> Manifest | None:
        body = await self.get_bytes(f"{self.checkpoints_prefix}{name}/{MANIFEST}")
        if body is None:
            return None
        found = Manifest.from_json(body)
        return found if found.name == name else None

    async def _advance_latest(self, name: str) -> bool:
        """Move LATEST to ``name`` if it sorts after what LATEST names; True when this call moved it.

        A compare-and-swap: a writer that read LATEST before another moved it finds it changed and looks
        again, so a slower (older) writer can never move it back."""
        key = f"{self.job_id}/LATEST"
        body = name.encode() + b"\n"
        try:
            for _ in range(LATEST_TRIES):
                current = await self.get_tagged(key)
                if current is not None and current.data.decode(errors="replace").strip() >= name:
                    return False
                try:
                    if current is None:
                        await self.put_bytes(key, body, if_absent=True)
                    else:
                        await self.put_bytes(key, body, if_match=current.tag)
                    return True
                except (AlreadyExists, Changed):
                    continue
        except StoreError as exc:
            raise CommitError(
                f"writing {self.url(key)} failed (the checkpoint itself is committed): {exc}"
            ) from exc
        raise CommitError(
            f"{self.url(key)} changed under {LATEST_TRIES} tries in a row "
            "(the checkpoint itself is committed)"
        )

    async def _manifests(self) -> tuple[list[Manifest], frozenset[str]]:
        """Committed manifests newest first, and every name present (committed or not)."""
        prefix = self.checkpoints_prefix
        listing = scan_listing(await self.list_keys(prefix), prefix)
        bodies = await asyncio.gather(
            *(self.get_bytes(f"{prefix}{n}/{MANIFEST}") for n in listing.with_manifest)
        )
        out: list[Manifest] = []
        for name, body in zip(listing.with_manifest, bodies, strict=True):
            if body is None:
                continue
            try:
                m = Manifest.from_json(body)
            except StoreError as exc:
                log.warning("store.bad_manifest", name=name, error=str(exc))
                continue
            if m.name != name:
                log.warning("store.bad_manifest", name=name, error=f"manifest names {m.name!r}")
                continue
            out.append(m)
        out.sort(key=lambda m: m.name, reverse=True)
        return out, listing.names

    async def list(self) -> list[Manifest]:
        """Committed checkpoints (MANIFEST.json present and parseable), newest first."""
        manifests, _ = await self._manifests()
        return manifests

    async def _retention_quietly(self) -> None:
        try:
            await self._retention()
        except Exception as exc:  # a failed cleanup never fails a commit that already happened
            log.warning("store.retention_failed", error=str(exc))

    async def _retention(self) -> None:
        """Keep ``store.keep`` commits per rank and ``store.keep`` multi-node commits; delete older ones
        manifest first (so a crash mid-delete leaves an invisible orphan, never a half checkpoint), and
        abandoned orphans (:func:`~spotd.store.selection.plan_retention` says which). Node parts go before
        data: a node still committing that step then finds a part missing and stays WAITING, rather than
        committing files being deleted."""
        manifests, names = await self._manifests()
        plan = plan_retention(
            manifests, names, keep=self._keep, now=datetime.now(UTC), inflight=self._inflight
        )
        if not plan.doomed and not plan.orphans:
            return
        all_keys = await self.list_keys(self.checkpoints_prefix)
        for name in [*plan.doomed, *plan.orphans]:
            base = f"{self.checkpoints_prefix}{name}/"
            if name in plan.doomed:
                await self.delete_keys([base + MANIFEST])
            mine = [k for k in all_keys if k.startswith(base) and k != base + MANIFEST]
            parts = [k for k in mine if part_node(k[len(base) :]) is not None]
            if parts:
                await self.delete_keys(parts)
            await self.delete_keys([k for k in mine if k not in set(parts)])
        log.info("store.retention", deleted=list(plan.doomed), orphans=list(plan.orphans), keep=self._keep)

    async def restore(
        self, dest: Path, *, name: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> RestoreResult:
        """Download a committed checkpoint into ``dest``, verify every file, then move it into place
        (:mod:`spotd.store.restore` says in which order).

        ``name`` None means the newest; if its newest manifest has world_size > 1, every rank's newest
        checkpoint of that step is restored together (a step with a rank missing is skipped). A
        multi-node checkpoint is one manifest: every node restores all of its files, every rank's, not
        only its own part's (a DCP rank may read any shard, and at boot no trainer has said which node
        this is; torchrun's node ranks need not be the same across restarts either). An uncommitted
        step (parts only) is never a candidate and never hides the previous committed one. When a
        download or verification fails, the previous candidate is tried and the failed names are returned
        in ``skipped``. :class:`RestoreError` when nothing could be restored.
        """
        return await restore_checkpoint(self, dest, name=name, progress=progress)

    async def write_event(self, record: InterruptionRecord) -> str:
        """Store one interruption record; returns its key."""
        key = f"{self.job_id}/events/{event_name(record.instance_id, datetime.now(UTC))}"
        await self.put_bytes(key, record.to_json())
        return key

    async def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=True)


def _adoptable(
    streams: Sequence[FileStream], files: Sequence[LocalFile], info: Provenance
) -> dict[str, FileStream]:
    """The streams a commit of ``files`` for ``info`` finishes, by file: those of a file of it, when every
    stream was opened for this save and under one name; else none (the commit uploads as always). A stream
    of a file the commit does not hold (a directory's file deleted before saved) is left out: aborted."""
    rels = {f.rel for f in files}
    if not streams or len({s.name for s in streams}) != 1 or not all(s.matches(info) for s in streams):
        return {}
    adopted = {s.rel: s for s in streams if s.rel in rels}
    if len(adopted) != sum(1 for s in streams if s.rel in rels):
        return {}  # two streams of one file: neither is trusted
    return adopted


def _part_streams(
    streams: Sequence[FileStream], files: Sequence[LocalFile], name: str
) -> dict[str, FileStream]:
    """The streams a node part ``name`` of ``files`` finishes, by file: each opened under that name for one
    of its files (the first one per file); the others are not this part's (another step's, or a file the
    rank did not report after all). Two streams of one file are neither trusted: both are aborted (before
    the file is uploaded plainly), since aborting a directory's file deletes its object."""
    rels = {f.rel for f in files}
    mine = [s for s in streams if s.name == name and s.rel in rels]
    twice = {r for r in rels if sum(s.rel == r for s in mine) > 1}
    return {s.rel: s for s in mine if s.rel not in twice}


def _collect_sources(checkpoint_dir: Path, sources: Sequence[Path]) -> list[LocalFile]:
    """The files of every source (one per local rank, or one directory they share), each once. Blocking."""
    if not sources:
        raise CommitError("a node part needs at least one saved path; fix: report the ranks' saves")
    files: dict[str, LocalFile] = {}
    for source in sources:
        for f in collect_files(checkpoint_dir, source):
            files.setdefault(f.rel, f)
    for rel in files:
        if part_node(rel) is not None:
            raise CommitError(
                f"a checkpoint file may not be named {rel} (the store keeps node parts there); fix: rename it"
            )
    return [files[rel] for rel in sorted(files)]
