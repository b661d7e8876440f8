"""The ``s3://`` store: parallel multipart uploads and ranged downloads on boto3, end-to-end checksums,
priorities, retries.

Transfers do not use s3transfer. Each file is cut into ``part_size`` parts; every part is read once into
memory, its CRC computed from that buffer (awscrt, ~28 GB/s) and sent with the request, so S3 verifies each
part and no byte is read twice. The whole-file checksum recorded in MANIFEST.json is the *combination* of
the part CRCs (CRC combine, no second pass); multipart uploads are created with ``ChecksumType=FULL_OBJECT``
and completed with that whole-file value, so S3 checks it too. A restore downloads parts with ranged GETs
written at their offsets, hashes each part as it lands and combines them: verification costs no re-read.
Without awscrt (or with sha256) there is no combine and the whole-file checksum falls back to a sequential
pass over the file: overlapped with the upload, after the download.

Parts of every file of every commit share one bounded pool of slots (``store.concurrency``, capped so at
most ``_BUFFER_CAP`` bytes of parts are in memory per priority), so a checkpoint of many small files runs
its files concurrently rather than one after another. Blocking boto3 calls run on the store's own transfer
threads; the event loop never blocks.

Priorities: while an EMERGENCY commit runs, BACKGROUND parts are not started (parts already in flight
finish, at most one part's time); the background upload resumes with its next part afterwards, nothing is
sent twice. Emergency parts have their own slots, so they never wait behind background parts.

This deliberately is not the CRT transfer client (``awscrt.s3``) that boto3 picks on some instance types
when awscrt is installed: spotd builds its own boto3 client, and this module needs per-part control
for priorities, checksum combining and the fault tests.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from spotd.errors import StoreAccessError, StoreError, UploadError
from spotd.logs import get_logger
from spotd.store import (
    Priority,
    _BaseStore,
    _Exists,
    _gather_or_cancel,
    _LocalFile,
    can_combine,
    crc_combine,
    crc_update,
    encode_crc,
    hash_file,
)

if TYPE_CHECKING:
    from spotd.config import Config
    from spotd.metrics import Metrics

__all__ = ["S3Store"]

log = get_logger("spotd.store")

#: Errors no retry can fix: report them at once with the fix.
_FATAL_CODES: Final = frozenset(
    {
        "AccessDenied",
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "NoSuchKey",
        "InvalidRange",
    }
)
_S3_ALGORITHM: Final = {"crc32": "CRC32", "crc32c": "CRC32C", "crc64nvme": "CRC64NVME", "sha256": "SHA256"}
#: Smallest ranged GET on restore.
_MIN_RANGE: Final = 64 * 1024 * 1024
#: Part buffers in memory per priority class; bounds slots when part_size is large.
_BUFFER_CAP: Final = 1024 * 1024 * 1024


def _code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class _Gate:
    """Transfer slots with priorities: emergency parts use their own ``limit`` slots; background parts share
    what is left and start none while an emergency runs. Single-threaded (event loop only)."""

    __slots__ = ("_bg", "_em", "_limit", "_waiters", "emergencies", "pauses")

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._em = 0
        self._bg = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.emergencies = 0
        self.pauses = 0  # background parts held back by an emergency (tests, status)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def acquire(self, priority: Priority) -> None:
        if priority is Priority.EMERGENCY:
            while self._em >= self._limit:
                await self._wait()
            self._em += 1
            return
        paused = False
        while self.emergencies or self._em + self._bg >= self._limit:
            if self.emergencies and not paused:
                paused = True
                self.pauses += 1
            await self._wait()
        self._bg += 1

    def release(self, priority: Priority) -> None:
        if priority is Priority.EMERGENCY:
            self._em -= 1
        else:
            self._bg -= 1
        self._notify()

    def emergency(self, delta: int) -> None:
        self.emergencies += delta
        self._notify()


@dataclass(frozen=True, slots=True)
class _Part:
    number: int  # 1-based, S3's PartNumber
    offset: int
    length: int


def _parts(size: int, part_size: int) -> list[_Part]:
    if size == 0:
        return [_Part(1, 0, 0)]
    return [_Part(i + 1, off, min(part_size, size - off)) for i, off in enumerate(range(0, size, part_size))]


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


class _Changed(UploadError):
    """The local file is not the size it had when the commit started."""


class S3Store(_BaseStore):
    __slots__ = (
        "_bucket",
        "_client",
        "_commit_attempts",
        "_gate",
        "_key_prefix",
        "_part_size",
        "_retry_base_s",
        "_transfers",
    )

    def __init__(
        self,
        *,
        uri: str,
        job_id: str,
        keep: int = 3,
        checksum: str = "auto",
        endpoint_url: str = "",
        region: str = "",
        part_size: int = 16 * 1024 * 1024,
        concurrency: int = 16,
        executor: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
        max_attempts: int = 6,
        commit_attempts: int = 3,
        retry_base_s: float = 0.5,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(
                f'store.uri {uri!r} is not s3://bucket/prefix; fix: set store.uri = "s3://bucket/prefix"'
            )
        super().__init__(
            uri=uri,
            job_id=job_id,
            keep=keep,
            checksum=checksum,
            executor=executor,
            metrics=metrics,
            workers=16,
        )
        self._bucket = parts.netloc
        prefix = parts.path.strip("/")
        self._key_prefix = f"{prefix}/" if prefix else ""
        self._part_size = part_size
        limit = max(1, min(concurrency, _BUFFER_CAP // part_size))
        self._gate = _Gate(limit=limit)
        # Both priority classes can be in flight at once (an emergency does not wait for background parts).
        self._transfers = concurrent.futures.ThreadPoolExecutor(
            max_workers=2 * limit, thread_name_prefix="spotd-s3"
        )
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=2 * limit + 8,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            s3={"addressing_style": "path"} if endpoint_url else None,
            user_agent_extra="spotd",
            # spotd computes and verifies every checksum itself (from the one buffer it reads); botocore's
            # defaults would hash each body a second time.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
        )
        self._commit_attempts = commit_attempts
        self._retry_base_s = retry_base_s

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        executor: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
    ) -> S3Store:
        s = cfg.store
        # The AWS SDKs' own knob for request retries; botocore ignores it once a Config names max_attempts.
        attempts = os.environ.get("AWS_MAX_ATTEMPTS", "")
        return cls(
            uri=s.uri,
            job_id=cfg.job_id,
            keep=s.keep,
            checksum=s.checksum,
            endpoint_url=s.endpoint_url,
            region=s.region,
            part_size=s.part_size,
            concurrency=s.concurrency,
            executor=executor,
            metrics=metrics,
            max_attempts=int(attempts) if attempts.isdigit() and int(attempts) > 0 else 6,
        )

    def _full(self, key: str) -> str:
        return self._key_prefix + key

    @property
    def pauses(self) -> int:
        """Background parts held back by an emergency so far."""
        return self._gate.pauses

    # ---- priorities

    def _preempt_begin(self) -> None:
        if self._gate.emergencies == 0 and self._gate._bg:
            log.info("store.background_paused", parts_in_flight=self._gate._bg)
        self._gate.emergency(+1)

    def _preempt_end(self) -> None:
        self._gate.emergency(-1)

    # ---- primitives

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return await self._run(lambda: fn(**kwargs))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "PreconditionFailed":
                raise _Exists(kwargs.get("Key", "")) from None
            raise StoreError(
                f"{what} s3://{self._bucket}/{kwargs.get('Key', kwargs.get('Prefix', ''))} failed: {exc}"
            ) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreError(
                f"{what} s3://{self._bucket}/{kwargs.get('Key', kwargs.get('Prefix', ''))} failed "
                f"after retries: {exc}"
            ) from exc

    async def _put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        await self._call(
            "put",
            self._client.put_object,
            Bucket=self._bucket,
            Key=self._full(key),
            Body=data,
            ChecksumAlgorithm=_S3_ALGORITHM[self._algo],
            **extra,
        )

    async def _get(self, key: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                resp = self._client.get_object(Bucket=self._bucket, Key=self._full(key))
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            with resp["Body"] as body:
                data: bytes = body.read()
            return data

        try:
            return await self._run(get)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise StoreError(f"get s3://{self._bucket}/{self._full(key)} failed: {exc}") from exc

    async def _list(self, prefix: str) -> list[str]:
        def walk() -> list[str]:
            out: list[str] = []
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._full(prefix)
            ):
                out += [obj["Key"][len(self._key_prefix) :] for obj in page.get("Contents", [])]
            return out

        try:
            return await self._run(walk)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise StoreError(f"list s3://{self._bucket}/{self._full(prefix)} failed: {exc}") from exc

    async def _delete(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[i : i + 1000]]
            await self._call(
                "delete",
                self._client.delete_objects,
                Bucket=self._bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    # ---- transfers

    async def _attempts(self, what: str, priority: Priority, fn: Callable[[], Any]) -> Any:
        """Run one blocking request on a transfer slot, with retries on top of botocore's own (a part is
        re-read and re-sent whole); the slot is released while backing off."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            await self._gate.acquire(priority)
            try:
                return await loop.run_in_executor(self._transfers, fn)
            except _Changed:
                raise
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
                attempt += 1
                if _code(exc) in _FATAL_CODES or attempt >= self._commit_attempts:
                    raise UploadError(f"{what} failed after {attempt} tries: {exc}") from exc
                delay = self._retry_base_s * 2 ** (attempt - 1) * (0.5 + random.random())
                log.warning(
                    "store.transfer_retry",
                    what=what,
                    attempt=attempt,
                    delay_s=round(delay, 2),
                    error=str(exc),
                )
            finally:
                self._gate.release(priority)
            await asyncio.sleep(delay)

    def _checksum_args(self, data: bytes) -> tuple[int | None, dict[str, str]]:
        """The part's CRC (None for sha256) and the request argument carrying it to S3."""
        name = _S3_ALGORITHM[self._algo]
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

    def _read(self, file: _LocalFile, part: _Part) -> bytes:
        fd = os.open(file.path, os.O_RDONLY)
        try:
            data = _pread_exact(fd, part.length, part.offset)
        finally:
            os.close(fd)
        if len(data) != part.length:
            raise _Changed(
                f"{file.rel} shrank while uploading (part {part.number} short by {part.length - len(data)} "
                "bytes); fix: report a checkpoint only after it is fully written"
            )
        return data

    async def _upload(
        self, file: _LocalFile, key: str, priority: Priority, progress: Callable[[int], None] | None
    ) -> str:
        full = self._full(key)
        what = f"upload {file.rel} to s3://{self._bucket}/{full}"
        combine = can_combine(self._algo)
        hashing: asyncio.Future[tuple[int, str]] | None = None
        if not combine:
            # No CRC combine for this algorithm: a sequential pass, overlapped with the upload.
            hashing = asyncio.get_running_loop().run_in_executor(
                self._executor, hash_file, file.path, self._algo
            )
            hashing.add_done_callback(lambda f: f.cancelled() or f.exception())
        parts = _parts(file.size, self._part_size)
        try:
            if len(parts) == 1:
                crcs = [await self._put_single(file, full, parts[0], priority, what)]
            else:
                crcs = await self._put_multipart(file, full, parts, priority, what, progress)
            stat = await asyncio.get_running_loop().run_in_executor(self._executor, os.stat, file.path)
            if stat.st_size != file.size:
                raise _Changed(
                    f"{file.rel} changed size while uploading; "
                    "fix: report a checkpoint only after it is fully written"
                )
            if hashing is not None:
                size, checksum = await hashing
                if size != file.size:
                    raise _Changed(f"{file.rel} changed while uploading ({file.size} → {size} bytes)")
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

    async def _put_single(
        self, file: _LocalFile, full: str, part: _Part, priority: Priority, what: str
    ) -> int | None:
        def put() -> int | None:
            data = self._read(file, part)
            crc, arg = self._checksum_args(data)
            self._client.put_object(Bucket=self._bucket, Key=full, Body=data, **arg)
            return crc

        result: int | None = await self._attempts(what, priority, put)
        return result

    async def _put_multipart(
        self,
        file: _LocalFile,
        full: str,
        parts: Sequence[_Part],
        priority: Priority,
        what: str,
        progress: Callable[[int], None] | None,
    ) -> list[int | None]:
        algorithm = _S3_ALGORITHM[self._algo]
        # FULL_OBJECT makes S3 check the whole file's CRC on completion (it combines the parts' CRCs too).
        full_object = can_combine(self._algo)
        extra: dict[str, str] = {"ChecksumType": "FULL_OBJECT"} if full_object else {}
        created = await self._attempts(
            what,
            priority,
            lambda: self._client.create_multipart_upload(
                Bucket=self._bucket, Key=full, ChecksumAlgorithm=algorithm, **extra
            ),
        )
        upload_id: str = created["UploadId"]

        async def send(part: _Part) -> tuple[int | None, dict[str, Any]]:
            def put() -> tuple[int | None, dict[str, Any]]:
                data = self._read(file, part)
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

            out: tuple[int | None, dict[str, Any]] = await self._attempts(
                f"{what} (part {part.number}/{len(parts)})", priority, put
            )
            if progress is not None:
                progress(part.length)
            return out

        try:
            sent = await _gather_or_cancel([send(p) for p in parts])
            crcs = [c for c, _ in sent]
            if full_object:
                extra[f"Checksum{algorithm}"] = encode_crc(
                    self._algo, _combined(self._algo, crcs, parts)
                ).split(":", 1)[1]
            tries = 0

            def complete() -> None:
                nonlocal tries
                tries += 1
                try:
                    self._client.complete_multipart_upload(
                        Bucket=self._bucket,
                        Key=full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": [entry for _, entry in sent]},
                        **extra,
                    )
                except botocore.exceptions.ClientError as exc:
                    # A retried completion whose first try reached S3 finds the upload gone: check the object.
                    if _code(exc) != "NoSuchUpload" or tries == 1:
                        raise
                    head = self._client.head_object(Bucket=self._bucket, Key=full)
                    if head.get("ContentLength") != file.size:
                        raise

            await self._attempts(what, priority, complete)
        except BaseException:
            # Fire and forget: a part still in flight on a thread may land after this; recover() at the next
            # start sweeps whatever remains.
            self._transfers.submit(self._abort_quietly, full, upload_id)
            raise
        return crcs

    def _abort_quietly(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=full, UploadId=upload_id)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            log.debug("store.abort_failed", key=full, error=str(exc))

    async def _download(
        self, key: str, dest: Path, *, size: int, algo: str, progress: Callable[[int], None] | None
    ) -> tuple[int, str] | None:
        """Ranged GETs in parallel, each written at its offset and hashed as it lands; the part CRCs are
        combined into the file's (no re-read). Restores run as EMERGENCY: nothing is more urgent at boot."""
        full = self._full(key)
        what = f"download s3://{self._bucket}/{full}"
        # Ranged GETs are fewer and larger than upload parts: per-request cost dominates small ranges, and
        # some S3-compatible servers (moto) read the whole object for every range.
        parts = _parts(size, max(self._part_size, _MIN_RANGE))
        hash_here = can_combine(algo)
        loop = asyncio.get_running_loop()

        def fetch_whole() -> int | None:
            # One object, one thread: GET, write, fsync and close without a hop back to the loop between
            # (a checkpoint of many small files is dominated by per-file overhead).
            resp = self._client.get_object(Bucket=self._bucket, Key=full)
            with resp["Body"] as body:
                data: bytes = body.read()
            _check_size(what, resp.get("ContentLength"), size, len(data), size)
            fd = _open_for_write(dest, size)
            try:
                _pwrite_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            return crc_update(algo, data) if hash_here else None

        async def fetch(fd: int, part: _Part) -> int | None:
            def get() -> int | None:
                end = part.offset + part.length - 1
                resp = self._client.get_object(
                    Bucket=self._bucket, Key=full, Range=f"bytes={part.offset}-{end}"
                )
                with resp["Body"] as body:
                    data: bytes = body.read()
                total = int(str(resp.get("ContentRange", "/-1")).rsplit("/", 1)[1])
                _check_size(what, total, size, len(data), part.length)
                _pwrite_all(fd, data, part.offset)
                return crc_update(algo, data) if hash_here else None

            crc: int | None = await self._attempts(
                f"{what} (part {part.number}/{len(parts)})", Priority.EMERGENCY, get
            )
            if progress is not None:
                progress(part.length)
            return crc

        try:
            if len(parts) == 1:
                crcs = [await self._attempts(what, Priority.EMERGENCY, fetch_whole)]
                if progress is not None:
                    progress(size)
            else:
                fd = await loop.run_in_executor(self._executor, _open_for_write, dest, size)
                try:
                    crcs = await _gather_or_cancel([fetch(fd, p) for p in parts])
                    await loop.run_in_executor(self._executor, os.fsync, fd)
                finally:
                    await loop.run_in_executor(self._executor, os.close, fd)
        except UploadError as exc:  # _attempts speaks of uploads' errors; the message names the download
            raise StoreError(str(exc)) from exc
        except OSError as exc:
            raise StoreError(f"{what}: writing {dest} failed: {exc}") from exc
        if not hash_here:
            return None
        return size, encode_crc(algo, _combined(algo, crcs, parts))

    # ---- protocol

    async def check_access(self) -> None:
        """Probe every permission spotd needs on the prefix; the error names the first one missing."""
        probe = self._full(f"{self._job}/.spotd-access-probe")
        arn_obj = f"arn:aws:s3:::{self._bucket}/{self._key_prefix}*"
        steps: list[tuple[str, str, Callable[[], Any]]] = [
            (
                "s3:ListBucket",
                f"arn:aws:s3:::{self._bucket}",
                lambda: self._client.list_objects_v2(
                    Bucket=self._bucket, Prefix=self._full(self._job), MaxKeys=1
                ),
            ),
            (
                "s3:PutObject",
                arn_obj,
                lambda: self._client.put_object(Bucket=self._bucket, Key=probe, Body=b"ok"),
            ),
            (
                "s3:GetObject",
                arn_obj,
                lambda: self._client.get_object(Bucket=self._bucket, Key=probe)["Body"].close(),
            ),
            ("s3:DeleteObject", arn_obj, lambda: self._client.delete_object(Bucket=self._bucket, Key=probe)),
            (
                "s3:ListBucketMultipartUploads",
                f"arn:aws:s3:::{self._bucket}",
                lambda: self._client.list_multipart_uploads(
                    Bucket=self._bucket, Prefix=self._full(self._job), MaxUploads=1
                ),
            ),
        ]
        for permission, resource, call in steps:
            try:
                await self._run(call)
            except botocore.exceptions.ClientError as exc:
                code = _code(exc)
                if code in ("NoSuchBucket", "404"):
                    raise StoreAccessError(
                        f"bucket {self._bucket!r} does not exist; fix: create it or correct store.uri"
                    ) from exc
                raise StoreAccessError(
                    f"{permission} on {resource} failed ({code or exc}); fix: grant it to the instance role "
                    "(see docs/iam-policy.json)"
                ) from exc
            except botocore.exceptions.NoCredentialsError as exc:
                raise StoreAccessError(
                    "no AWS credentials found; fix: attach an instance profile with docs/iam-policy.json"
                ) from exc
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                raise StoreAccessError(
                    f"cannot reach S3 for bucket {self._bucket!r} ({exc}); "
                    "fix: check the network, the region and store.endpoint_url"
                ) from exc

    async def recover(self) -> int:
        """Abort the multipart uploads a crash left under this job's prefix; returns how many."""

        def sweep() -> int:
            count = 0
            for page in self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self._bucket, Prefix=self._full(f"{self._job}/")
            ):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    count += 1
            return count

        try:
            count = await self._run(sweep)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise StoreError(
                f"aborting leftover multipart uploads in s3://{self._bucket} failed: {exc}"
            ) from exc
        if count:
            log.info("store.recovered", aborted_uploads=count)
        return count

    async def close(self) -> None:
        await self._run(self._transfers.shutdown, True)
        await self._run(self._client.close)
        await super().close()


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
