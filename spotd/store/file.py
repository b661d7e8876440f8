"""The ``file://`` store: the S3 protocol on a local directory (tests, NFS/EFS mounts, drills).

Every file is written under a temporary name, fsynced, renamed, and its directory fsynced. S3's
conditional writes have equivalents here, atomic between processes and threads on the machine (and on an
NFS/EFS mount whose locks work): create-if-absent (``If-None-Match: *``) is an ``os.link`` of the written
temporary, which fails if the name exists; compare-and-swap (``If-Match``) holds an exclusive ``flock`` on a
hidden lock file beside the key while it compares the current content's SHA-256 (the tag) and renames.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from spotd.errors import StoreAccessError, StoreError, UploadError
from spotd.logs import get_logger
from spotd.store.api import Gate, Priority
from spotd.store.base import AlreadyExists, BaseStore, Changed, Tagged
from spotd.store.checksums import CHUNK, Hasher
from spotd.store.localfs import LocalFile, fsync_dir
from spotd.store.tasks import settle_on_cancel

if TYPE_CHECKING:
    from spotd.metrics import Metrics

__all__ = ["TMP_PREFIX", "FileStore"]

log = get_logger("spotd.store")

#: Prefix of half-written files; list_keys skips them and recover() removes them.
TMP_PREFIX: Final = ".spotd-tmp-"
#: Prefix of the lock file a compare-and-swap of a key holds (kept: another writer may be waiting on it).
LOCK_PREFIX: Final = ".spotd-lock-"


class FileStore(BaseStore):
    __slots__ = ("_root",)

    def __init__(
        self,
        *,
        uri: str,
        job_id: str,
        keep: int = 3,
        checksum: str = "auto",
        executor: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
            raise StoreError(
                f"store.uri {uri!r} is not a file:///absolute/path URI; fix: use file:///var/spotd/store"
            )
        super().__init__(
            uri=uri,
            job_id=job_id,
            keep=keep,
            checksum=checksum,
            executor=executor,
            metrics=metrics,
            workers=8,
        )
        self._root = Path(unquote(parts.path))

    def _path(self, key: str) -> Path:
        return self._root / key

    # ---- blocking helpers (run on the executor)

    def _write_atomic(self, key: str, data: bytes, if_absent: bool, if_match: str | None = None) -> None:
        if if_match is not None:
            self._swap(key, data, if_match)
            return
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}-{target.name}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            if if_absent:
                try:
                    os.link(tmp, target)  # fails if target exists: never overwrite a commit
                except FileExistsError:
                    raise AlreadyExists(f"{target} already exists; not overwritten") from None
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)

    def _swap(self, key: str, data: bytes, if_match: str) -> None:
        """Replace ``key`` with ``data`` if its content still has the tag ``if_match``, under its lock."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(target.with_name(f"{LOCK_PREFIX}{target.name}"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read(key)
            if current is None or _tag(current) != if_match:
                raise Changed(f"{target} changed since it was read; not overwritten")
            self._write_atomic(key, data, False)
        finally:
            os.close(lock)  # releases the flock

    def _read_tagged(self, key: str) -> Tagged | None:
        data = self._read(key)
        return None if data is None else Tagged(data=data, tag=_tag(data))

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _walk(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, filenames in os.walk(base):
            for name in filenames:
                if not name.startswith((TMP_PREFIX, LOCK_PREFIX)):
                    out.append(Path(dirpath, name).relative_to(self._root).as_posix())
        return sorted(out)

    def _unlink(self, keys: Sequence[str]) -> None:
        parents = set()
        for key in keys:
            self._path(key).unlink(missing_ok=True)
            parents.add(self._path(key).parent)
        ckpts = self._path(self.checkpoints_prefix)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            # Remove directories left empty, up to (not including) the checkpoints directory.
            p = parent
            while p != ckpts and p.is_relative_to(ckpts):
                try:
                    p.rmdir()
                except OSError:
                    break
                p = p.parent

    def _copy(self, file: LocalFile, key: str, progress: Callable[[int], None] | None) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}-{target.name}")
        try:
            size, checksum = _copy_hashed(file.path, tmp, self.algo, progress)
            if size != file.size:
                raise UploadError(
                    f"{file.rel} changed while uploading ({file.size} → {size} bytes); "
                    "fix: report a checkpoint only after it is fully written"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)
        return checksum

    def _link(self, src: str, key: str, size: int, checksum: str) -> str:
        """``key`` as a hard link of the stored ``src`` (objects are never rewritten in place: a write is a
        new file renamed over the name), or a hashed copy where links do not work; the copy's checksum."""
        source = self._path(src)
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}-{target.name}")
        try:
            try:
                os.link(source, tmp)
                got_size, got = os.stat(tmp).st_size, checksum
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                got_size, got = _copy_hashed(source, tmp, checksum.split(":", 1)[0], None)
            if got_size != size:
                raise StoreError(f"{source} has {got_size} bytes, its manifest says {size}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)
        return got

    # ---- primitives

    async def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        if if_absent and if_match is not None:
            raise ValueError("put_bytes: if_absent and if_match exclude each other")
        try:
            await self.run(self._write_atomic, key, data, if_absent, if_match)
        except OSError as exc:
            raise StoreError(f"writing {self._path(key)} failed: {exc}") from exc

    async def get_bytes(self, key: str) -> bytes | None:
        return await self.run(self._read, key)

    async def get_tagged(self, key: str) -> Tagged | None:
        try:
            return await self.run(self._read_tagged, key)
        except OSError as exc:
            raise StoreError(f"reading {self._path(key)} failed: {exc}") from exc

    async def list_keys(self, prefix: str) -> list[str]:
        return await self.run(self._walk, prefix)

    async def delete_keys(self, keys: Sequence[str]) -> None:
        await self.run(self._unlink, list(keys))

    async def upload_file(
        self,
        file: LocalFile,
        key: str,
        priority: Priority,
        progress: Callable[[int], None] | None,
        gate: Gate | None = None,
        siblings: int = 1,
    ) -> str:
        try:
            async with gate() if gate is not None else contextlib.nullcontext():
                return await self.run(self._copy, file, key, _threadsafe(progress))
        except UploadError:
            raise
        except OSError as exc:
            raise UploadError(f"copying {file.rel} to {self._path(key)} failed: {exc}") from exc

    async def copy_object(
        self, src: str, key: str, *, size: int, checksum: str, priority: Priority
    ) -> str | None:
        try:
            return await self.run(self._link, src, key, size, checksum)
        except OSError as exc:
            raise StoreError(f"linking {self._path(src)} to {self._path(key)} failed: {exc}") from exc

    async def download_file(
        self, key: str, dest: Path, *, size: int, algo: str, progress: Callable[[int], None] | None
    ) -> tuple[int, str] | None:
        # As the S3 store's: a copy cancelled because another file failed stops at its next chunk, and
        # the cancellation waits for it (nothing written after the restore removed its staging directory).
        stop = threading.Event()
        fut = asyncio.get_running_loop().run_in_executor(
            self.executor, _copy_hashed, self._path(key), dest, algo, _threadsafe(progress), stop
        )
        try:
            return await settle_on_cancel(fut, stop)
        except OSError as exc:
            raise StoreError(f"reading {self._path(key)} failed: {exc}") from exc

    # ---- protocol

    async def check_access(self) -> None:
        def probe() -> None:
            self._write_atomic(f"{self.job_id}/.spotd-access-probe", b"ok", False)
            self._path(f"{self.job_id}/.spotd-access-probe").unlink()

        try:
            await self.run(probe)
        except OSError as exc:
            raise StoreAccessError(
                f"cannot write to the store directory {self._root}/{self.job_id}: {exc}; "
                "fix: create it and let the spotd user write to it, or change store.uri"
            ) from exc

    async def recover(self) -> int:
        """Remove temporary files a crash left behind; committed checkpoints are never touched."""

        def sweep() -> int:
            base = self._path(self.job_id)
            count = 0
            if base.is_dir():
                for dirpath, _dirs, filenames in os.walk(base):
                    for name in filenames:
                        if name.startswith(TMP_PREFIX):
                            Path(dirpath, name).unlink(missing_ok=True)
                            count += 1
            return count

        count = await self.run(sweep)
        if count:
            # The same event the s3 store logs for its aborted uploads; boot relies on the store saying it.
            log.info("store.recovered", temp_files=count)
        return count


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _threadsafe(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """Progress callbacks run on the loop thread, whatever thread reports them."""
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def report(n: int) -> None:
        loop.call_soon_threadsafe(progress, n)

    return report


def _copy_hashed(
    src: Path,
    dst: Path,
    algo: str,
    progress: Callable[[int], None] | None,
    stop: threading.Event | None = None,
) -> tuple[int, str]:
    """Copy ``src`` to ``dst``, hashing the bytes on the way (one read pass); ``dst`` is fsynced. A set
    ``stop`` ends the copy at the next chunk (:class:`InterruptedError`).

    Returns the bytes copied and their checksum, for the caller to compare with what it expected.
    """
    hasher = Hasher(algo)
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while n := fin.readinto(buf):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"copying {src} was cancelled")
            hasher.update(view[:n])
            fout.write(view[:n])
            size += n
            if progress is not None:
                progress(n)
        fout.flush()
        os.fsync(fout.fileno())
    return size, hasher.value()
