"""Multi-node crash driver: one node's commit_part in its own process, to be SIGKILLed mid-upload.

Usage: python -m tests.store.part_driver JSON (uri, endpoint_url, job_id, checkpoint_dir, source, name,
node_rank, nodes, ranks, world_size, step). Prints "uploading" at the first progress report, then holds
its event loop so the part (written from the loop after every file) cannot land before the kill.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from spotd.config import Config
from spotd.store import CommitInfo, Priority, open_store


async def main(args: dict[str, Any]) -> None:
    cfg = Config().replace(
        **{
            "job_id": args["job_id"],
            "store.uri": args["uri"],
            "store.endpoint_url": args["endpoint_url"],
            "store.part_size": 5 * 1024 * 1024,
            "store.concurrency": 2,
        }
    )
    store = open_store(cfg)
    said = False

    def progress(_: int) -> None:
        nonlocal said
        if not said:
            said = True
            print("uploading", flush=True)
            time.sleep(60)  # the test kills this process now; nothing may run on the loop meanwhile

    info = CommitInfo(
        job_id=args["job_id"],
        step=args["step"],
        trainer="train",
        rank=None,
        world_size=args["world_size"],
        request_id="spot-1",
        reason="spot",
        instance_id="i-dying",
        final=True,
    )
    try:
        await store.commit_part(
            [Path(args["source"])],
            checkpoint_dir=Path(args["checkpoint_dir"]),
            name=args["name"],
            node_rank=args["node_rank"],
            nodes=args["nodes"],
            ranks=args["ranks"],
            info=info,
            priority=Priority.EMERGENCY,
            progress=progress,
        )
        print("committed", flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
