"""Watch mode's part of an episode: the watcher stands in for a trainer.

With ``[sync] mode = "watch"`` no trainer talks to spotd; the watcher (:mod:`.watch`) finds settled
checkpoints in checkpoint_dir and hands them over. On a notice it is asked like a trainer: it commits what is
settled now, at emergency priority, and the episode's record says what it did (its last commit, or the
newest commit already in the store when the disk holds nothing newer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from spotd.daemon.commits import Committer
from spotd.daemon.episode import Episode, Save
from spotd.daemon.watch import Flushed, Handover, step_from_name
from spotd.errors import StoreError
from spotd.logs import get_logger
from spotd.store import CommitInfo, Manifest, Priority

__all__ = ["WATCHER", "WatchAnswer", "Watching"]

log = get_logger("spotd.coordinator")

#: The episode's name for the watcher, which stands in for a trainer in watch mode.
WATCHER: Final = "watch"


class Watching(Protocol):
    """What watch mode needs of the watcher (:class:`spotd.daemon.watch.Watcher`)."""

    async def flush(self, handover: Handover) -> Flushed: ...


class WatchAnswer:
    """Commits what the watcher hands over, and answers an episode for it."""

    __slots__ = ("_clock", "_committer", "_instance_id", "_job_id", "_last_durable", "_watcher")

    def __init__(
        self,
        *,
        watcher: Watching,
        committer: Committer,
        job_id: str,
        instance_id: str,
        clock: Callable[[], float],
        last_durable: Callable[[], Manifest | None],
    ) -> None:
        self._watcher = watcher
        self._committer = committer
        self._job_id = job_id
        self._instance_id = instance_id
        self._clock = clock
        self._last_durable = last_durable

    async def commit_path(
        self, source: Path, *, trainer: str, step: int | None, episode: Episode | None
    ) -> Manifest:
        """Commit a path the watcher found: no trainer to answer. While a final episode (``episode``, the
        open one) runs it goes at emergency priority: it is the newest work there is.

        Raises StoreError when the commit is given up, so the watcher offers the entry again.
        """
        priority = Priority.EMERGENCY if episode is not None and episode.final else Priority.BACKGROUND
        save, manifest = await self._commit(source, trainer=trainer, step=step, priority=priority)
        if manifest is None:
            raise StoreError(f"{source.name} was not committed: {save.error}")
        return manifest

    async def _commit(
        self,
        source: Path,
        *,
        trainer: str,
        step: int | None,
        priority: Priority,
        episode: Episode | None = None,
    ) -> tuple[Save, Manifest | None]:
        info = CommitInfo(
            job_id=self._job_id,
            step=step,
            trainer=trainer,
            rank=None,
            world_size=None,
            request_id=None if episode is None else episode.request_id,
            reason="watch" if episode is None else episode.reason,
            instance_id=self._instance_id,
            final=episode is not None and episode.final,
        )
        save = Save(WATCHER, trainer, source.name, step, self._clock())
        manifest = await self._committer.commit(
            source, info=info, save=save, episode=episode, reply=None, priority=priority
        )
        return save, manifest

    async def answer(self, episode: Episode) -> None:
        """Watch mode's answer to a notice: commit what is settled now, emergency priority, and say so.

        The watcher's part of the episode is its last commit; with nothing new to commit it is the newest
        commit already in the store (the disk holds nothing newer that is complete and settled).
        """
        saves: list[Save] = []

        async def handover(path: Path) -> None:
            save, manifest = await self._commit(
                path,
                trainer=WATCHER,
                step=step_from_name(path.name),
                priority=Priority.EMERGENCY,
                episode=episode,
            )
            saves.append(save)
            if manifest is None:
                raise StoreError(f"{path.name} was not committed: {save.error}")

        flushed = await self._watcher.flush(handover)
        newest = self._last_durable()  # after the flush: its last commit, if it made one
        if saves:
            episode.saves[WATCHER] = saves[-1]
        elif newest is not None:
            now = self._clock()
            episode.saves[WATCHER] = Save(
                WATCHER,
                WATCHER,
                newest.name,
                newest.step,
                now,
                manifest=newest,
                committed_at=now,
                reused=True,
            )
        else:
            episode.failed[WATCHER] = "nothing complete in checkpoint_dir to commit"
        episode.done.set()
        failed = [s.path for s in saves if s.error]
        if failed or newest is None:
            log_fn = log.error
        elif flushed.settling:
            # Being written right now: committed once it settles, which may be after the instance is gone.
            log_fn = log.warning
        else:
            log_fn = log.info
        log_fn(
            "watch.notice_handled",
            request_id=episode.request_id,
            committed=[s.manifest.name for s in saves if s.manifest],
            failed=failed,
            settling=list(flushed.settling),
            newest=None if newest is None else newest.name,
            priority=Priority.EMERGENCY.value,
        )
