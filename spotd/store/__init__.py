"""The checkpoint store: upload with an atomic commit, list, restore verified, retention.

The names below are the store's surface for the daemon, the CLI and tests; :func:`open_store` picks the
backend for a URI. Inside the package, by job:

- :mod:`~spotd.store.manifest`: what a checkpoint is (FileEntry, CommitInfo, Manifest) and MANIFEST.json
- :mod:`~spotd.store.checksums`: CRC32/CRC32C/CRC64NVME/SHA-256 as S3 encodes them
- :mod:`~spotd.store.localfs`: the checkpoint's local files, path safety, moving a restore into place
- :mod:`~spotd.store.marker`: which committed checkpoint the local disk already holds
- :mod:`~spotd.store.selection`: names, restore candidates per rank, retention, the global manifest of a
  multi-node checkpoint's parts (pure functions)
- :mod:`~spotd.store.api`: the store as its users see it (CheckpointStore, Priority, RestoreResult,
  PartResult)
- :mod:`~spotd.store.base`: the backend contract, :class:`~spotd.store.base.BaseStore`
- :mod:`~spotd.store.file` (``file://``) and :mod:`~spotd.store.s3` (``s3://``, its files moved in parts by
  :mod:`~spotd.store.s3_transfer` on a :mod:`~spotd.store.transfer_pool`): the backends
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

from spotd.errors import StoreError
from spotd.store.api import (
    CheckpointStore,
    DirStream,
    FileStream,
    PartResult,
    PartState,
    Priority,
    RestoreResult,
)
from spotd.store.dirstream import watchable
from spotd.store.localfs import resolve_inside
from spotd.store.manifest import CommitInfo, FileEntry, Manifest
from spotd.store.selection import run_checkpoint_name

if TYPE_CHECKING:
    from spotd.config import Config
    from spotd.metrics import Metrics

__all__ = [
    "CheckpointStore",
    "CommitInfo",
    "DirStream",
    "FileEntry",
    "FileStream",
    "Manifest",
    "PartResult",
    "PartState",
    "Priority",
    "RestoreResult",
    "open_store",
    "resolve_inside",
    "run_checkpoint_name",
    "watchable",
]


def open_store(
    cfg: Config, *, executor: concurrent.futures.Executor | None = None, metrics: Metrics | None = None
) -> CheckpointStore:
    """The store named by ``cfg.store.uri`` (``s3://bucket/prefix`` or ``file:///path``)."""
    uri = cfg.store.uri
    # Each backend is imported only when picked: the s3 one loads boto3, which a file:// daemon never needs.
    if uri.startswith("file://"):
        from spotd.store.file import FileStore

        return FileStore(
            uri=uri,
            job_id=cfg.job_id,
            keep=cfg.store.keep,
            checksum=cfg.store.checksum,
            executor=executor,
            metrics=metrics,
        )
    if uri.startswith("s3://"):
        from spotd.store.s3 import S3Store

        return S3Store.from_config(cfg, executor=executor, metrics=metrics)
    raise StoreError(
        f'store.uri {uri!r} is neither s3:// nor file://; fix: set store.uri = "s3://bucket/prefix"'
    )
