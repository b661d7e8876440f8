"""Files to and from S3 in parts: parallel multipart uploads and ranged downloads, end-to-end checksums.

Transfers do not use s3transfer. Each file is cut into ``part_size`` parts; every part is read once into
memory, its CRC computed from that buffer (awscrt, ~28 GB/s) and sent with the request, so S3 verifies each
part and no byte is read twice. The whole-file checksum recorded in MANIFEST.json is the *combination* of
the part CRCs (CRC combine, no second pass); multipart uploads are created with ``ChecksumType=FULL_OBJECT``
and completed with that whole-file value, so S3 checks it too. A restore downloads parts with ranged GETs
written at their offsets, hashes each part as it lands and combines them: verification costs no re-read.
A body is received, hashed and written a quarter MiB at a time (:data:`_STREAM_CHUNK`), so each piece is
still in the CPU cache when it is hashed and copied into the page cache; a 16 MiB body read whole went
through main memory three times and cost 1.6x the CPU (kernel copies, mostly) of streaming it.
Without awscrt (or with sha256) there is no combine and the whole-file checksum falls back to a sequential
pass over the file: overlapped with the upload, after the download.

Parts of every file of every commit share one :class:`~spotd.store.transfer_pool.TransferPool`
(``store.concurrency`` slots, capped so at most :data:`BUFFER_CAP` bytes of parts are in memory per
priority, emergency parts ahead of background ones), so a checkpoint of many small files runs its files
concurrently rather than one after another. Blocking boto3 calls run on the pool's threads; the event loop
never blocks.

Retries: botocore retries each request (:mod:`spotd.aws.session`); nothing here sends a request again,
except a GET whose answer broke off while its body was being read, which botocore cannot retry because
the request had already succeeded (``body_read_attempts``, as s3transfer's ``num_download_attempts``).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any, Final, TypeVar

import botocore.exceptions

from spotd.aws.session import error_code, tries_made
from spotd.errors import StoreError, UploadError
from spotd.logs import get_logger
from spotd.store.api import Gate, Priority
from spotd.store.checksums import can_combine, crc_combine, crc_update, encode_crc, hash_file
from spotd.store.localfs import LocalFile, start_writeback
from spotd.store.tasks import gather_or_cancel
from spotd.store.transfer_pool import TransferPool

__all__ = [
    "BUFFER_CAP",
    "S3_ALGORITHM",
    "FileChanged",
    "FileTransfers",
    "Part",
    "combined",
    "parts_of",
    "pread_exact",
    "read_all",
]

log = get_logger("spotd.store")

T = TypeVar("T")

S3_ALGORITHM: Final = {"crc32": "CRC32", "crc32c": "CRC32C", "crc64nvme": "CRC64NVME", "sha256": "SHA256"}
#: Part buffers in memory per priority class; bounds slots when part_size is large.
BUFFER_CAP: Final = 1024 * 1024 * 1024
#: Largest object one CopyObject copies (S3's limit); larger ones are copied in parts (UploadPartCopy).
COPY_LIMIT: Final = 5 * 1024**3
#: Part size of a multipart copy (at most 5 GiB each, 10,000 parts).
COPY_PART: Final = 1024**3
#: Piece of a download body received, hashed and written at a time: small enough to stay in the CPU cache.
_STREAM_CHUNK: Final = 256 * 1024
#: Smallest ranged GET on restore.
_MIN_RANGE: Final = 64 * 1024 * 1024
#: A download has the kernel start writing what it received to disk every this many bytes (see
#: :func:`_drain`): 16 ranges of 64 MiB in parallel each end near the end of the whole download, so a
#: write-back started per range left the disk idle until then.
_WRITEBACK_STEP: Final = 8 * 1024 * 1024
#: Largest file sent whole, in one PutObject, when a commit has files enough to keep every transfer slot busy
#: (``upload(..., whole_max=)``): the parallelism is across its files then, and each multipart upload is two
#: more requests (and, on S3-compatible servers, a concatenation of its parts).
WHOLE_MAX: Final = 64 * 1024 * 1024
_REQUEST_ERRORS: Final = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)
#: What reading a response body raises when the connection breaks off mid-stream.
_BODY_ERRORS: Final = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.IncompleteReadError,
    OSError,
)


class FileChanged(UploadError):
    """The local file is not the size it had when the commit started."""


class _Stopped(Exception):
    """A download thread saw its download cancelled and stopped writing."""


class _BodyBroken(Exception):
    """A GET's response broke off while its body was read (the request itself had succeeded)."""


@dataclass(frozen=True, slots=True)
class _Part:
    number: int  # 1-based, S3's PartNumber
    offset: int
    length: int


def _parts(size: int, part_size: int) -> list[_Part]:
    if size == 0:
        return [_Part(1, 0, 0)]
    return [_Part(i + 1, off, min(part_size, size - off)) for i, off in enumerate(range(0, size, part_size))]


class FileTransfers:
    """One local file up to one key, one key down to one local file, in parts on a :class:`TransferPool`."""

    __slots__ = (
        "_algo",
        "_body_read_attempts",
        "_bucket",
        "_client",
        "_copy_limit",
        "_copy_part",
        "_executor",
        "_part_size",
        "_pool",
        "_request_attempts",
    )

    def __init__(
        self,
        *,
        client: Any,
        bucket: str,
        algo: str,
        part_size: int,
        pool: TransferPool,
        executor: concurrent.futures.Executor,
        request_attempts: int,
        body_read_attempts: int,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._algo = algo
        self._part_size = part_size
        self._pool = pool
        self._executor = executor  # the store's: hashing and file I/O that needs no transfer slot
        self._request_attempts = request_attempts
        self._body_read_attempts = body_read_attempts
        self._copy_limit = COPY_LIMIT
        self._copy_part = COPY_PART

    async def _request(
        self,
        what: str,
        priority: Priority,
        fn: Callable[[], T],
        *,
        nbytes: int = 0,
        stop: threading.Event | None = None,
    ) -> T:
        """One blocking request on a transfer slot (``nbytes``: what it sends, paced when BACKGROUND);
        botocore has retried it by the time it fails here. ``stop``: see :meth:`TransferPool.run`."""
        try:
            return await self._pool.run(priority, fn, nbytes=nbytes, stop=stop)
        except FileChanged:
            raise
        except _REQUEST_ERRORS as exc:
            n = tries_made(exc, self._request_attempts)
            raise UploadError(f"{what} failed after {n} {'try' if n == 1 else 'tries'}: {exc}") from exc

    def _checksum_args(self, data: bytes) -> tuple[int | None, dict[str, str]]:
        """The part's CRC (None for sha256) and the request argument carrying it to S3."""
        name = S3_ALGORITHM[self._algo]
        # The algorithm is named as well as the value: some S3-compatible servers only store a checksum
        # whose algorithm header is set; botocore sends the value given and computes nothing.
        if self._algo == "sha256":
            value = base64.b64encode(hashlib.sha256(data).digest()).decode()
            return None, {"ChecksumAlgorithm": name, f"Checksum{name}": value}
        crc = crc_update(self._algo, data)
        return crc, {
            "ChecksumAlgorithm": name,
            f"Checksum{name}": encode_crc(self._algo, crc).split(":", 1)[1],
        }

    # ---- for spotd.store.stream (parts of a file sent while it is being written)

    @property
    def client(self) -> Any:
        return self._client

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def part_size(self) -> int:
        return self._part_size

    @property
    def pool(self) -> TransferPool:
        return self._pool

    @property
    def executor(self) -> concurrent.futures.Executor:
        return self._executor

    @property
    def request_attempts(self) -> int:
        return self._request_attempts

    async def request(self, what: str, priority: Priority, fn: Callable[[], T], *, nbytes: int = 0) -> T:
        """One blocking request on a transfer slot, its failure an :class:`UploadError` naming ``what``."""
        return await self._request(what, priority, fn, nbytes=nbytes)

    def checksum_args(self, data: bytes) -> tuple[int | None, dict[str, str]]:
        """The CRC of ``data`` and the request arguments carrying it (see :meth:`_checksum_args`)."""
        return self._checksum_args(data)

    def upload_part(
        self, full: str, upload_id: str, part: _Part, data: bytes
    ) -> tuple[int | None, dict[str, Any]]:
        """Send ``data`` as part ``part`` of the multipart upload ``upload_id`` of ``full`` (blocking, on a
        transfer thread); its CRC and its entry of CompleteMultipartUpload's part list."""
        crc, arg = self._checksum_args(data)
        resp = self._client.upload_part(
            Bucket=self._bucket,
            Key=full,
            UploadId=upload_id,
            PartNumber=part.number,
            Body=data,
            **arg,
        )
        arg.pop("ChecksumAlgorithm")
        return crc, {"PartNumber": part.number, "ETag": resp["ETag"], **arg}

    def abort_later(self, full: str, upload_id: str) -> None:
        """Abort the multipart upload ``upload_id`` of ``full`` on a pool thread, not waiting for it."""
        self._pool.detach(self._abort_quietly, full, upload_id)

    # ---- upload

    async def upload(
        self,
        file: LocalFile,
        full: str,
        priority: Priority,
        progress: Callable[[int], None] | None,
        gate: Gate | None = None,
        whole_max: int = 0,
    ) -> str:
        """Upload ``file`` to the key ``full`` (bucket-relative); returns its checksum. ``gate`` is entered
        around each request that carries its bytes (see ``BaseStore.upload_file``); a file of at most
        ``whole_max`` bytes goes in one request, a larger one in ``part_size`` parts."""
        what = f"upload {file.rel} to s3://{self._bucket}/{full}"
        loop = asyncio.get_running_loop()
        hashing: asyncio.Future[tuple[int, str]] | None = None
        if not can_combine(self._algo):
            # No CRC combine for this algorithm: a sequential pass, overlapped with the upload.
            hashing = loop.run_in_executor(self._executor, hash_file, file.path, self._algo)
            hashing.add_done_callback(lambda f: f.cancelled() or f.exception())
        parts = _parts(file.size, self._part_size if file.size > whole_max else max(file.size, 1))
        try:
            if len(parts) == 1:
                crcs = [await self._put_single(file, full, parts[0], priority, what, gate)]
            else:
                crcs = await self._put_multipart(file, full, parts, priority, what, progress, gate)
            stat = await loop.run_in_executor(self._executor, os.stat, file.path)
            if stat.st_size != file.size:
                raise FileChanged(
                    f"{file.rel} changed size while uploading; "
                    "fix: report a checkpoint only after it is fully written"
                )
            if hashing is not None:
                size, checksum = await hashing
                if size != file.size:
                    raise FileChanged(f"{file.rel} changed while uploading ({file.size} → {size} bytes)")
                return checksum
        except UploadError:
            raise
        except OSError as exc:
            raise UploadError(f"reading {file.path} failed: {exc}") from exc
        finally:
            if hashing is not None and not hashing.done():
                hashing.cancel()
        if len(parts) == 1 and progress is not None:
            progress(file.size)
        return encode_crc(self._algo, _combined(self._algo, crcs, parts))

    def read_part(self, file: LocalFile, part: _Part) -> bytes:
        """``part`` of ``file`` as it is on disk now (blocking); :class:`FileChanged` if it is shorter."""
        fd = os.open(file.path, os.O_RDONLY)
        try:
            data = _pread_exact(fd, part.length, part.offset)
        finally:
            os.close(fd)
        if len(data) != part.length:
            raise FileChanged(
                f"{file.rel} shrank while uploading (part {part.number} short by {part.length - len(data)} "
                "bytes); fix: report a checkpoint only after it is fully written"
            )
        return data

    async def _put_single(
        self, file: LocalFile, full: str, part: _Part, priority: Priority, what: str, gate: Gate | None
    ) -> int | None:
        def put() -> int | None:
            data = self.read_part(file, part)
            crc, arg = self._checksum_args(data)
            self._client.put_object(Bucket=self._bucket, Key=full, Body=data, **arg)
            return crc

        async with gate() if gate is not None else contextlib.nullcontext():
            return await self._request(what, priority, put, nbytes=part.length)

    async def _put_multipart(
        self,
        file: LocalFile,
        full: str,
        parts: Sequence[_Part],
        priority: Priority,
        what: str,
        progress: Callable[[int], None] | None,
        gate: Gate | None,
    ) -> list[int | None]:
        algorithm = S3_ALGORITHM[self._algo]
        # FULL_OBJECT makes S3 check the whole file's CRC on completion (it combines the parts' CRCs too).
        full_object = can_combine(self._algo)
        extra: dict[str, str] = {"ChecksumType": "FULL_OBJECT"} if full_object else {}
        created = await self._request(
            what,
            priority,
            lambda: self._client.create_multipart_upload(
                Bucket=self._bucket, Key=full, ChecksumAlgorithm=algorithm, **extra
            ),
        )
        upload_id: str = created["UploadId"]

        async def send(part: _Part) -> tuple[int | None, dict[str, Any]]:
            def put() -> tuple[int | None, dict[str, Any]]:
                return self.upload_part(full, upload_id, part, self.read_part(file, part))

            async with gate() if gate is not None else contextlib.nullcontext():
                out = await self._request(
                    f"{what} (part {part.number}/{len(parts)})", priority, put, nbytes=part.length
                )
            if progress is not None:
                progress(part.length)
            return out

        try:
            sent = await gather_or_cancel([send(p) for p in parts])
            crcs = [c for c, _ in sent]
            if full_object:
                extra[f"Checksum{algorithm}"] = encode_crc(
                    self._algo, _combined(self._algo, crcs, parts)
                ).split(":", 1)[1]

            def complete() -> None:
                try:
                    self._client.complete_multipart_upload(
                        Bucket=self._bucket,
                        Key=full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": [entry for _, entry in sent]},
                        **extra,
                    )
                except botocore.exceptions.ClientError as exc:
                    # A completion botocore retried after its first try had reached S3 finds the upload
                    # gone: the object is there if that first try completed it.
                    if error_code(exc) != "NoSuchUpload" or tries_made(exc, self._request_attempts) == 1:
                        raise
                    head = self._client.head_object(Bucket=self._bucket, Key=full)
                    if head.get("ContentLength") != file.size:
                        raise

            await self._request(what, priority, complete)
        except BaseException:
            # Fire and forget: a part still in flight on a thread may land after this; recover() at the next
            # start sweeps whatever remains.
            self._pool.detach(self._abort_quietly, full, upload_id)
            raise
        return crcs

    def _abort_quietly(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=full, UploadId=upload_id)
        except _REQUEST_ERRORS as exc:
            log.debug("store.abort_failed", key=full, error=str(exc))

    # ---- server-side copy

    async def copy(self, src: str, full: str, *, size: int, priority: Priority) -> str | None:
        """Copy the object ``src`` to ``full`` (both bucket-relative) inside S3, nothing sent but the
        request; returns the checksum S3 reports for the copy (``<algo>:<base64>``), or None if it reports
        none. CopyObject up to :data:`COPY_LIMIT`, a multipart copy (UploadPartCopy) above it."""
        what = f"copy s3://{self._bucket}/{src} to s3://{self._bucket}/{full}"
        name = S3_ALGORITHM[self._algo]
        source = {"Bucket": self._bucket, "Key": src}
        if size <= self._copy_limit:
            resp = await self._request(
                what,
                priority,
                lambda: self._client.copy_object(
                    Bucket=self._bucket, Key=full, CopySource=source, ChecksumAlgorithm=name
                ),
            )
            value = resp.get("CopyObjectResult", {}).get(f"Checksum{name}")
            if value:
                return f"{self._algo}:{value}"
            return await self._stored_checksum(full, priority, what)
        parts = _parts(size, max(self._copy_part, -(-size // 10_000)))
        extra: dict[str, str] = {"ChecksumType": "FULL_OBJECT"} if can_combine(self._algo) else {}
        created = await self._request(
            what,
            priority,
            lambda: self._client.create_multipart_upload(
                Bucket=self._bucket, Key=full, ChecksumAlgorithm=name, **extra
            ),
        )
        upload_id: str = created["UploadId"]

        async def copy_part(part: _Part) -> dict[str, Any]:
            def call() -> dict[str, Any]:
                resp = self._client.upload_part_copy(
                    Bucket=self._bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=part.number,
                    CopySource=source,
                    CopySourceRange=f"bytes={part.offset}-{part.offset + part.length - 1}",
                )
                result = resp["CopyPartResult"]
                entry = {"PartNumber": part.number, "ETag": result["ETag"]}
                if result.get(f"Checksum{name}"):
                    entry[f"Checksum{name}"] = result[f"Checksum{name}"]
                return entry

            return await self._request(f"{what} (part {part.number}/{len(parts)})", priority, call)

        try:
            entries = await gather_or_cancel([copy_part(p) for p in parts])
            await self._request(
                what,
                priority,
                lambda: self._client.complete_multipart_upload(
                    Bucket=self._bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": entries}
                ),
            )
        except BaseException:
            self._pool.detach(self._abort_quietly, full, upload_id)
            raise
        return await self._stored_checksum(full, priority, what)

    async def _stored_checksum(self, full: str, priority: Priority, what: str) -> str | None:
        """The whole-object checksum S3 keeps for ``full`` (a composite one, ``…-<parts>``, is not a file's
        checksum: None)."""
        name = S3_ALGORITHM[self._algo]
        head = await self._request(
            what,
            priority,
            lambda: self._client.head_object(Bucket=self._bucket, Key=full, ChecksumMode="ENABLED"),
        )
        value = head.get(f"Checksum{name}")
        if not value or "-" in str(value)[-6:]:
            return None
        return f"{self._algo}:{value}"

    # ---- download

    async def download(
        self, full: str, dest: Path, *, size: int, algo: str, progress: Callable[[int], None] | None
    ) -> tuple[int, str] | None:
        """Ranged GETs in parallel, each written at its offset and hashed as it lands; the part CRCs are
        combined into the file's (no re-read). Each range's write-back to disk starts as soon as it is
        written; the fsync is the restore's (see :mod:`spotd.store.restore`). Restores run as EMERGENCY:
        nothing is more urgent at boot."""
        what = f"download s3://{self._bucket}/{full}"
        # Ranged GETs are fewer and larger than upload parts: per-request cost dominates small ranges, and
        # some S3-compatible servers (moto) read the whole object for every range.
        parts = _parts(size, max(self._part_size, _MIN_RANGE))
        hash_here = can_combine(algo)
        loop = asyncio.get_running_loop()
        # Set when this download is cancelled (another file of the restore failed): its threads stop
        # writing at the next piece, and the cancellation waits for them, so none writes after the
        # restore removed its staging directory.
        stop = threading.Event()

        def fetch_whole() -> int | None:
            # One object, one thread: GET, write and close without a hop back to the loop between (a
            # checkpoint of many small files is dominated by per-file overhead). No fsync here: it would
            # hold the transfer slot while the disk writes; the restore fsyncs every file in one pass.
            resp = self._client.get_object(Bucket=self._bucket, Key=full)
            if stop.is_set():
                resp["Body"].close()
                raise _Stopped
            fd = _open_for_write(dest, size)
            try:
                got, crc = _drain(resp, fd, 0, algo if hash_here else None, stop)
                _check_size(what, resp.get("ContentLength"), size, got, size)
            finally:
                os.close(fd)
            return crc

        async def fetch(fd: int, part: _Part) -> int | None:
            def get() -> int | None:
                end = part.offset + part.length - 1
                resp = self._client.get_object(
                    Bucket=self._bucket, Key=full, Range=f"bytes={part.offset}-{end}"
                )
                total = int(str(resp.get("ContentRange", "/-1")).rsplit("/", 1)[1])
                if total != size:
                    resp["Body"].close()
                    _check_size(what, total, size, 0, part.length)
                got, crc = _drain(resp, fd, part.offset, algo if hash_here else None, stop)
                _check_size(what, total, size, got, part.length)
                return crc

            crc = await self._get(f"{what} (part {part.number}/{len(parts)})", get, stop)
            if progress is not None:
                progress(part.length)
            return crc

        try:
            if len(parts) == 1:
                crcs = [await self._get(what, fetch_whole, stop)]
                if progress is not None:
                    progress(size)
            else:
                fd = await loop.run_in_executor(self._executor, _open_for_write, dest, size)
                try:
                    crcs = await gather_or_cancel([fetch(fd, p) for p in parts])
                finally:
                    await loop.run_in_executor(self._executor, os.close, fd)
        except UploadError as exc:  # _request speaks of uploads' errors; the message names the download
            raise StoreError(str(exc)) from exc
        except OSError as exc:
            raise StoreError(f"{what}: writing {dest} failed: {exc}") from exc
        if not hash_here:
            return None
        return size, encode_crc(algo, _combined(algo, crcs, parts))

    async def _get(self, what: str, fn: Callable[[], T], stop: threading.Event) -> T:
        """A GET request whose response body is read whole; the one retry made here: the body broke off
        (botocore has returned by then, so no retry of its own covers it)."""
        attempt = 1
        while True:
            try:
                return await self._request(what, Priority.EMERGENCY, fn, stop=stop)
            except _BodyBroken as exc:
                if attempt >= self._body_read_attempts:
                    raise StoreError(f"{what}: the answer broke off {attempt} times, last: {exc}") from exc
                log.warning("store.download_retry", what=what, attempt=attempt, error=str(exc))
                attempt += 1


def read_all(resp: dict[str, Any]) -> bytes:
    """The whole body of a GetObject answer, then closed. Read through botocore's StreamingBody, not the
    raw stream ``with body as raw`` gives: that one raises urllib3's own errors and checks no length."""
    body = resp["Body"]
    try:
        data: bytes = body.read()
    finally:
        body.close()
    return data


def _drain(
    resp: dict[str, Any], fd: int, offset: int, algo: str | None, stop: threading.Event
) -> tuple[int, int | None]:
    """Write a GetObject answer's body to ``fd`` at ``offset`` and CRC it (``algo``, None: no CRC) in
    :data:`_STREAM_CHUNK` pieces; returns (bytes written, CRC). Each piece is received, hashed and written
    while it is in the CPU cache: a body read whole is copied through main memory three times. Every
    :data:`_WRITEBACK_STEP` bytes, and at the end, the kernel is asked to start writing them to disk
    (:func:`~spotd.store.localfs.start_writeback`): the disk works while the network does, and the
    restore's fsync finds less left. Where the disk is slower than the network it is the time either way
    (this VM: 1 GiB from s3rver in 4.3 s instead of 4.6, medians of 5; 2.9 s instead of 3.9 in a run
    where the disk kept up)."""
    body = resp["Body"]
    crc = 0
    got = 0
    flushed = 0  # bytes of this body whose write-back has been started
    try:
        while True:
            try:
                chunk = body.read(_STREAM_CHUNK)
            except _BODY_ERRORS as exc:
                raise _BodyBroken(str(exc)) from exc
            if not chunk:
                break
            if stop.is_set():
                raise _Stopped
            if algo is not None:
                crc = crc_update(algo, chunk, crc)
            _pwrite_all(fd, chunk, offset + got)
            got += len(chunk)
            if got - flushed >= _WRITEBACK_STEP:
                start_writeback(fd, offset + flushed, got - flushed)
                flushed = got
    finally:
        body.close()
    if got > flushed:
        start_writeback(fd, offset + flushed, got - flushed)
    return got, (crc if algo is not None else None)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    got = 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _open_for_write(dest: Path, size: int) -> int:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)  # parts land at their offsets, in any order
    except OSError:
        os.close(fd)
        raise
    return fd


def _check_size(what: str, total: object, size: int, got: int, want: int) -> None:
    if total != size or got != want:
        raise StoreError(
            f"{what}: the object has {total} bytes (read {got} of {want}), the manifest says {size}; "
            "the stored object is damaged"
        )


#: Public names of the part helpers, for :mod:`spotd.store.stream`.
Part = _Part


def parts_of(size: int, part_size: int) -> list[_Part]:
    """``size`` bytes cut into ``part_size`` parts (one empty part for an empty file)."""
    return _parts(size, part_size)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    return _pread_exact(fd, length, offset)


def combined(algo: str, crcs: Sequence[int | None], parts: Sequence[_Part]) -> int:
    """The whole file's CRC from its parts' (in order)."""
    return _combined(algo, crcs, parts)


def _combined(algo: str, crcs: Sequence[int | None], parts: Sequence[_Part]) -> int:
    """The whole file's CRC from its parts' (in order)."""
    values = [c for c in crcs if c is not None]
    if len(values) != len(parts):
        raise AssertionError("every part has a CRC when combining")
    return reduce(
        lambda acc, item: crc_combine(algo, acc, item[0], item[1].length),
        zip(values[1:], parts[1:], strict=True),
        values[0],
    )
