"""Boot policy, run once before ``READY=1``: who this instance is, what a crash left in the store, and whether
``checkpoint_dir`` needs the newest committed checkpoint.

The store measures and logs its own work (``spotd_restore_seconds``, ``store.recovered``,
``store.restored``); this module decides what to do and logs the decision.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Final

from spotd.aws.imds import ImdsClient
from spotd.daemon.systemd import Notifier
from spotd.errors import ImdsError, NothingToRestore, RestoreError, StoreError
from spotd.events import InstanceIdentity
from spotd.logs import get_logger
from spotd.store import CheckpointStore, Manifest
from spotd.store.marker import read_disk_marker, write_disk_marker

__all__ = ["RESTORE_ATTEMPTS", "identify", "prepare_store", "restore_on_start"]

log = get_logger("spotd.boot")

#: Restores boot tries against an unreachable store before giving up (systemd then restarts spotd).
RESTORE_ATTEMPTS: Final = 3
#: How long a restore on boot may take before systemd's start timeout would kill us.
RESTORE_START_TIMEOUT_S: Final = 600.0


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

    Raises StoreError (or OSError) naming the problem; the caller exits so systemd retries.
    """
    await store.check_access()
    # The store logs store.recovered for what it removed; a second line here counted every crash twice.
    return await store.recover()


async def restore_on_start(
    store: CheckpointStore, *, checkpoint_dir: Path, enabled: bool, notifier: Notifier
) -> Manifest | None:
    """Restore the newest committed checkpoint unless the disk already holds it; returns that newest one.

    ``enabled`` is ``policy.restore_on_start``. Raises RestoreError when the store cannot be read after
    ``RESTORE_ATTEMPTS`` or no committed checkpoint verifies.
    """
    manifests: list[Manifest] = await store.list()
    newest = manifests[0] if manifests else None
    if not enabled:
        log.info("restore.skipped", reason="policy.restore_on_start = false")
        return newest
    if newest is None:
        log.info("restore.nothing", store=store.uri)
        return None
    on_disk = await asyncio.to_thread(read_disk_marker, checkpoint_dir)
    if on_disk is not None and on_disk >= newest.name:
        log.info("restore.up_to_date", name=on_disk)
        return newest
    notifier.status(f"restoring {newest.name}")
    # A large checkpoint may take longer than TimeoutStartSec allows by default.
    notifier.extend_timeout(RESTORE_START_TIMEOUT_S)
    started = time.monotonic()
    last_error: Exception | None = None
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        try:
            result = await store.restore(checkpoint_dir)
            break
        except NothingToRestore as exc:
            # Only steps some rank never committed: a fresh start, as with an empty store.
            log.warning("restore.nothing", store=store.uri, reason=str(exc))
            return newest
        except RestoreError:
            raise
        except (StoreError, OSError) as exc:
            last_error = exc
            log.warning("restore.retry", attempt=attempt, error=str(exc))
            await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
    else:
        raise RestoreError(f"restore failed after {RESTORE_ATTEMPTS} attempts: {last_error}")
    # Wall time of the whole restore, retries included, for the log; spotd_restore_seconds is the store's
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
    return newest
