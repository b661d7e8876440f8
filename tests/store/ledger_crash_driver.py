"""Crash-test driver: one session appending ledger records until killed.

Usage: python -m tests.store.ledger_crash_driver STORE_URI ENDPOINT_URL SESSION [KILL_AT]

With KILL_AT, the process SIGKILLs itself in the middle of writing record KILL_AT: the file store's temporary
file holds half the record when the kill lands (its fsync is where the kill is put).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime

from spotd.config import Config
from spotd.events import InstanceIdentity, SessionEventKind
from spotd.store import open_store
from spotd.store.ledger import Ledger

_REAL_FSYNC = os.fsync


def _torn_fsync(fd: int) -> None:
    # Half the record reached the temporary file; then the instance went away.
    os.ftruncate(fd, os.fstat(fd).st_size // 2)
    _REAL_FSYNC(fd)
    os.kill(os.getpid(), signal.SIGKILL)


async def main(uri: str, endpoint: str, session: str, kill_at: int | None) -> None:
    cfg = Config().replace(**{"job_id": "crash", "store.uri": uri, "store.endpoint_url": endpoint})
    store = open_store(cfg)
    ledger = Ledger.of_store(store)
    writer = ledger.writer(
        session=session,
        identity=InstanceIdentity("i-crash", "g5.2xlarge", "us-east-1a", "spot"),
        region="us-east-1",
    )
    print("ready", flush=True)
    try:
        n = 0
        while True:
            record = writer.record(
                SessionEventKind.DURABLE, datetime.now(UTC), {"step": n, "pad": "x" * 4096}
            )
            if kill_at is not None and n == kill_at:
                os.fsync = _torn_fsync
            await writer.write(record)
            print(f"wrote {n}", flush=True)
            n += 1
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None))
