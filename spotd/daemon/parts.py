"""A multi-rank save: every local rank's save of one step, committed as this node's part of one checkpoint.

A trainer that said ``run_id``, ``rank`` and a ``world_size`` over 1 in hello (``spotd.torch.Checkpointer``
under torchrun does) is one rank of a multi-rank run. Its saves are not committed one per trainer: the saves
of one step are gathered here until every rank of this node has reported its own (or local rank 0 reported a
*shared* path, a sharded directory that holds every local rank's part), and then committed together with
:meth:`~spotd.store.api.CheckpointStore.commit_part` under the one name every node computes,
:func:`~spotd.store.selection.run_checkpoint_name` of the run and the step. A single node's part commits the
checkpoint at once; with several nodes the daemon whose part is the last one to land writes the global
manifest, and every other node's daemon learns of the commit by polling
:meth:`~spotd.store.api.CheckpointStore.committed`. Trainers are told ``durable`` only then: until every
node's part is there the step is not restorable, and the previous global checkpoint stays the newest.

An emergency save a rank announced (``writing``) is already going up under that name while it is written
(:mod:`.overlap`): its ``saved`` brings the stream here with it, and the node part's first commit attempt
finishes it (a retry uploads plainly, as :mod:`.commits` does for a single trainer).

A step some local rank never reports (it crashed, or left the loop alone) is given up when its budget runs
out, or as soon as a newer step of the same run is complete: its ranks are told, nothing of it is committed,
and the streams of its saves are aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from spotd import protocol
from spotd.daemon.commits import PERIODIC_COMMIT_BUDGET_S, Reply, with_retries
from spotd.daemon.episode import Episode, Save
from spotd.daemon.ipc import Session
from spotd.errors import StoreError
from spotd.logs import get_logger
from spotd.metrics import Metrics
from spotd.store import CheckpointStore, CommitInfo, FileStream, Manifest, PartResult, Priority
from spotd.store.marker import write_disk_marker
from spotd.store.selection import run_checkpoint_name

__all__ = ["GLOBAL_WAIT_S", "Member", "Placement", "StepParts", "placement_of"]

log = get_logger("spotd.parts")

#: How long a node whose part is durable waits for the other nodes' parts when no episode sets the time
#: (a periodic save, or a final one another node was asked for): a peer's upload may be slower than ours.
GLOBAL_WAIT_S: Final = 300.0
#: Pause between two looks for the global manifest: doubling from the first, capped.
POLL_FIRST_S: Final = 0.05
POLL_MAX_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one trainer of a multi-rank run sits: its global rank, how many ranks there are, how many of
    them on each node (torchrun's LOCAL_WORLD_SIZE, the same on every node), and its node."""

    run_id: str
    rank: int
    world_size: int
    local_world_size: int
    node_rank: int

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def local_ranks(self) -> range:
        """The global ranks this node holds."""
        first = self.node_rank * self.local_world_size
        return range(first, first + self.local_world_size)

    def checkpoint_name(self, step: int | None) -> str | None:
        """The name this run's save of ``step`` is committed under, on every node; None without a step
        (such a save is committed per trainer)."""
        return None if step is None or step < 0 else run_checkpoint_name(self.run_id, step)


def placement_of(session: Session) -> Placement | None:
    """The trainer's place in a multi-rank run, or None for a single process (or a client that did not say
    enough, or said something inconsistent: its saves are then committed one per trainer, as before)."""
    world, rank, run_id = session.world_size, session.rank, session.run_id
    if run_id is None or rank is None or world is None or world < 2 or not 0 <= rank < world:
        return None
    # Without LOCAL_WORLD_SIZE every rank is taken to be on this node.
    local = session.local_world_size or world
    node = session.node_rank if session.node_rank is not None else rank // local
    placement = Placement(run_id, rank, world, local, node)
    if local < 1 or world % local or not 0 <= node < placement.nodes or rank not in placement.local_ranks:
        log.warning(
            "session.placement_inconsistent",
            trainer=session.name,
            rank=rank,
            world_size=world,
            local_world_size=session.local_world_size,
            node_rank=session.node_rank,
            note="its saves are committed one per trainer",
            fix="run under torchrun, or pass consistent rank, world_size, local_world_size, node_rank",
        )
        return None
    return placement


@dataclass(slots=True)
class Member:
    """One rank's save of a step, and how to answer it."""

    placement: Placement
    save: Save
    source: Path
    info: CommitInfo
    reply: Reply
    episode: Episode | None
    emergency: bool
    #: Its files already going up (:mod:`.overlap`): the step's commit finishes them, or they are aborted.
    streams: tuple[FileStream, ...] = ()


@dataclass(slots=True)
class _Step:
    """The saves of one step of one run on this node, until every local rank has reported."""

    name: str
    step: int
    placement: Placement
    give_up_at: float  # monotonic: no new commit attempt, and no more waiting for ranks, after this
    members: dict[int, Member] = field(default_factory=dict)  # global rank → its save
    covered: list[Save] = field(default_factory=list)  # asked trainers a shared save speaks for
    shared: bool = False
    timer: asyncio.Task[None] | None = None

    def complete(self) -> bool:
        return self.shared or set(self.members) >= set(self.placement.local_ranks)

    def missing(self) -> list[int]:
        return sorted(set(self.placement.local_ranks) - set(self.members))

    def saves(self) -> list[Save]:
        return [m.save for m in self.members.values()] + self.covered

    def streams(self) -> list[FileStream]:
        return [s for m in self.members.values() for s in m.streams]

    def episodes(self) -> list[Episode]:
        return list(
            {id(m.episode): m.episode for m in self.members.values() if m.episode is not None}.values()
        )

    def priority(self) -> Priority:
        emergency = any(m.emergency for m in self.members.values())
        return Priority.EMERGENCY if emergency else Priority.BACKGROUND

    def info(self) -> CommitInfo:
        """What the part records: the request and reason of a rank that was asked (by this daemon, else by
        its own SIGTERM), not of one stopped only because a peer was; and every rank."""
        members = sorted(self.members.values(), key=lambda m: m.placement.rank)
        asked = next(
            (m for m in members if m.info.request_id is not None),
            next((m for m in members if m.info.reason != "peer"), members[0]),
        )
        final = any(m.info.final for m in members)
        return replace(asked.info, rank=None, world_size=self.placement.world_size, final=final)


class StepParts:
    """Gathers the saves of multi-rank steps and commits each complete one as this node's part."""

    __slots__ = (
        "_checkpoint_dir",
        "_clock",
        "_metrics",
        "_on_durable",
        "_on_failed",
        "_open",
        "_sleep_until",
        "_spawn",
        "_store",
    )

    def __init__(
        self,
        *,
        store: CheckpointStore,
        metrics: Metrics,
        checkpoint_dir: Path,
        on_durable: Callable[[Manifest], None],
        on_failed: Callable[[CommitInfo, str], None],
        clock: Callable[[], float],
        sleep_until: Callable[[float], Awaitable[None]],
        spawn: Callable[[Any], None],
    ) -> None:
        """``on_durable``/``on_failed``: what the Committer calls for a single trainer's commit (the
        coordinator's sink events), once per step here."""
        self._store = store
        self._metrics = metrics
        self._checkpoint_dir = checkpoint_dir
        self._on_durable = on_durable
        self._on_failed = on_failed
        self._clock = clock
        self._sleep_until = sleep_until
        self._spawn = spawn
        self._open: dict[tuple[str, int], _Step] = {}

    async def close(self) -> None:
        """Stop the timers of steps still waiting for a rank and abort their streams (the daemon is
        stopping: nothing of those steps will be committed by it)."""
        for entry in self._open.values():
            if entry.timer is not None:
                entry.timer.cancel()
        for entry in self._open.values():
            await _abort(entry.streams())

    def pending(self) -> list[dict[str, Any]]:
        """Steps waiting for a local rank's save (``spotd status``)."""
        return [{"name": s.name, "step": s.step, "missing_ranks": s.missing()} for s in self._open.values()]

    def offer(self, member: Member, *, shared: bool = False, covers: list[Save] | None = None) -> None:
        """One rank's save of ``member.save.step``; commits the step once every local rank has reported.

        ``shared``: the path holds every local rank's part (local rank 0's sharded directory), so the step
        is complete with it alone; ``covers``, the saves it stands for of the other asked ranks.
        """
        p, step = member.placement, member.save.step
        assert step is not None
        key = (p.run_id, step)
        entry = self._open.get(key)
        if entry is None:
            give_up_at = (
                member.episode.retry_until
                if member.episode is not None
                else self._clock() + PERIODIC_COMMIT_BUDGET_S
            )
            entry = _Step(
                name=run_checkpoint_name(p.run_id, step), step=step, placement=p, give_up_at=give_up_at
            )
            self._open[key] = entry
        elif member.episode is not None:
            entry.give_up_at = max(entry.give_up_at, member.episode.retry_until)
        previous = entry.members.get(p.rank)
        if previous is not None and previous.save is not member.save:
            # The same rank again (its client re-sent the save after a reconnect): answer the newest.
            log.info("checkpoint.part_resent", name=entry.name, rank=p.rank)
            self._spawn(_abort([s for s in previous.streams if s not in member.streams]))
        entry.members[p.rank] = member
        entry.shared = entry.shared or shared
        entry.covered += covers or []
        if not entry.complete():
            log.info(
                "checkpoint.part_waiting_for_ranks", name=entry.name, step=step, missing_ranks=entry.missing()
            )
            if entry.timer is None:
                entry.timer = asyncio.get_running_loop().create_task(self._expire(key, entry))
            return
        del self._open[key]
        if entry.timer is not None:
            entry.timer.cancel()
        for older_key, older in list(self._open.items()):
            if older_key[0] == p.run_id and older.step < step:
                del self._open[older_key]
                if older.timer is not None:
                    older.timer.cancel()
                self._spawn(self._abandon(older, because=f"step {step} of the same run is complete"))
        self._spawn(self._commit(entry))

    async def _expire(self, key: tuple[str, int], entry: _Step) -> None:
        await self._sleep_until(entry.give_up_at)
        if self._open.get(key) is not entry:
            return
        del self._open[key]
        # A rank whose client re-sent a save it never heard `durable` for (a reconnect) waits alone for a
        # step the others already committed: then it is durable, not lost.
        try:
            found = await self._store.committed(entry.name)
        except StoreError:
            found = None
        if found is not None:
            log.info("checkpoint.already_committed", name=entry.name, ranks=sorted(entry.members))
            await _abort(entry.streams())
            await self._succeeded(entry, found, ranks=sorted(entry.members))
            return
        await self._abandon(entry, because="its time ran out")

    async def _abandon(self, entry: _Step, *, because: str) -> None:
        # First: an open stream holds background transfers back, and its parts are sent for nothing.
        await _abort(entry.streams())
        missing = entry.missing()
        message = (
            f"rank(s) {missing} of this node never reported step {entry.step} ({because}): nothing of "
            f"{entry.name} is committed, the previous checkpoint stays the newest; the local files are kept"
        )
        log.error(
            "checkpoint.part_incomplete",
            name=entry.name,
            step=entry.step,
            missing_ranks=missing,
            because=because,
            fix="see the missing rank's own log: it crashed, or its save failed",
        )
        await self._failed(entry, message)

    async def _failed(self, entry: _Step, message: str) -> None:
        self._metrics.upload_failures.inc()
        self._on_failed(entry.info(), message)
        for save in entry.saves():
            save.error = message
        for m in entry.members.values():
            await m.reply(
                protocol.store_failed(request_id=m.info.request_id, path=m.save.path, message=message)
            )
        for episode in entry.episodes():
            episode.done.set()

    async def _commit(self, entry: _Step) -> None:
        """Commit this node's part, retrying while it can still matter; then wait for the global manifest."""
        p, info = entry.placement, entry.info()
        members = sorted(entry.members.values(), key=lambda m: m.placement.rank)
        sources = [m.source for m in members]
        ranks = list(p.local_ranks) if entry.shared else [m.placement.rank for m in members]
        streams = entry.streams()
        started = self._clock()
        attempts = 0

        def attempt() -> Awaitable[PartResult]:
            nonlocal attempts
            attempts += 1
            for save in entry.saves():
                save.attempts = attempts
            return self._store.commit_part(
                sources,
                checkpoint_dir=self._checkpoint_dir,
                name=entry.name,
                node_rank=p.node_rank,
                nodes=p.nodes,
                ranks=ranks,
                info=info,
                priority=entry.priority(),
                # The first attempt finishes or aborts them; a retry uploads plainly.
                streams=streams if attempts == 1 else (),
            )

        try:
            result = await with_retries(
                attempt,
                give_up_at=entry.give_up_at,
                clock=self._clock,
                sleep=lambda s: self._sleep_until(self._clock() + s),
                name=entry.name,
            )
            manifest = result.manifest
            if manifest is None:
                manifest = await self._await_global(entry, result.missing)
        except (StoreError, OSError) as exc:
            log.error(
                "checkpoint.upload_failed",
                name=entry.name,
                step=entry.step,
                node=p.node_rank,
                error=str(exc),
                attempts=attempts,
                seconds=round(self._clock() - started, 3),
                local_kept=True,
                fix="check S3 reachability and permissions and the other nodes' spotd logs; local files kept",
            )
            await self._failed(entry, f"upload failed, local checkpoint kept: {exc}")
            return
        await self._succeeded(entry, manifest, ranks=ranks)

    async def _succeeded(self, entry: _Step, manifest: Manifest, *, ranks: list[int]) -> None:
        """``manifest`` is the committed checkpoint of ``entry``'s step: its saves are durable, say so."""
        p, info = entry.placement, entry.info()
        members = sorted(entry.members.values(), key=lambda m: m.placement.rank)
        now = self._clock()
        for save in entry.saves():
            save.manifest, save.committed_at = manifest, now
        self._on_durable(manifest)
        await asyncio.to_thread(write_disk_marker, self._checkpoint_dir, manifest)
        log.info(
            "checkpoint.durable",
            trainer=info.trainer,
            name=manifest.name,
            step=manifest.step,
            bytes=manifest.total_bytes,
            files=len(manifest.files),
            nodes=p.nodes,
            node=p.node_rank,
            ranks=ranks,
            seconds=round(now - min(m.save.saved_at for m in members), 3),
            request_id=info.request_id,
        )
        for m in members:
            await m.reply(
                protocol.durable(
                    request_id=m.info.request_id,
                    path=m.save.path,
                    step=manifest.step,
                    name=manifest.name,
                    uri=self._store.uri,
                )
            )
        for episode in entry.episodes():
            episode.done.set()

    async def _await_global(self, entry: _Step, missing: tuple[int, ...]) -> Manifest:
        """This node's part is durable; the checkpoint is committed once every other node's is too."""
        p = entry.placement
        log.info(
            "checkpoint.part_durable",
            name=entry.name,
            step=entry.step,
            node=p.node_rank,
            nodes=p.nodes,
            waiting_for_nodes=list(missing),
        )
        episodic = any(m.episode is not None for m in entry.members.values())
        until = entry.give_up_at if episodic else max(entry.give_up_at, self._clock() + GLOBAL_WAIT_S)
        pause = POLL_FIRST_S
        while True:
            try:
                found = await self._store.committed(entry.name, nodes=p.nodes)
            except StoreError as exc:
                log.warning("checkpoint.global_check_failed", name=entry.name, error=str(exc))
                found = None
            if found is not None:
                return found
            if self._clock() + pause > until:
                raise StoreError(
                    f"this node's part of {entry.name} is durable, but node(s) {list(missing)} did not "
                    "commit theirs in time: the step is not restorable (the previous checkpoint stays the "
                    "newest); fix: see those nodes' spotd logs (journalctl -u spotd)"
                )
            await self._sleep_until(self._clock() + pause)
            pause = min(POLL_MAX_S, pause * 2)


async def _abort(streams: list[FileStream]) -> None:
    """End ``streams`` (each a no-op once finished or aborted)."""
    for stream in streams:
        await stream.abort()
