"""One save made durable: the store commit, retried while it can still matter, then the trainer told.

Retry budgets have one owner each. botocore retries every S3 request (standard mode, ``AWS_MAX_ATTEMPTS``)
and the store adds no retry of a request on top; retrying a *whole commit* is this module's alone, the only
retry above botocore's. An emergency commit (one an episode asked for) is retried until the episode's
``retry_until`` (for a spot or maintenance notice, the instance's own time: the deadline trainers are told
already keeps ``deadline_margin`` back, and a save durable inside that margin is still saved), a periodic or
watch-mode one for :data:`PERIODIC_COMMIT_BUDGET_S`. A final save of the trainer's own (it got SIGTERM) goes
at emergency priority within that same budget, which is also how long the trainer waits for it by default
(``spotd.client.signals.DEFAULT_GRACE_S``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from spotd import protocol
from spotd.daemon.episode import Episode, Save
from spotd.errors import StoreError
from spotd.logs import get_logger
from spotd.metrics import Metrics
from spotd.store import CheckpointStore, CommitInfo, FileStream, Manifest, Priority
from spotd.store.marker import write_disk_marker

__all__ = [
    "COMMIT_BACKOFF_MAX_S",
    "COMMIT_BACKOFF_S",
    "PERIODIC_COMMIT_BUDGET_S",
    "Committer",
    "Reply",
    "with_retries",
]

log = get_logger("spotd.commits")

T = TypeVar("T")

#: Seconds after a periodic commit's first attempt began within which a failed attempt is retried. An
#: attempt under way is never cut short, so a commit can outlast this by one attempt: a large checkpoint
#: may rightly take longer than the budget to upload once.
PERIODIC_COMMIT_BUDGET_S: Final = 60.0
#: Pause between whole-commit attempts: doubling from the first, capped.
COMMIT_BACKOFF_S: Final = 1.0
COMMIT_BACKOFF_MAX_S: Final = 15.0

#: Sends one frame to the trainer whose save this is; None when nobody is to be told (watch mode).
Reply = Callable[[dict[str, Any]], Awaitable[bool]]


class Committer:
    """Commits saves into the store for the coordinator; tells each trainer ``durable`` or ``error``."""

    __slots__ = (
        "_checkpoint_dir",
        "_clock",
        "_metrics",
        "_on_durable",
        "_on_failed",
        "_sleep",
        "_store",
    )

    def __init__(
        self,
        *,
        store: CheckpointStore,
        metrics: Metrics,
        checkpoint_dir: Path,
        on_durable: Callable[[Manifest], None],
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        on_failed: Callable[[CommitInfo, str], None] | None = None,
    ) -> None:
        self._store = store
        self._on_failed = on_failed
        self._metrics = metrics
        self._checkpoint_dir = checkpoint_dir
        self._on_durable = on_durable
        self._clock = clock
        # Injected with the clocks: a test's sleep moves its clocks forward instead of waiting.
        self._sleep = sleep

    async def commit(
        self,
        source: Path,
        *,
        info: CommitInfo,
        save: Save,
        episode: Episode | None,
        reply: Reply | None,
        priority: Priority | None = None,
        streams: Sequence[FileStream] = (),
    ) -> Manifest | None:
        """Commit ``source``; records the outcome on ``save`` and wakes ``episode``; None when given up.

        ``priority`` defaults to emergency for a save an episode asked for, background otherwise.
        ``streams`` (its files already going up, :mod:`.overlap`) go to the first attempt only: it finishes
        or aborts them, and a retry uploads plainly.
        """
        if priority is None:
            priority = Priority.EMERGENCY if episode is not None else Priority.BACKGROUND
        try:
            manifest = await self._commit_with_retries(source, info, priority, save, episode, streams)
        except (StoreError, OSError) as exc:
            save.error = str(exc)
            # Counted here, once per commit given up, not per attempt: the help text of the metric says so.
            self._metrics.upload_failures.inc()
            if self._on_failed is not None:
                self._on_failed(info, str(exc))
            log.error(
                "checkpoint.upload_failed",
                trainer=info.trainer,
                path=save.path,
                error=str(exc),
                attempts=save.attempts,
                seconds=round(self._clock() - save.saved_at, 3),
                local_kept=True,
                fix="check S3 reachability and permissions; the local checkpoint is kept",
            )
            if reply is not None:
                message = f"upload failed, local checkpoint kept: {exc}"
                await reply(
                    protocol.store_failed(request_id=info.request_id, path=save.path, message=message)
                )
            if episode is not None:
                episode.done.set()
            return None
        save.manifest = manifest
        save.committed_at = self._clock()
        self._on_durable(manifest)
        await asyncio.to_thread(write_disk_marker, self._checkpoint_dir, manifest)
        log.info(
            "checkpoint.durable",
            trainer=info.trainer,
            name=manifest.name,
            step=manifest.step,
            bytes=manifest.total_bytes,
            files=len(manifest.files),
            seconds=round(save.committed_at - save.saved_at, 3),
            request_id=info.request_id,
        )
        if reply is not None:
            await reply(
                protocol.durable(
                    request_id=info.request_id,
                    path=save.path,
                    step=manifest.step,
                    name=manifest.name,
                    uri=self._store.uri,
                )
            )
        if episode is not None:
            episode.done.set()
        return manifest

    async def _commit_with_retries(
        self,
        source: Path,
        info: CommitInfo,
        priority: Priority,
        save: Save,
        episode: Episode | None,
        streams: Sequence[FileStream] = (),
    ) -> Manifest:
        """Retry the whole commit while it can still matter; raises the last attempt's error when not.

        A commit an episode asked for keeps trying until the episode's ``retry_until``, after the episode
        closed too (a late upload still beats none); any other for ``PERIODIC_COMMIT_BUDGET_S``, then
        leaves the local checkpoint in place.
        """
        give_up_at = episode.retry_until if episode is not None else self._clock() + PERIODIC_COMMIT_BUDGET_S

        def attempt() -> Awaitable[Manifest]:
            save.attempts += 1
            extra: dict[str, Any] = {"streams": streams} if streams and save.attempts == 1 else {}
            return self._store.commit(
                source, checkpoint_dir=self._checkpoint_dir, info=info, priority=priority, **extra
            )

        return await with_retries(
            attempt, give_up_at=give_up_at, clock=self._clock, sleep=self._sleep, trainer=info.trainer
        )


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    give_up_at: float,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    **what: Any,
) -> T:
    """``attempt()`` until it returns, pausing :data:`COMMIT_BACKOFF_S` doubling up to
    :data:`COMMIT_BACKOFF_MAX_S` between tries; raises the last StoreError/OSError once the next try would
    begin after ``give_up_at``. ``what`` names the commit in the ``checkpoint.upload_retry`` lines."""
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except (StoreError, OSError) as exc:
            backoff_s = min(COMMIT_BACKOFF_MAX_S, COMMIT_BACKOFF_S * 2 ** (tries - 1))
            if clock() + backoff_s > give_up_at:
                raise
            log.warning(
                "checkpoint.upload_retry", **what, attempt=tries, error=str(exc), retry_in_seconds=backoff_s
            )
            await sleep(backoff_s)
