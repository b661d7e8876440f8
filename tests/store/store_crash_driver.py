"""Crash-test driver: commits checkpoints through open_store in a loop until killed.

Usage: python -m tests.store.store_crash_driver STORE_URI ENDPOINT_URL CHECKPOINT_DIR
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from spotd.config import Config
from spotd.store import CommitInfo, Priority, open_store


async def main(uri: str, endpoint: str, ckdir: Path) -> None:
    cfg = Config().replace(
        **{
            "job_id": "crash",
            "store.uri": uri,
            "store.endpoint_url": endpoint,
            "store.part_size": 5 * 1024 * 1024,
            "store.concurrency": 4,
            "store.keep": 3,
        }
    )
    store = open_store(cfg)
    step = 0
    print("ready", flush=True)
    try:
        while True:
            step += 1
            target = ckdir / f"step{step}"
            target.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                # Every file is larger than one part, so a kill lands inside a multipart upload often
                # enough for recover() to find leftovers (files of one part go up as a single PUT).
                (target / f"part{i}.bin").write_bytes(os.urandom((5 + step % 5) * 1024 * 1024 + 1 + i))
            info = CommitInfo(
                job_id="crash",
                step=step,
                trainer="crash",
                rank=None,
                world_size=None,
                request_id=None,
                reason="loop",
                instance_id="i-crash",
                final=False,
            )
            priority = Priority.EMERGENCY if step % 3 == 0 else Priority.BACKGROUND
            m = await store.commit(target, checkpoint_dir=ckdir, info=info, priority=priority)
            print(f"committed {m.name}", flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
