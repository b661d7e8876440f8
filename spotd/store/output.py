"""The job's output directory (``[output] dir``, SageMaker's ``/opt/ml/model``), uploaded once when the job
completes::

    <job_id>/output/<files…>
    <job_id>/output/MANIFEST.json    written last: files, sizes, checksums, time, instance

Over the store's public primitives (``upload_file``, ``put_bytes``), like the ledger.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from spotd.errors import UploadError
from spotd.events import format_time
from spotd.logs import get_logger
from spotd.store.api import Priority
from spotd.store.base import BaseStore
from spotd.store.localfs import collect_files
from spotd.store.manifest import MANIFEST
from spotd.store.tasks import gather_or_cancel

__all__ = ["upload_output"]

log = get_logger("spotd.store")


async def upload_output(store: BaseStore, source: Path, *, instance_id: str) -> str | None:
    """Upload every file under ``source``, then its MANIFEST.json; returns the output's URL, or None when
    ``source`` holds no files. Raises StoreError (UploadError) when an upload fails."""
    try:
        files = await store.run(collect_files, source, source)
    except UploadError as exc:
        if not await store.run(source.is_dir) or "holds no files" in str(exc):
            log.warning("output.empty", dir=str(source), note="nothing uploaded")
            return None
        raise
    base = f"{store.job_id}/output/"
    checksums = await gather_or_cancel(
        [store.upload_file(f, base + f.rel, Priority.BACKGROUND, None) for f in files]
    )
    manifest = {
        "created_at": format_time(datetime.now(UTC)),
        "instance_id": instance_id,
        "files": [
            {"path": f.rel, "size": f.size, "checksum": c} for f, c in zip(files, checksums, strict=True)
        ],
        "total_bytes": sum(f.size for f in files),
    }
    await store.put_bytes(base + MANIFEST, json.dumps(manifest, indent=1).encode())
    url = store.url(base)
    log.info("output.uploaded", url=url, files=len(files), bytes=manifest["total_bytes"])
    return url
