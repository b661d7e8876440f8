"""Boot policy, run once before ``READY=1``: who this instance is, what a crash left in the store, and whether
``checkpoint_dir`` needs the newest committed checkpoint.

The store measures and logs its own work (``spotd_restore_seconds``, ``store.recovered``,
``store.restored``); this module decides what to do and logs the decision.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from spotd.aws.imds import ImdsClient
from spotd.daemon.systemd import Notifier
from spotd.errors import DiskFull, ImdsError, NothingToRestore, StoreError
from spotd.events import InstanceIdentity
from spotd.logs import get_logger
from spotd.store import CheckpointStore, Manifest
from spotd.store.marker import read_disk_marker, write_disk_marker

__all__ = [
    "BOOT_BACKOFF_MAX_S",
    "BOOT_STORE_FIX",
    "StoreAtBoot",
    "committed_on_disk",
    "identify",
    "prepare_store",
    "restore_on_start",
    "retry_at_boot",
]

log = get_logger("spotd.boot")

T = TypeVar("T")

#: Longest pause between two boot attempts against a store that does not answer (1, 2, 4, ... s).
BOOT_BACKOFF_MAX_S: Final = 16.0
#: Time allowed to the attempt after a pause, on top of the pause, when asking systemd for more start time.
_ATTEMPT_ALLOWANCE_S: Final = 60.0
BOOT_STORE_FIX: Final = (
    "check store.uri, credentials and the IAM policy (docs/iam-policy.json); spotd retries for "
    "policy.boot_store_wait seconds, and the training unit waits for it"
)
#: How long a restore on boot may take before systemd's start timeout would kill us.
RESTORE_START_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True, slots=True)
class StoreAtBoot:
    """What boot found: the newest committed checkpoint, and which entries of checkpoint_dir the store
    already holds as they are on disk (watch mode need not upload those again)."""

    newest: Manifest | None
    committed_on_disk: frozenset[str] = frozenset()


def committed_on_disk(
    checkpoint_dir: Path, manifests: Sequence[Manifest], *, trusted: Manifest | None
) -> frozenset[str]:
    """Top-level entries of ``checkpoint_dir`` that are, file for file and size for size, a committed
    checkpoint's, and unchanged since: not modified after that commit, or ``trusted`` (what boot restored,
    or what the disk marker names, whose files a restore wrote after the commit).

    Blocking (it stats the tree): run it off the loop. Without this a restart in watch mode uploaded every
    older checkpoint again, the last of them becoming the newest commit.
    """
    found: set[str] = set()
    for manifest in manifests:  # newest first: a name is decided by its newest matching commit
        by_top: dict[str, dict[str, int]] = {}
        for entry in manifest.files:
            by_top.setdefault(entry.path.split("/", 1)[0], {})[entry.path] = entry.size
        committed_ns = manifest.created_at.timestamp() * 1e9
        for top, sizes in by_top.items():
            if top in found:
                continue
            on_disk = _files_under(checkpoint_dir, top)
            if on_disk is None or {rel: size for rel, (size, _) in on_disk.items()} != sizes:
                continue
            if (trusted is not None and manifest.name == trusted.name) or all(
                mtime_ns <= committed_ns for _, mtime_ns in on_disk.values()
            ):
                found.add(top)
    return frozenset(found)


def _files_under(checkpoint_dir: Path, top: str) -> dict[str, tuple[int, int]] | None:
    """{path relative to checkpoint_dir: (size, mtime_ns)} of a top-level entry; None if it is not there."""
    root = checkpoint_dir / top
    try:
        if root.is_file():
            st = root.stat()
            return {top: (st.st_size, st.st_mtime_ns)}
        if not root.is_dir():
            return None
        out: dict[str, tuple[int, int]] = {}
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                st = path.stat()
                out[path.relative_to(checkpoint_dir).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out
    except OSError:
        return None


async def identify(imds: ImdsClient, *, timeout_s: float) -> InstanceIdentity:
    """The instance's identity, or "unknown" fields when IMDS does not answer within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            identity = await imds.identity()
    except (TimeoutError, ImdsError) as exc:
        log.warning("imds.identity_unavailable", error=str(exc) or type(exc).__name__)
        identity = InstanceIdentity()
    if identity.life_cycle not in ("spot", "unknown"):
        log.warning(
            "instance.not_spot",
            life_cycle=identity.life_cycle,
            note="spot interruption notices will not come; rebalance and maintenance still watched",
        )
    return identity


async def prepare_store(store: CheckpointStore) -> int:
    """Check the store is usable and clear what a crash left; returns how many leftovers were removed.

    Raises StoreError (or OSError) naming the problem; :func:`retry_at_boot` retries.
    """
    await store.check_access()
    # The store logs store.recovered for what it removed; a second line here counted every crash twice.
    return await store.recover()


async def restore_on_start(
    store: CheckpointStore, *, checkpoint_dir: Path, enabled: bool, notifier: Notifier
) -> StoreAtBoot:
    """Restore the newest committed checkpoint unless the disk already holds it; says what the disk holds.

    ``enabled`` is ``policy.restore_on_start``. Raises StoreError (RestoreError when no committed
    checkpoint verifies); :func:`retry_at_boot` retries.
    """
    manifests: list[Manifest] = await store.list()
    newest = manifests[0] if manifests else None
    marker = await asyncio.to_thread(read_disk_marker, checkpoint_dir)
    marked = next((m for m in manifests if m.name == marker), None)

    async def found(trusted: Manifest | None) -> StoreAtBoot:
        names = await asyncio.to_thread(committed_on_disk, checkpoint_dir, manifests, trusted=trusted)
        return StoreAtBoot(newest=newest, committed_on_disk=names)

    if not enabled:
        log.info("restore.skipped", reason="policy.restore_on_start = false")
        return await found(marked)
    if newest is None:
        log.info("restore.nothing", store=store.uri)
        return StoreAtBoot(newest=None)
    if marker is not None and marker >= newest.name:
        log.info("restore.up_to_date", name=marker)
        return await found(marked)
    notifier.status(f"restoring {newest.name}")
    # A large checkpoint may take longer than TimeoutStartSec allows by default.
    notifier.extend_timeout(RESTORE_START_TIMEOUT_S)
    started = time.monotonic()
    try:
        result = await store.restore(checkpoint_dir)
    except NothingToRestore as exc:
        # Only steps some rank never committed: a fresh start, as with an empty store.
        log.warning("restore.nothing", store=store.uri, reason=str(exc))
        return await found(marked)
    # Wall time of the whole restore, for the log; spotd_restore_seconds is the store's
    # (observed once per restore in store.restore(): observing it here too made every boot count twice).
    seconds = time.monotonic() - started
    await asyncio.to_thread(write_disk_marker, checkpoint_dir, result.manifest)
    log.info(
        "restore.done",
        name=result.manifest.name,
        step=result.manifest.step,
        files=result.files,
        bytes=result.bytes,
        seconds=round(seconds, 3),
        skipped=list(result.skipped),
    )
    return await found(result.manifest)


async def retry_at_boot(
    attempt: Callable[[], Awaitable[T]],
    *,
    notifier: Notifier,
    wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run ``attempt`` (what boot asks of the store: the check, crash recovery, the job's ledger, the
    restore) until it succeeds; store trouble is retried with backoff for ``wait_s``.

    ``wait_s`` is ``policy.boot_store_wait``. Each failure is logged (``startup.store_retry``, the error and
    the fix), shown in ``systemctl status`` (STATUS=) and covered by more start time
    (EXTEND_TIMEOUT_USEC=); then the last error is raised for the caller to exit 1.

    Every store error is retried, a missing bucket and AccessDenied included: on a first boot the bucket,
    the role and its policy are often created moments before (IAM is eventually consistent), and telling
    those apart from a typo is not possible from here. One long start costs one start of StartLimitBurst;
    exiting at once cost one per try, and ten of them left neither spotd nor the trainer running. A full
    checkpoint_dir (:class:`DiskFull`) is not the store's trouble and is raised at once.
    """
    started = clock()
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except DiskFull:
            # checkpoint_dir's own disk, not the store: nothing frees it while spotd waits.
            raise
        except (StoreError, OSError) as exc:
            backoff_s = min(BOOT_BACKOFF_MAX_S, 2.0 ** (tries - 1))
            left_s = wait_s - (clock() - started)
            if backoff_s > left_s:
                raise
            log.warning(
                "startup.store_retry",
                attempt=tries,
                error=str(exc),
                fix=BOOT_STORE_FIX,
                retry_in_seconds=backoff_s,
                gives_up_in_seconds=round(left_s, 1),
            )
            notifier.notify(
                STATUS=f"store not ready ({exc}); retrying in {backoff_s:.0f} s, giving up in {left_s:.0f} s",
                EXTEND_TIMEOUT_USEC=int((backoff_s + _ATTEMPT_ALLOWANCE_S) * 1_000_000),
            )
            await sleep(backoff_s)
